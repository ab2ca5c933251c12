"""Our GPT <-> Hugging Face GPT2LMHeadModel: configuration and a name/layout mapping.

HF stores linear layers as Conv1D ([in, out]) and the fused QKV columns as (q|k|v, head, dim);
ours are nn.Linear ([out, in]) with QKV rows as (head, q|k|v, dim) for tensor parallelism.
"""
import torch

from megatron_biomed.config import GPTConfig


def to_hf_config(cfg: GPTConfig):
    from transformers import GPT2Config
    eos = cfg.vocab_size - 1
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
        activation_function="gelu_new", resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std, scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)


def from_hf_config(hf) -> GPTConfig:
    if getattr(hf, "activation_function", "gelu_new") != "gelu_new":
        raise ValueError(f"unsupported activation_function {hf.activation_function!r} (GPT-2 uses gelu_new)")
    return GPTConfig(
        vocab_size=hf.vocab_size, seq_length=hf.n_positions, num_layers=hf.n_layer,
        hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
        ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, hidden_dropout=hf.resid_pdrop,
        attention_dropout=hf.attn_pdrop, layernorm_epsilon=hf.layer_norm_epsilon,
        scale_attn_by_inverse_layer_idx=bool(getattr(hf, "scale_attn_by_inverse_layer_idx", False)),
        init_method_std=hf.initializer_range)


def _qkv_to_hf(w, heads):  # ours (heads*3*d, ...) rows -> HF (3*heads*d, ...) rows
    return w.reshape(heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _qkv_from_hf(w, heads):
    return w.reshape(3, heads, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def to_hf_state_dict(sd, cfg: GPTConfig):
    """Our full (unsharded) state dict -> GPT2LMHeadModel's, padded vocabulary rows removed."""
    out, heads = {}, cfg.num_attention_heads
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # tied to wte
        if name == "wte.weight":
            t = t[:cfg.vocab_size]
        elif name.endswith("attn.c_attn.weight"):
            t = _qkv_to_hf(t, heads).t()
        elif name.endswith("attn.c_attn.bias"):
            t = _qkv_to_hf(t, heads)
        elif name.endswith(("c_proj.weight", "c_fc.weight")):
            t = t.t()
        out["transformer." + name] = t.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def from_hf_state_dict(hf_sd, cfg: GPTConfig, padded_vocab_size):
    """GPT2LMHeadModel's state dict -> ours (vocabulary padded with zero rows)."""
    out, heads = {}, cfg.num_attention_heads
    for name, t in hf_sd.items():
        if name == "lm_head.weight" or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        name = name.removeprefix("transformer.")
        if name == "wte.weight":
            t = torch.cat([t, t.new_zeros(padded_vocab_size - t.shape[0], t.shape[1])])
        elif name.endswith("attn.c_attn.weight"):
            t = _qkv_from_hf(t.t(), heads)
        elif name.endswith("attn.c_attn.bias"):
            t = _qkv_from_hf(t, heads)
        elif name.endswith(("c_proj.weight", "c_fc.weight")):
            t = t.t()
        out[name] = t.contiguous()
    out["lm_head.weight"] = out["wte.weight"]
    return out
