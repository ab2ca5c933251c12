"""Compatibility with the tools our users come from (Megatron-LM's command lines)."""
