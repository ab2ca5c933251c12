"""Fine-tuning and evaluation on biomedical QA (MedMCQA, MedQA, PubMedQA, BioASQ, MMLU)."""
