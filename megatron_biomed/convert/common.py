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
    """{name: (shape, dtype)} of GPT's parameters in its named_parameters() order (tied output
    layer omitted, embedding unpadded). Written out rather than read off a meta-device GPT:
    the first meta-device initialisation imports torch._dynamo, a second of every conversion."""
    H, F = cfg.hidden_size, cfg.ffn_hidden_size
    specs = {"wte.weight": (cfg.vocab_size, H), "wpe.weight": (cfg.seq_length, H)}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        specs.update({p + "ln_1.weight": (H,), p + "ln_1.bias": (H,),
                      p + "attn.c_attn.weight": (3 * H, H), p + "attn.c_attn.bias": (3 * H,),
                      p + "attn.c_proj.weight": (H, H), p + "attn.c_proj.bias": (H,),
                      p + "ln_2.weight": (H,), p + "ln_2.bias": (H,),
                      p + "mlp.c_fc.weight": (F, H), p + "mlp.c_fc.bias": (F,),
                      p + "mlp.c_proj.weight": (H, F), p + "mlp.c_proj.bias": (H,)})
    specs.update({"ln_f.weight": (H,), "ln_f.bias": (H,)})
    return {n: (shape, dtype) for n, shape in specs.items()}
