"""GPT-2 / BioMedLM as one plain nn.Module (nanoGPT style); parallelism is applied from outside.

Differences from nanoGPT that matter: the fused QKV projection stores its rows per head as
(head, q|k|v, head_dim), Megatron's layout, so that a contiguous split of the rows over tensor
parallel ranks gives every rank whole heads; the embedding is padded to a multiple of
`make_vocab_size_divisible_by` x TP and the padded logits are masked so they never win; and
BioMedLM's `scale_attn_by_inverse_layer_idx` divides attention scores by (layer index + 1).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_biomed.model.loss import cross_entropy

try:  # optional GPU kernel
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import problem means "not available"
    flash_attn_func = None

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "sdpa", "math")

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # On a GPU in half precision, SDPA is pinned to these kernels (in this order of preference)
    # rather than left to its heuristics, which can fall back to slower ones without a word.
    SDPA_KERNELS = {"flash": [SDPBackend.FLASH_ATTENTION],
                    "cudnn": [SDPBackend.CUDNN_ATTENTION],
                    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]}
except ImportError:  # older torch: SDPA chooses
    sdpa_kernel, SDPA_KERNELS = None, {}


class CoreAttention(nn.Module):
    """softmax(q k^T * scale + causal mask) v with dropout; no parameters.

    Backends: flash = the flash-attn package if installed, else SDPA's FlashAttention kernel;
    cudnn = SDPA's cuDNN kernel; auto = flash-attn if installed, else cuDNN or FlashAttention
    through SDPA on a GPU in half precision, SDPA's own choice elsewhere; sdpa = SDPA's choice;
    math = the fp32-softmax reference."""

    def __init__(self, config, layer_idx):
        super().__init__()
        if config.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend {config.attention_backend!r}: choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        self.backend = config.attention_backend
        self.dropout = config.attention_dropout
        self.scale = 1.0 / math.sqrt(config.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.selective_recompute = config.recompute_granularity == "selective"

    # --compile keeps this out of its graphs (parallel/parallelize.py: compile_blocks)
    def forward(self, q, k, v, mask=None):  # (B, T, heads, head_dim) each; mask (B, T, S) or None
        if self.selective_recompute and self.training:
            return checkpoint(self._attend, q, k, v, mask, use_reentrant=False)
        return self._attend(q, k, v, mask)

    def resolved_backend(self, q):
        """flash-attn, an SDPA kernel list, or sdpa/math."""
        fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if self.backend in ("auto", "flash") and flash_attn_func is not None and fast:
            return "flash-attn"
        if self.backend == "flash" and not fast:
            raise RuntimeError("--attention-backend flash needs a CUDA GPU and --bf16 or --fp16")
        if fast and self.backend in SDPA_KERNELS:
            return self.backend
        return "math" if self.backend == "math" else "sdpa"

    def _attend(self, q, k, v, mask=None):
        """`mask`: which keys each query sees (batched generation's padding), given in full:
        the causal part included."""
        p = self.dropout if self.training else 0.0
        backend = self.resolved_backend(q)
        T, S = q.shape[1], k.shape[1]  # S > T when decoding with a KV cache
        if mask is not None and backend == "flash-attn":
            backend = "sdpa"  # flash-attn takes no mask
        if backend == "flash-attn":
            # flash-attn aligns the causal mask bottom-right, which is what a KV cache needs
            return flash_attn_func(q, k, v, dropout_p=p, softmax_scale=self.scale, causal=True)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # query i sits at position S - T + i and sees keys 0..S - T + i
        given = mask is not None
        if given:
            mask = mask.unsqueeze(1)  # (B, 1, T, S): the same for every head
        elif T != S and T != 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if backend != "math":
            pinned = backend in SDPA_KERNELS and mask is None  # the pinned kernels take no mask
            with sdpa_kernel(SDPA_KERNELS[backend], set_priority=True) if pinned else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                   is_causal=T == S and T > 1 and not given, scale=self.scale)
        else:  # math: the reference, softmax in fp32
            att = (q @ k.transpose(-2, -1)).float() * self.scale
            visible = mask if given else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            att = att.masked_fill(~visible, float("-inf")).softmax(-1).to(q.dtype)
            y = F.dropout(att, p, self.training) @ v
        return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # rows: (head, qkv, dim)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.core = CoreAttention(config, layer_idx)
        self.resid_dropout = nn.Dropout(config.hidden_dropout)
        self.layer_idx = layer_idx

    def forward(self, x, cache=None, mask=None):
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism this rank computes only its own heads.
        q, k, v = self.c_attn(x).view(B, T, -1, 3, self.head_dim).unbind(3)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = self.core(q, k, v, mask).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.c_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        if config.activation not in ("gelu_new", "gelu"):
            raise ValueError(f"--activation {config.activation!r}: choose gelu_new or gelu")
        self.approximate = "tanh" if config.activation == "gelu_new" else "none"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache=cache, mask=mask)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the positions already seen, for generation one token at a time."""

    def __init__(self, config, batch_size, max_length, device=None, dtype=torch.float32, padding=0):
        """`padding`: columns of left padding (batched generation), beyond the model's positions."""
        if max_length > config.seq_length + padding:
            raise ValueError(f"{max_length} tokens do not fit the model's {config.seq_length} positions")
        self.batch_size, self.max_length, self.device, self.dtype = batch_size, max_length, device, dtype
        # allocated on first use: under tensor parallelism a rank holds only its own heads
        self.k = [None] * config.num_layers
        self.v = [None] * config.num_layers
        self.length = 0  # positions filled; advanced by GPT.forward
        # set by a fixed-shape decode step (generation.decode_step): the column (a 1-element
        # tensor) that receives the new keys and values; reads then return every column
        self.index = None

    def update(self, layer, k, v):
        if self.k[layer] is None:
            shape = (self.batch_size, self.max_length, *k.shape[2:])
            self.k[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.v[layer] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.index is not None:
            self.k[layer].index_copy_(1, self.index, k)
            self.v[layer].index_copy_(1, self.index, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[1]
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class GPT(nn.Module):
    def __init__(self, config, tensor_parallel_size=1):
        super().__init__()
        self.config = config
        self.padded_vocab_size = config.padded_vocab_size(tensor_parallel_size)
        self.wte = nn.Embedding(self.padded_vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.seq_length, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, self.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embedding
        if self.wte.weight.device.type != "meta":  # shapes only (converters): nothing to initialise
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 x layers)."""
        std = self.config.init_method_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                p.normal_(0.0, std)

    def embed(self, tokens, start=0, positions=None):
        if positions is None:
            T = start + tokens.shape[1]
            if T > self.config.seq_length:
                raise ValueError(f"sequence of {T} tokens is longer than --seq-length {self.config.seq_length}")
            positions = torch.arange(start, T, device=tokens.device).unsqueeze(0)
        return self.drop(self.wte(tokens) + self.wpe(positions))

    def blocks(self, x, layers=None, cache=None, mask=None):
        for block in (self.h if layers is None else layers):
            if self.config.recompute_granularity == "full" and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache=cache, mask=mask)
        return x

    def head(self, x):
        """Logits over the padded vocabulary (the loss leaves the padding out)."""
        return self.lm_head(self.ln_f(x))

    def forward(self, tokens, targets=None, cache=None, positions=None, key_mask=None, last_only=False):
        """Logits, padded columns at -inf (or the mean loss, given targets); with a KVCache,
        `tokens` continue the cached ones. Batched generation of left-padded rows gives each
        row's `positions` (B, T) and `key_mask` (B, cached + T): False for padding, which no
        real token attends to. `last_only`: logits of the last position only (B, 1, vocab), all
        that generation needs of a prompt."""
        start = cache.length if cache is not None else 0
        mask = None
        if key_mask is not None:
            T, S = tokens.shape[1], key_mask.shape[1]
            causal = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(S - T)
            # a padding query sees the (finite) padding before it, so that no row is all -inf
            query_is_padding = ~key_mask[:, S - T:]
            mask = causal & (key_mask[:, None, :] | query_is_padding[:, :, None])
        x = self.blocks(self.embed(tokens, start, positions), cache=cache, mask=mask)
        logits = self.head(x[:, -1:] if last_only else x)
        if cache is not None:
            cache.length += tokens.shape[1]
        if targets is None:
            if self.padded_vocab_size > self.config.vocab_size:
                logits = mask_padded_vocab(logits, self.config.vocab_size)
            return logits
        return cross_entropy(logits, targets, self.config.vocab_size).mean()

    def num_parameters(self, exclude_positions=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions else n


@contextlib.contextmanager
def on_meta_device():
    """Build modules on the meta device (shapes only, to be filled from a checkpoint) without
    running the initialisers of nn.Linear, nn.Embedding and nn.LayerNorm: on meta tensors they
    go through Python reference kernels that import torch._dynamo, a second of every load."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = [c.__dict__["reset_parameters"] for c in classes]
    for c in classes:
        c.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        for c, f in zip(classes, saved):
            c.reset_parameters = f


def mask_padded_vocab(logits, vocab_size):
    """-inf for the padded vocabulary columns of full (unsharded) logits."""
    cols = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(cols >= vocab_size, float("-inf"))


def flops_per_token(config, tensor_parallel_size=1):
    """Training FLOPs per token: 6N (forward + backward matmuls, embedding counted once through
    the tied output layer) + 12 L H T for attention scores and their use (Megatron/PaLM)."""
    H, L, T = config.hidden_size, config.num_layers, config.seq_length
    V = config.padded_vocab_size(tensor_parallel_size)
    n = L * (4 * H * H + 2 * H * config.ffn_hidden_size) + V * H  # matmul weights only
    return 6 * n + 12 * L * H * T
