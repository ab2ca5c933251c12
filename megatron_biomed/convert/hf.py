"""Our GPT <-> Hugging Face GPT2LMHeadModel: configuration, tensor mapping, directory I/O.

HF stores linear layers as Conv1D ([in, out]) and the fused QKV columns as (q|k|v, head, dim);
ours are nn.Linear ([out, in]) with QKV rows as (head, q|k|v, dim) for tensor parallelism.
The output layer is tied to the embedding in both, so it is stored once.
"""
import json
import math
import os

import torch

from megatron_biomed.config import GPTConfig
from megatron_biomed.convert import storage as S
from megatron_biomed.convert.storage import CheckpointFormatError

_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def to_hf_config(cfg: GPTConfig, eos_token_id=None, dtype=None):
    from transformers import GPT2Config
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    hf = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
        activation_function=cfg.activation, resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std, scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos)
    hf.architectures = ["GPT2LMHeadModel"]
    if dtype is not None:
        hf.dtype = str(dtype).removeprefix("torch.")
    return hf


def from_hf_config(hf) -> GPTConfig:
    get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
    if get("model_type", "gpt2") != "gpt2":
        raise CheckpointFormatError(f"model_type {get('model_type')!r} is not supported: only GPT-2-family "
                                    f"checkpoints (GPT2LMHeadModel, BioMedLM) convert; convert it with its own tools")
    act = get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointFormatError(f"activation_function {act!r} is not supported; only gelu_new or gelu convert")
    if not get("scale_attn_weights", True) or get("add_cross_attention", False):
        raise CheckpointFormatError("scale_attn_weights=False / add_cross_attention=True are not supported; only plain "
                                    "GPT-2 attention converts")
    if get("tie_word_embeddings", True) is False:
        raise CheckpointFormatError("tie_word_embeddings=False: the model has a separate output layer, "
                                    "ours ties it to the embedding; only tied GPT-2 models convert")
    n_embd, n_head = get("n_embd"), get("n_head")
    for key in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"):
        if not isinstance(get(key), int) or get(key) <= 0:
            raise CheckpointFormatError(f"{key} is {get(key)!r}, a positive integer is needed; fix config.json")
    if n_embd % n_head:
        raise CheckpointFormatError(f"n_embd {n_embd} is not divisible by n_head {n_head}; fix config.json "
                                    f"(every head has n_embd / n_head dimensions)")
    return GPTConfig(
        vocab_size=get("vocab_size"), seq_length=get("n_positions"), num_layers=get("n_layer"),
        hidden_size=n_embd, num_attention_heads=get("n_head"),
        ffn_hidden_size=get("n_inner") or 4 * n_embd, hidden_dropout=get("resid_pdrop", 0.1),
        attention_dropout=get("attn_pdrop", 0.1), layernorm_epsilon=get("layer_norm_epsilon", 1e-5),
        scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", False)),
        init_method_std=get("initializer_range", 0.02), activation=_HF_ACTIVATIONS[act])


def _qkv_to_hf(w, heads):  # ours (heads*3*d, ...) rows -> HF (3*heads*d, ...) rows
    return w.reshape(heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _qkv_from_hf(w, heads):
    return w.reshape(3, heads, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _block_rows(t):
    """Rows per block of a transposing copy (measured on a 2-core CPU, BioMedLM's shapes): with
    2-byte elements, 128-row blocks of a tall matrix; otherwise 16 rows, whose strided reads stay
    in cache. About 1.5x faster than torch's own t().contiguous() (most of a conversion's CPU)."""
    return 128 if t.element_size() == 2 and t.shape[0] >= t.shape[1] else 16


def _transpose(t):
    """t.t().contiguous(), copied in blocks of rows through numpy (which releases the GIL, so
    two converter threads transpose at once)."""
    if t.dim() != 2 or t.numel() < 1 << 16 or t.device.type != "cpu":
        return t.t().contiguous()
    out, dst = S.empty_buffer((t.shape[1], t.shape[0]), t.dtype)
    src, rows = S.bytes_view(t), _block_rows(t)
    for i in range(0, t.shape[0], rows):
        dst[:, i:i + rows] = src[i:i + rows].T
    return out


def _qkv_weight_to_hf(w, heads):
    """_transpose(_qkv_to_hf(w, heads)) in one pass: each block of our rows (one head's q, k or v
    rows, contiguous) lands transposed in its HF columns, without the reordered copy between."""
    if w.device.type != "cpu":
        return _qkv_to_hf(w, heads).t().contiguous()
    rows, cols = w.shape
    d = rows // (3 * heads)
    step = math.gcd(_block_rows(w), d)
    out, dst = S.empty_buffer((cols, rows), w.dtype)
    src = S.bytes_view(w)
    for r in range(0, rows, step):
        h, rest = divmod(r, 3 * d)
        q, j = divmod(rest, d)
        c = q * (rows // 3) + h * d + j
        dst[:, c:c + step] = src[r:r + step].T
    return out


def _qkv_weight_from_hf(w, heads):
    """_qkv_from_hf(_transpose(w), heads) in one pass (w is HF's [in, 3 x hidden])."""
    if w.device.type != "cpu":
        return _qkv_from_hf(w.t(), heads).contiguous()
    cols, rows = w.shape
    out, dst = S.empty_buffer((rows, cols), w.dtype)
    src = S.bytes_view(w)
    grouped = dst.reshape(heads, 3, rows // (3 * heads), cols)
    step = _block_rows(w)
    for i in range(0, cols, step):
        block = src[i:i + step].T  # (3 x hidden, <=step), rows in HF's (q|k|v, head, dim) order
        grouped[..., i:i + step] = block.reshape(3, heads, -1, block.shape[1]).transpose(1, 0, 2, 3)
    return out


def _transposed(name):
    return name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def hf_name(name):
    return "transformer." + name


def hf_shape(name, shape):
    return tuple(reversed(shape)) if _transposed(name) else tuple(shape)


def to_hf_tensor(name, t, cfg: GPTConfig):
    """One of our (unsharded) tensors, named as in GPT, -> GPT2LMHeadModel's tensor."""
    if name == "wte.weight":
        t = t[:cfg.vocab_size]
    elif name.endswith("attn.c_attn.weight"):
        return _qkv_weight_to_hf(t, cfg.num_attention_heads)
    elif name.endswith("attn.c_attn.bias"):
        t = _qkv_to_hf(t, cfg.num_attention_heads)
    return _transpose(t) if _transposed(name) else t.contiguous()


def from_hf_tensor(name, t, cfg: GPTConfig):
    """GPT2LMHeadModel's tensor of our parameter `name` -> ours (embedding not padded)."""
    if name.endswith("attn.c_attn.weight"):
        return _qkv_weight_from_hf(t, cfg.num_attention_heads)
    if _transposed(name):
        t = _transpose(t)
    if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
        t = _qkv_from_hf(t, cfg.num_attention_heads)
    return t.contiguous()


def to_hf_state_dict(sd, cfg: GPTConfig):
    """Our full (unsharded) state dict -> GPT2LMHeadModel's, padded vocabulary rows removed."""
    out = {hf_name(n): to_hf_tensor(n, t, cfg) for n, t in sd.items() if n != "lm_head.weight"}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def from_hf_state_dict(hf_sd, cfg: GPTConfig, padded_vocab_size):
    """GPT2LMHeadModel's state dict -> ours (vocabulary padded with zero rows)."""
    out = {}
    for name, t in hf_sd.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        name = name.removeprefix("transformer.")
        t = from_hf_tensor(name, t, cfg)
        if name == "wte.weight":
            t = torch.cat([t, t.new_zeros(padded_vocab_size - t.shape[0], t.shape[1])])
        out[name] = t
    out["lm_head.weight"] = out["wte.weight"]
    return out


# -- directories -------------------------------------------------------------------------------
class HFSource:
    """A Hugging Face GPT-2-family directory, read tensor by tensor."""

    def __init__(self, directory):
        from megatron_biomed.convert.common import expected_specs
        self.directory = directory
        path = os.path.join(directory, "config.json")
        try:
            with open(path) as f:
                hf_config = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: cannot read a Hugging Face config ({e}); the file is truncated "
                                        f"or not JSON: copy it again") from None
        archs = hf_config.get("architectures") or ["GPT2LMHeadModel"]
        if not set(archs) & {"GPT2LMHeadModel", "GPT2Model"}:
            raise CheckpointFormatError(f"{path}: architectures {archs} are not supported: only GPT2LMHeadModel "
                                        f"(GPT-2, BioMedLM) checkpoints convert; use another converter for it")
        try:
            self.config = from_hf_config(hf_config)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{path}: {e}") from None
        self.hf_config = hf_config
        self.description = f"Hugging Face {directory}"
        self.iteration = 0
        self._index = self._weights_index()
        self.specs = expected_specs(self.config)
        for name, (shape, _) in self.specs.items():
            key = self._find(name)
            got = self._shape(key)
            if got != hf_shape(name, shape):
                raise CheckpointFormatError(f"{self._file(key)}: tensor {key} has shape {got}, config.json "
                                            f"implies {hf_shape(name, shape)}; the config and weights do not belong together")
        self.specs = {n: (shape, self._dtype(self._find(n))) for n, (shape, _) in self.specs.items()}
        lm = self._index.get("lm_head.weight")
        if lm is not None and not torch.equal(self._read("lm_head.weight"), self._read(self._find("wte.weight"))):
            raise CheckpointFormatError(f"{directory}: lm_head.weight differs from the embedding (an untied "
                                        f"output layer); our model ties them, so it cannot be converted exactly")

    def _weights_index(self):
        d = self.directory
        for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
            index_path = os.path.join(d, index_name)
            if os.path.exists(index_path):
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
                if missing:
                    raise CheckpointFormatError(f"{index_path}: missing shard file(s) {', '.join(missing)}; copy the whole "
                                                f"directory")
                return self._load_files(files, kind)
        for name, kind in (("model.safetensors", "st"), ("pytorch_model.bin", "bin")):
            if os.path.isfile(os.path.join(d, name)):
                return self._load_files([name], kind)
        raise CheckpointFormatError(f"{d}: no model.safetensors, model.safetensors.index.json or "
                                    f"pytorch_model.bin; is it a Hugging Face model directory?")

    def _load_files(self, files, kind):
        index = {}
        for fname in files:
            path = os.path.join(self.directory, fname)
            if kind == "st":
                for name, entry in S.read_safetensors_header(path).items():
                    index[name] = (path, entry)
            else:
                for name, t in S.torch_load_weights(path).items():  # mmap: read on use
                    index[name] = (path, t)
        return index

    def _find(self, name):
        for key in (hf_name(name), name):  # GPT2Model directories have no "transformer." prefix
            if key in self._index:
                return key
        raise CheckpointFormatError(f"{self.directory}: tensor {hf_name(name)} is missing; an incomplete copy or "
                                    f"another architecture")

    def _file(self, key):
        return self._index[key][0]

    def _shape(self, key):
        v = self._index[key][1]
        return tuple(v.shape) if isinstance(v, torch.Tensor) else v[1]

    def _dtype(self, key):
        v = self._index[key][1]
        return v.dtype if isinstance(v, torch.Tensor) else v[0]

    def _read(self, key):
        path, v = self._index[key]
        return v.clone() if isinstance(v, torch.Tensor) else S.map_safetensors_tensor(path, v)

    def model_tensor(self, name):
        return from_hf_tensor(name, self._read(self._find(name)), self.config)

    def tokenizer(self):
        from megatron_biomed.data.tokenizer import load_tokenizer
        d = self.directory
        if os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt")):
            return load_tokenizer("GPT2BPETokenizer", os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return load_tokenizer("HuggingFaceTokenizer", tokenizer_model=d)
        return None


def write_hf(source, out_dir, dtype=None, max_shard_size="5GB", tokenizer=None, progress=None, direct_io=True):
    """Write `source` (any converter source) as a GPT2LMHeadModel directory in `out_dir`
    (direct_io: see storage.OutputFile)."""
    import threading

    from megatron_biomed.data.tokenizer import EOD_TOKEN, save_tokenizer

    def import_transformers():  # for the config files: ~0.8 s of imports, overlapped with the weights
        try:
            import transformers.generation.configuration_utils  # noqa: F401
            import transformers.models.gpt2.configuration_gpt2  # noqa: F401
        except Exception:  # noqa: BLE001 - the import below, on the main thread, reports it
            pass
    importer = threading.Thread(target=import_transformers, name="import", daemon=True)
    importer.start()
    cfg = source.config
    eos = tokenizer.token_to_id(EOD_TOKEN) if tokenizer is not None else None
    items = []
    for name, (shape, src_dtype) in source.specs.items():
        if name == "wte.weight":
            shape = (cfg.vocab_size, shape[1])
        items.append((hf_name(name), hf_shape(name, shape), dtype or src_dtype))
    out_dtype = dtype or source.specs["wte.weight"][1]
    shards = S.plan_shards(items, S.parse_size(max_shard_size))
    os.makedirs(out_dir, exist_ok=True)

    def produce(key):
        name = key.removeprefix("transformer.")
        return to_hf_tensor(name, source.model_tensor(name), cfg)
    weight_map, total = {}, 0
    for fname, shard in shards:
        S.write_safetensors(os.path.join(out_dir, fname), shard, produce, progress, direct_io)
        for name, shape, dt in shard:
            weight_map[name] = fname
            total += S.tensor_bytes(shape, dt)
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    importer.join()
    from transformers import GenerationConfig
    to_hf_config(cfg, eos, out_dtype).save_pretrained(out_dir)
    eos_id = cfg.vocab_size - 1 if eos is None else eos
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir, cfg.seq_length)
