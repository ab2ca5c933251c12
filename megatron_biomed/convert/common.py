"""What every converter source provides, and the tensors a model configuration expects.

A source (ours, Hugging Face, Megatron-LM) exposes `config` (a GPTConfig with the real, unpadded
vocabulary), `specs` ({our parameter name: (shape, dtype)}, the embedding unpadded), `iteration`,
`description`, `model_tensor(name)` (one full tensor in our layout), `tokenizer()` (a
`tokenizers.Tokenizer` or None) and, for our own checkpoints, `extra_specs`/`extra_tensor` for
optimizer and training state.
"""
import torch

from megatron_biomed.config import GPTConfig


def expected_specs(cfg: GPTConfig, dtype=torch.float32):
    """{name: (shape, dtype)} of GPT's parameters (tied output layer omitted, embedding unpadded)."""
    from megatron_biomed.model.gpt import GPT
    with torch.device("meta"):
        model = GPT(cfg.replace(make_vocab_size_divisible_by=1))
    return {n: (tuple(p.shape), dtype) for n, p in model.named_parameters() if n != "lm_head.weight"}
