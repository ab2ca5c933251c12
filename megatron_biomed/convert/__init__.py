"""Checkpoint conversion between our GPT and other formats."""
