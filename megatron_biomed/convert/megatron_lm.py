"""Import a Megatron-LM (megatron-core) GPT checkpoint in the `torch_dist` format.

Such a checkpoint is a DCP directory whose tensors carry megatron-core's sharded keys. The layers
of a homogeneous model are stacked along a leading layer axis
(`decoder.layers.self_attention.linear_qkv.weight` of shape [layers, 3 x hidden, hidden]); newer
runs may key them per layer (`decoder.layers.7.self_attention...`). Layer norms are keyed as
Transformer Engine fuses them (`linear_qkv.layer_norm_weight`) or as the local spec names them
(`input_layernorm.weight`). megatron-core's fused QKV rows are ordered per head as (q, k, v),
which is our order, so only names change. Only models with learned absolute positions,
LayerNorm, biases and a tied output layer match our architecture; anything else is refused.
"""
import argparse
import collections
import concurrent.futures
import json
import os
import pickle
import re
import threading

import torch

from megatron_biomed.config import GPTConfig
from megatron_biomed.convert import storage as S
from megatron_biomed.convert.common import expected_specs
from megatron_biomed.convert.storage import CheckpointFormatError

# our per-layer name -> megatron-core names to try, in order
_LAYER_NAMES = {
    "ln_1.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "ln_1.bias": ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    "attn.c_attn.weight": ("self_attention.linear_qkv.weight",),
    "attn.c_attn.bias": ("self_attention.linear_qkv.bias",),
    "attn.c_proj.weight": ("self_attention.linear_proj.weight",),
    "attn.c_proj.bias": ("self_attention.linear_proj.bias",),
    "ln_2.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "ln_2.bias": ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
    "mlp.c_fc.weight": ("mlp.linear_fc1.weight",),
    "mlp.c_fc.bias": ("mlp.linear_fc1.bias",),
    "mlp.c_proj.weight": ("mlp.linear_fc2.weight",),
    "mlp.c_proj.bias": ("mlp.linear_fc2.bias",),
}
_GLOBAL_NAMES = {
    "wte.weight": "embedding.word_embeddings.weight",
    "wpe.weight": "embedding.position_embeddings.weight",
    "ln_f.weight": "decoder.final_layernorm.weight",
    "ln_f.bias": "decoder.final_layernorm.bias",
}


def find_iteration_dir(path, iteration=None):
    if os.path.isfile(os.path.join(path, "metadata.json")) and iteration is None:
        return path
    if iteration is None:
        latest = os.path.join(path, "latest_checkpointed_iteration.txt")
        if not os.path.isfile(latest):
            raise CheckpointFormatError(f"{path}: neither a Megatron-LM checkpoint directory (metadata.json) "
                                        f"nor a root with latest_checkpointed_iteration.txt")
        text = open(latest).read().strip()
        d = os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}")
    else:
        d = os.path.join(path, f"iter_{iteration:07d}")
    if not os.path.isdir(d):
        raise CheckpointFormatError(f"{path}: checkpoint directory {d} is missing")
    return d


def read_args(directory):
    """The training args Megatron-LM keeps in common.pt, if they load without running code."""
    path = os.path.join(directory, "common.pt")
    if not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        return None  # args holding other types: fall back to the flags
    args = common.get("args") if isinstance(common, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else None


class StackedCache:
    """The last few stacked tensors ([layers, ...]), safe to share between the prefetch threads
    that call `model_tensor` at once: each key is read once, by the first thread to ask for it
    (the others wait for that read); a caller keeps the tensor it was handed even when another
    thread evicts it from the cache meanwhile."""

    def __init__(self, read, keep=3):
        self._read, self._keep = read, keep
        self._lock = threading.Lock()
        self._entries = collections.OrderedDict()  # key -> Future, oldest first

    def get(self, key):
        with self._lock:
            future = self._entries.get(key)
            mine = future is None
            if mine:
                future = self._entries[key] = concurrent.futures.Future()
                while len(self._entries) > self._keep:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        if mine:
            try:
                future.set_result(self._read(key))
            except BaseException as e:
                with self._lock:
                    if self._entries.get(key) is future:
                        del self._entries[key]
                future.set_exception(e)
                raise
        return future.result()


class MegatronLMSource:
    def __init__(self, path, iteration=None, num_attention_heads=None, vocab_size=None, activation=None):
        self.directory = find_iteration_dir(path, iteration)
        meta_path = os.path.join(self.directory, "metadata.json")
        try:
            with open(meta_path) as f:
                backend = json.load(f).get("sharded_backend")
        except (OSError, ValueError) as e:
            raise CheckpointFormatError(f"{meta_path}: {e} (a legacy Megatron-LM checkpoint? only the "
                                        f"torch_dist format is imported; legacy .pt files are pickles)") from None
        if backend != "torch_dist":
            raise CheckpointFormatError(f"{meta_path}: sharded_backend {backend!r}; only torch_dist is imported")
        self.reader = S.DCPReader(self.directory)
        self.args = read_args(self.directory) or {}
        self.description = f"Megatron-LM {self.directory}"
        self.iteration = 0
        self.config = self._config(num_attention_heads, vocab_size, activation)
        self._stacked_cache = StackedCache(self.reader.read)
        self.specs = {}
        for name, (shape, _) in expected_specs(self.config).items():
            key, layer = self._key(name)
            got = self.reader.shape(key)
            got = got[1:] if layer is not None and self._stacked else got
            if name == "wte.weight":
                ok = got[1:] == shape[1:] and got[0] >= shape[0]
            else:
                ok = got == shape
            if not ok:
                raise CheckpointFormatError(f"{self.directory}: {key} has shape {got}, expected {shape} "
                                            f"for {self._summary()}")
            self.specs[name] = (shape, self.reader.dtype(key))
        self.specs = {n: self.specs[n] for n in self.spec_order()}

    def _summary(self):
        c = self.config
        return (f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
                f"ffn {c.ffn_hidden_size}")

    def _config(self, heads, vocab_size, activation):
        keys, a = self.reader.tensors, self.args
        for mcore in _GLOBAL_NAMES.values():
            if mcore not in keys:
                hint = (" (rotary or no position embeddings are not supported: our model has learned positions)"
                        if "position" in mcore else "")
                raise CheckpointFormatError(f"{self.directory}: has no tensor {mcore}{hint}")
        if a.get("swiglu") or a.get("squared_relu") or a.get("group_query_attention") \
                or a.get("normalization", "LayerNorm") != "LayerNorm":
            raise CheckpointFormatError(f"{self.directory}: swiglu / squared-relu / grouped-query attention / "
                                        f"RMSNorm models do not match the GPT-2 architecture")
        stacked = "decoder.layers.self_attention.linear_qkv.weight" in keys
        if stacked:
            layers = self.reader.shape("decoder.layers.self_attention.linear_qkv.weight")[0]
        else:
            found = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
            if not found:
                raise CheckpointFormatError(f"{self.directory}: no decoder layers found "
                                            f"(decoder.layers.*.self_attention.linear_qkv.weight)")
            layers = max(found) + 1
        self._stacked = stacked
        if not any(k.endswith("linear_qkv.bias") for k in keys):
            raise CheckpointFormatError(f"{self.directory}: linear layers have no biases "
                                        f"(--disable-bias-linear); GPT-2 has them")
        heads = heads or a.get("num_attention_heads")
        if not heads:
            raise CheckpointFormatError(f"{self.directory}: the number of attention heads is not in the "
                                        f"checkpoint's readable args: pass --num-attention-heads")
        padded_vocab, hidden = self.reader.shape("embedding.word_embeddings.weight")
        vocab_size = vocab_size or a.get("vocab_size")
        if not vocab_size:
            raise CheckpointFormatError(f"{self.directory}: the embedding has {padded_vocab} rows, padded; pass "
                                        f"--vocab-size or --vocab-file with the tokenizer's real vocabulary")
        if vocab_size > padded_vocab:
            raise CheckpointFormatError(f"--vocab-size {vocab_size} is larger than the embedding ({padded_vocab} rows)")
        if activation is None:  # megatron-core's fused bias-gelu (the default) is the tanh approximation
            fused = a.get("bias_gelu_fusion", a.get("bias_activation_fusion", True))
            activation = "gelu_new" if a.get("openai_gelu") or fused else "gelu"
        fc1 = ("decoder.layers.mlp.linear_fc1.weight" if stacked else "decoder.layers.0.mlp.linear_fc1.weight")
        if "output_layer.weight" in keys:
            raise CheckpointFormatError(f"{self.directory}: has an untied output layer (output_layer.weight, "
                                        f"--untie-embeddings-and-output-weights); our model ties it")
        return GPTConfig(
            vocab_size=vocab_size, seq_length=self.reader.shape("embedding.position_embeddings.weight")[0],
            num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
            ffn_hidden_size=self.reader.shape(fc1)[-2], hidden_dropout=a.get("hidden_dropout", 0.1),
            attention_dropout=a.get("attention_dropout", 0.1),
            layernorm_epsilon=a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5)),
            scale_attn_by_inverse_layer_idx=False, activation=activation,
            make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by", 128))

    def _key(self, name):
        """(megatron-core key, layer index or None) holding our parameter `name`."""
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name], None
        m = re.match(r"h\.(\d+)\.(.+)", name)
        layer, rest = int(m.group(1)), m.group(2)
        for candidate in _LAYER_NAMES[rest]:
            key = f"decoder.layers.{candidate}" if self._stacked else f"decoder.layers.{layer}.{candidate}"
            if key in self.reader.tensors:
                return key, layer
        raise CheckpointFormatError(f"{self.directory}: has no tensor for layer {layer} {rest} "
                                    f"(looked for {', '.join(_LAYER_NAMES[rest])})")

    def model_tensor(self, name):
        key, layer = self._key(name)
        if layer is None or not self._stacked:
            t = self.reader.read(key)
        else:  # consecutive layers of one kind read their stacked tensor once
            t = self._stacked_cache.get(key)[layer].clone()
        return t[:self.config.vocab_size] if name == "wte.weight" else t

    def spec_order(self):
        """Our names grouped by the megatron-core tensor that holds them (for the cache above)."""
        return sorted(self.specs, key=lambda n: (self._key(n)[0], self._key(n)[1] or 0))

    def tokenizer(self):
        return None
