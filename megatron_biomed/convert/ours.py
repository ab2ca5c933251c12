"""Our own checkpoints (see training/checkpoint.py) read and written offline, one tensor at a
time, without a process group: the source for export and resharding, the target for imports."""
import contextlib
import json
import os

import torch

from megatron_biomed.checkpoint import manifest as MF
from megatron_biomed.checkpoint.layout import CONFIG, LATEST, iteration_dir
from megatron_biomed.config import LayoutError, ParallelConfig, config_from_dict
from megatron_biomed.convert import storage as S
from megatron_biomed.convert.common import expected_specs
from megatron_biomed.convert.storage import CheckpointFormatError

TOKENIZER_DIR = "tokenizer"  # tokenizer files kept beside an imported checkpoint
_OPTIM_STATES = ("exp_avg", "exp_avg_sq", "step")


def resolve_iteration_dir(path, iteration=None):
    """`path` is a checkpoint root (holding latest_checkpointed_iteration.txt) or one iter_N dir."""
    if os.path.isfile(os.path.join(path, ".metadata")) and iteration is None:
        return path, os.path.dirname(os.path.abspath(path))
    if iteration is None:
        latest = os.path.join(path, LATEST)
        if not os.path.isfile(latest):
            raise CheckpointFormatError(f"{path}: no {LATEST} and no .metadata: not a checkpoint")
        text = open(latest).read().strip()
        if not text.isdigit():
            raise CheckpointFormatError(f"{latest}: expected an iteration number, found {text!r}")
        iteration = int(text)
    d = iteration_dir(path, iteration)
    if not os.path.isdir(d):
        raise CheckpointFormatError(f"{path}: no checkpoint for iteration {iteration} ({d} is missing)")
    return d, path


class OursSource:
    def __init__(self, path, iteration=None, verify=True):
        """`verify`: True checks the files against the manifest now; "background" checks each
        file on a thread right after the caller has read it (its pages are still in memory, so
        the checkpoint is read from disk once), and finish_verification() checks the rest and
        waits for the answer."""
        self.directory, self.root = resolve_iteration_dir(path, iteration)
        self._background = None
        if verify == "background":
            self._background = _FileChecks(self.directory)
            self.verified = None
        else:
            self.verified = verify_checkpoint(self.directory) if verify else None
        try:
            self._open()
        except CheckpointFormatError:
            self.finish_verification()  # a damaged file: the manifest's message names it best
            raise

    def _open(self):
        meta_path = os.path.join(self.directory, "config.json")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            model = self.meta["config"]["model"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointFormatError(f"{meta_path}: not a megatron_biomed checkpoint config ({e})") from None
        self.config = config_from_dict(model)
        self.iteration = int(self.meta.get("iteration", 0))
        self.consumed_samples = int(self.meta.get("consumed_samples", 0))
        self.description = f"megatron_biomed {self.directory}"
        self.reader = S.DCPReader(self.directory)
        self.specs = {}
        for name, (shape, _) in expected_specs(self.config).items():
            key = "model." + name
            if key not in self.reader.tensors:
                raise CheckpointFormatError(f"{self.directory}: tensor {key} is missing")
            got = self.reader.shape(key)
            ok = got == shape or (name == "wte.weight" and got[1:] == shape[1:] and got[0] >= shape[0])
            if not ok:
                raise CheckpointFormatError(f"{self.directory}: tensor {key} has shape {got}, its config.json "
                                            f"implies {shape}")
            self.specs[name] = (shape, self.reader.dtype(key))
        self.extra_specs = {k: (self.reader.shape(k), self.reader.dtype(k)) for k in self.reader.tensors
                            if k.startswith(("optim.", "train."))}

    def finish_verification(self):
        """Wait for a background check: CheckpointFormatError when the files do not verify."""
        if self._background is not None:
            checks, self._background = self._background, None
            self.verified = checks.finish()

    def _read(self, key):
        t = self.reader.read(key)
        if self._background is not None:
            self._background.after_reading(self.reader.files_of(key))
        return t

    def model_tensor(self, name):
        t = self._read("model." + name)
        return t[:self.config.vocab_size] if name == "wte.weight" else t

    def extra_tensor(self, key):
        return self._read(key)

    def has_optimizer(self):
        return any(k.startswith("optim.") for k in self.extra_specs)

    def tokenizer_files(self):
        """(vocab.json, merges.txt) recorded by training or kept beside the checkpoint, or None."""
        cfg = self.meta.get("config", {})
        vocab = cfg.get("vocab_file")
        candidates = [(vocab, cfg.get("merge_file")),
                      (vocab, os.path.join(os.path.dirname(vocab), "merges.txt") if vocab else None),  # as trained
                      (os.path.join(self.root, TOKENIZER_DIR, "vocab.json"),
                       os.path.join(self.root, TOKENIZER_DIR, "merges.txt"))]
        for vocab, merges in candidates:
            if vocab and merges and os.path.isfile(vocab) and os.path.isfile(merges):
                return vocab, merges
        return None

    def tokenizer(self):
        from megatron_biomed.data.tokenizer import load_tokenizer
        files = self.tokenizer_files()
        return load_tokenizer("GPT2BPETokenizer", *files) if files else None


@contextlib.contextmanager
def verified_reads(source):
    """Read `source` inside the block; leaving it waits for a background checksum check
    (OursSource(verify="background"), a no-op for other sources). When reading fails, a file
    that does not verify is reported instead: the manifest's message names it best."""
    finish = getattr(source, "finish_verification", None) or (lambda: None)
    try:
        yield
    except Exception:
        finish()
        raise
    finish()


class _FileChecks:
    """A checkpoint's files checked against its manifest on one thread, each as soon as it has
    been read (so its bytes come from memory, not the disk), the rest at finish()."""

    def __init__(self, directory):
        import concurrent.futures
        import threading
        self.directory, self.manifest = directory, MF.read_manifest(directory)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verify")
        self._lock, self._checks = threading.Lock(), {}

    def after_reading(self, names):
        if not self.manifest or MF.MANIFEST in self.manifest:
            return
        with self._lock:
            for n in names:
                if n not in self._checks and n in self.manifest:
                    self._checks[n] = self._pool.submit(MF.check_file, self.directory, n, self.manifest[n])

    def finish(self):
        """True when every file verifies, False without a manifest; else CheckpointFormatError."""
        try:
            if self.manifest is None:
                return False
            self.after_reading(sorted(self.manifest))
            if MF.MANIFEST in self.manifest:
                problems = [MF.check_file(self.directory, MF.MANIFEST, self.manifest[MF.MANIFEST])]
            else:
                problems = [p for _, f in sorted(self._checks.items()) if (p := f.result())]
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
        _raise_problems(problems)
        return True


def _raise_problems(problems):
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointFormatError(f"{problems[0]}{more}; restore the checkpoint from a copy, convert an "
                                    f"earlier iteration (--iteration), or pass --no-verify-checkpoint")


def verify_checkpoint(directory):
    """Check `directory` against its manifest; True when it verifies, False when it has none."""
    problems = MF.verify(directory)
    if problems is None:
        return False
    _raise_problems(problems)
    return True


def pad_rows(t, rows):
    """`t` with exactly `rows` rows: cut, or padded with zero rows (a vocabulary padded for TP)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def check_layout(cfg, tensor_parallel_size, pipeline_parallel_size):
    try:
        ParallelConfig(tensor_model_parallel_size=tensor_parallel_size,
                       pipeline_model_parallel_size=pipeline_parallel_size).validate(
            cfg, tensor_parallel_size * pipeline_parallel_size)
    except LayoutError as e:
        raise CheckpointFormatError(f"target layout: {e}") from None


def write_ours(source, out_dir, tensor_parallel_size=1, pipeline_parallel_size=1, tokenizer=None,
               progress=None, dtype=None, direct_io=True):
    """Write `source` as our checkpoint (root `out_dir`, one iteration) laid out for TP x PP:
    the embedding padded for that TP size, optimizer state carried over from our own
    checkpoints. DCP maps the tensors onto the ranks of that layout when training loads it.
    Model weights keep the source's dtype unless `dtype` is given (a bf16 Hugging Face model stays
    bf16, so a round trip gives back what went in; training loads them into fp32 master weights).
    direct_io: see storage.OutputFile."""
    cfg = source.config
    check_layout(cfg, tensor_parallel_size, pipeline_parallel_size)
    padded = cfg.padded_vocab_size(tensor_parallel_size)
    specs, producers = {}, {}
    for name, (shape, src_dtype) in source.specs.items():
        if name == "wte.weight":
            shape = (padded, shape[1])
        specs["model." + name] = (shape, dtype or src_dtype)
    extra = getattr(source, "extra_specs", {})
    for key, (shape, dt) in extra.items():
        if key.startswith("optim.wte.weight.") and len(shape) == 2:
            shape = (padded, shape[1])
        specs[key] = (shape, dt)
    iteration = source.iteration
    consumed = getattr(source, "consumed_samples", 0)
    for key, value in (("train.iteration", iteration), ("train.consumed_samples", consumed)):
        specs.setdefault(key, ((), torch.int64))
        producers[key] = lambda v=value: torch.tensor(v, dtype=torch.int64)

    def produce(key):
        if key in producers:
            return producers[key]()
        if key.startswith("model."):
            name = key[len("model."):]
            t = source.model_tensor(name).to(specs[key][1])
            if name == "wte.weight":
                t = pad_rows(t[:cfg.vocab_size], padded)
        else:
            t = source.extra_tensor(key)
            if key.startswith("optim.wte.weight.") and t.dim() == 2:
                t = pad_rows(t[:cfg.vocab_size], padded)
        return t

    d = iteration_dir(out_dir, iteration)
    os.makedirs(d)
    written = S.write_dcp(d, specs, produce, progress, direct_io)
    meta = {"iteration": iteration, "consumed_samples": consumed,
            "layout": {"tp": tensor_parallel_size, "pp": pipeline_parallel_size},
            "world_size": None, "converted_from": source.description,
            "config": {"model": dict(preset=None, **vars(cfg))}}
    if tokenizer is not None:
        from megatron_biomed.data.tokenizer import save_tokenizer
        save_tokenizer(tokenizer, os.path.join(out_dir, TOKENIZER_DIR), cfg.seq_length)
        meta["config"]["vocab_file"] = None  # resolved to <root>/tokenizer/ on load
    with open(os.path.join(d, CONFIG), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    MF.write_manifest(d, {**MF.file_entries(d, set(os.listdir(d)) - set(written)), **written})
    with open(os.path.join(out_dir, LATEST), "w") as f:
        f.write(f"{iteration}\n")


def model_size_bytes(source):
    return sum(S.tensor_bytes(shape, dt) for shape, dt in source.specs.values())


def build_model(source, device="cpu", dtype=torch.float32):
    """Our GPT (one process) with the weights of any source, built directly in `dtype` on
    `device` and filled tensor by tensor (the next read while this one is placed). A tensor
    already in the right dtype, shape and device is used as it is: for our checkpoints that is
    the mapped file, so loading costs no copy, as transformers' safetensors loading does."""
    from megatron_biomed.model.gpt import GPT, on_meta_device
    device = torch.device(device)
    with on_meta_device():
        model = GPT(source.config).to(dtype)
    params = dict(model.named_parameters())
    sizes = {name: S.tensor_bytes(shape, dt) for name, (shape, dt) in source.specs.items()}
    with torch.no_grad(), S.Prefetch(list(source.specs), source.model_tensor, sizes=sizes) as ahead:
        for name in source.specs:
            t, p = ahead.get(name), params[name]
            if name == "wte.weight":
                t = pad_rows(t, p.shape[0])
            if t.dtype != dtype or t.device != device or t.shape != p.shape or not t.is_contiguous():
                t = torch.empty(p.shape, dtype=dtype, device=device).copy_(t)
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(t))
    model.lm_head.weight = model.wte.weight
    return model.eval()
