"""Portable weights: BioMedLM's per-layer attention scale folded into the query projection.

BioMedLM divides layer l's attention scores by (l + 1) on top of sqrt(head_dim)
(`scale_attn_by_inverse_layer_idx`). Scores are q·k, so dividing the query projection of layer l
(its weight rows and bias) by (l + 1) gives the same function with a plain GPT-2 config. Serving
engines need that: vLLM's GPT-2 refuses the flag, and CTranslate2 ignores it without a word (its
greedy output then differs from the second token on).
"""
import re

import torch

_QKV = re.compile(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)$")


def fold_query_scale(name, t, cfg):
    """Our tensor `name` (nn.Linear layout, QKV rows as (head, q|k|v, dim)) with layer l's query
    rows divided by l + 1, computed in fp32 and rounded once to t's dtype; other tensors as they are."""
    m = _QKV.match(name)
    if not m or not cfg.scale_attn_by_inverse_layer_idx:
        return t
    layer = int(m.group(1))
    if layer == 0:
        return t
    out = t.to(torch.float32, copy=True)
    by_head = out.view(cfg.num_attention_heads, 3, cfg.head_dim, *out.shape[1:])
    by_head[:, 0] /= layer + 1
    return out.to(t.dtype)


class PortableSource:
    """Any converter source (ours in any layout, Hugging Face, Megatron-LM) whose model has the
    per-layer scale folded in: its config says plain GPT-2 attention."""

    def __init__(self, source):
        self._source = source
        self._scaled = source.config
        self.config = source.config.replace(scale_attn_by_inverse_layer_idx=False)
        self.description = f"{source.description} (attention scale folded)"

    def __getattr__(self, name):  # everything but the model's tensors and config: the source's
        return getattr(self._source, name)

    def model_tensor(self, name):
        return fold_query_scale(name, self._source.model_tensor(name), self._scaled)
