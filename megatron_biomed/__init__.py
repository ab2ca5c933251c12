"""megatron_biomed: train BioMedLM-class GPT models from raw PubMed, Megatron-style."""
__version__ = "0.1.0"
