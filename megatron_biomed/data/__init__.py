"""Data pipeline: PubMed/PMC XML -> JSONL documents -> BPE tokenizer -> Megatron .bin/.idx."""
