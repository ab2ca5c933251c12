"""Streaming reads and writes of the checkpoint files we convert between, one tensor in memory
at a time: DCP directories (ours, Megatron-LM's torch_dist) and safetensors files.

Security: a DCP directory's `.metadata` is read without arbitrary unpickling
(checkpoint/metadata.py); tensors are read by DCP with `torch.load(weights_only=True)`.
"""
import json
import math
import mmap
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from megatron_biomed.errors import one_line
from megatron_biomed.utils import fsync_dir
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from megatron_biomed.checkpoint.metadata import (CheckpointFormatError, SafeFileSystemReader,  # noqa: F401
                                                 read_dcp_metadata, storage_problems)


class DCPReader:
    """Random access to the tensors of a DCP directory without a process group."""

    def __init__(self, directory):
        self.directory = str(directory)
        meta_path = os.path.join(self.directory, ".metadata")
        if not os.path.isfile(meta_path):
            raise CheckpointFormatError(f"{self.directory}: not a checkpoint directory (no .metadata)")
        self.metadata = read_dcp_metadata(meta_path)
        problems = storage_problems(self.directory, self.metadata)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointFormatError(f"{problems[0]}{more}; restore the checkpoint from a copy or use another one")
        self.tensors = {k: m for k, m in self.metadata.state_dict_metadata.items()
                        if isinstance(m, TensorStorageMetadata)}
        self.objects = {k for k, m in self.metadata.state_dict_metadata.items()
                        if isinstance(m, BytesStorageMetadata)}
        self._storage, self._items_in_file = {}, {}
        for index, info in (self.metadata.storage_data or {}).items():
            self._storage.setdefault(index.fqn, []).append(info)
            self._items_in_file[info.relative_path] = self._items_in_file.get(info.relative_path, 0) + 1

    def files_of(self, key):
        """The files holding `key`'s bytes."""
        return sorted({info.relative_path for info in self._storage.get(key, [])})

    def shape(self, key):
        return tuple(self.tensors[key].size)

    def dtype(self, key):
        return self.tensors[key].properties.dtype

    def read(self, key):
        """The whole tensor `key` (read-only use: it may map the file rather than copy it)."""
        if key not in self.tensors:
            raise CheckpointFormatError(f"{self.directory}: has no tensor {key!r}")
        t = self._mapped(key)
        if t is not None:
            return t
        t = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into({key: t})
        return t

    def _mapped(self, key):
        """A tensor stored whole in a file of its own (what the converter writes) is that file's
        torch.save archive: map it instead of copying it through DCP's reader (2-3 copies)."""
        md, infos = self.tensors[key], self._storage.get(key, [])
        if len(md.chunks) != 1 or tuple(md.chunks[0].sizes) != tuple(md.size) or len(infos) != 1:
            return None
        info = infos[0]
        path = os.path.join(self.directory, info.relative_path)
        if info.offset != 0 or info.transform_descriptors or self._items_in_file[info.relative_path] != 1:
            return None
        try:
            if os.path.getsize(path) != info.length:
                return None
            t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - anything unexpected: DCP's reader reports it properly
            return None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != self.shape(key) or t.dtype != self.dtype(key):
            return None
        return t

    def read_into(self, tensors):
        """Fill several tensors (keyed by checkpoint key) in one pass over the files."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.load(tensors, storage_reader=SafeFileSystemReader(self.directory), no_dist=True)
        except CheckpointFormatError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - truncated shard, foreign format
            raise CheckpointFormatError(f"{self.directory}: cannot read {', '.join(list(tensors)[:3])} "
                                        f"({one_line(e)}); the checkpoint is damaged or not a checkpoint of this "
                                        f"kind: restore it from a copy") from None


class Prefetch:
    """Produces the tensors of `keys`, in that order, ahead of the writer on background threads:
    reading and converting the next tensors (file reads and torch/numpy copies release the GIL)
    overlaps writing this one. Two threads where there are two cores, since converting (the
    transposes) takes as long as writing. At most `threads + 1` produced tensors of 1 MB or more
    wait at a time (with `sizes`, {key: bytes}; smaller ones, biases and norms, do not count), so
    the threads are always at work on the next large tensor while memory stays bounded."""

    LARGE = 1 << 20

    def __init__(self, keys, produce, threads=None, sizes=None):
        self._keys, self._produce, self._next = list(keys), produce, 0
        self._threads = threads or min(2, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="prefetch")
        self._pending, self._sizes = {}, sizes or {}

    def _large(self, key):
        return self._sizes.get(key, self.LARGE) >= self.LARGE

    def _fill(self):
        large = sum(1 for k in self._pending if self._large(k))
        while large < self._threads + 1 and self._next < len(self._keys):
            key = self._keys[self._next]
            self._next += 1
            self._pending[key] = self._pool.submit(self._produce, key)
            large += self._large(key)

    def get(self, key):
        self._fill()
        future = self._pending.pop(key, None)
        if future is None:  # asked out of the planned order: produce it here
            return self._produce(key)
        t = future.result()
        self._fill()
        return t

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)  # waits for at most the tensor in hand
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _item_bytes(item):
    props = item.tensor_data.properties if item.tensor_data is not None else None
    return math.prod(item.tensor_data.size) * props.dtype.itemsize if props is not None else 0


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors (shapes only) and produces each tensor when it is written, the
    next one prefetched while this one is written (in the plan's order, which is the order
    the single-threaded writer takes them)."""

    def __init__(self, produce, progress=None):
        super().__init__()
        self._produce, self._progress = produce, progress
        self.prefetch = None

    def finish_plan(self, new_plan):
        plan = super().finish_plan(new_plan)
        self.prefetch = Prefetch([item.index.fqn for item in plan.items], self._produce,
                                 sizes={item.index.fqn: _item_bytes(item) for item in plan.items})
        return plan

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        t = self._produce(key) if self.prefetch is None else self.prefetch.get(key)
        if self._progress is not None:  # here, on the writer's thread (Ctrl-C, test hooks)
            self._progress.update(t.numel() * t.element_size())
        return t


def write_dcp(directory, specs, produce, progress=None):
    """Write a DCP checkpoint of `specs` ({key: (shape, dtype)}) into `directory`, calling
    `produce(key)` for each tensor as it is written (a background thread runs it one tensor
    ahead), so only a few are in memory at a time; `progress.update(bytes)` after each."""
    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}

    def checked(key):
        t = produce(key).detach().to("cpu").contiguous()
        want = tuple(specs[key][0])
        if tuple(t.shape) != want or t.dtype != specs[key][1]:
            raise CheckpointFormatError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {want} {specs[key][1]}")
        return t
    planner = _StreamingSavePlanner(checked, progress)
    # torch.save's zip records carry a CRC-32 each, which halves its write speed; the manifest
    # (XXH3-128 of every file, checked on load) already covers these bytes.
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process")
            # One file per tensor: torch's writer keeps every tensor of a file alive until the file
            # is complete, so one file for everything would hold the whole model in memory.
            # sync_files=False: the caller syncs the finished tree once (sync_tree), so writing the
            # next file never waits for the disk to take the last one.
            dcp.save(state, storage_writer=FileSystemWriter(directory, single_file_per_rank=False, thread_count=1,
                                                            sync_files=False),
                     planner=planner, no_dist=True)
    finally:
        torch.serialization.set_crc32_options(crc)
        if planner.prefetch is not None:
            planner.prefetch.close()


# -- safetensors -------------------------------------------------------------------------------
# The format is an 8-byte little-endian header length, a JSON header and the raw bytes; writing
# and reading it here lets a shard stream to and from disk tensor by tensor (the safetensors
# package builds a whole shard in memory to write it).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(path):
    """{name: (dtype, shape, begin, end)} with absolute byte offsets."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        size = os.path.getsize(path)
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise CheckpointFormatError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        out[name] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
    return out


def map_safetensors_tensor(path, entry):
    """A tensor of a safetensors file as a view of a private (copy-on-write) mapping of just its
    bytes: no copy is made until it is transformed or written, as transformers loads them, and
    the mapping goes away with the tensor, so memory stays bounded while streaming."""
    dtype, shape, begin, end = entry
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape)
    if not count or begin % itemsize or end - begin != count * itemsize:
        return read_safetensors_tensor(path, entry)  # empty, unaligned or inconsistent: read (and check) it
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-writable")
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=begin - start).view(shape)


def read_safetensors_tensor(path, entry):
    dtype, shape, begin, end = entry
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes != end - begin:
        raise CheckpointFormatError(f"{path}: a tensor of shape {shape} {dtype} has {end - begin} bytes")
    if nbytes:
        with open(path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                raise CheckpointFormatError(f"{path}: truncated")
    return t


def write_safetensors(path, items, produce, progress=None):
    """Write [(name, shape, dtype), ...] to `path`, calling `produce(name)` for each tensor in turn
    (one ahead, on a background thread); `progress.update(bytes)` after each."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in items:
        nbytes = tensor_bytes(shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    def ready(item):  # on the prefetch thread: the bytes as they go to the file
        name, shape, dtype = item
        t = produce(name).detach().to("cpu", dtype).contiguous()
        if tuple(t.shape) != tuple(shape):
            raise CheckpointFormatError(f"{name}: produced shape {tuple(t.shape)}, planned {tuple(shape)}")
        return t
    sizes = {i: tensor_bytes(shape, dtype) for i, (_, shape, dtype) in enumerate(items)}
    with open(path, "wb") as f, Prefetch(range(len(items)), lambda i: ready(items[i]), sizes=sizes) as ahead:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i in range(len(items)):
            t = ahead.get(i)
            if progress is not None:
                progress.update(t.numel() * t.element_size())
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def sync_tree(root):
    """fsync every file and directory under `root` (once, after everything is written: the disk
    takes the data in the background meanwhile, so this mostly waits for what is left)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


def tensor_bytes(shape, dtype):
    return math.prod(shape) * dtype.itemsize


def plan_shards(items, max_bytes, prefix="model"):
    """Split [(name, shape, dtype)] into files of at most max_bytes (a tensor larger than that
    gets a file of its own), named as transformers names them."""
    shards, current, size = [], [], 0
    for item in items:
        nbytes = tensor_bytes(item[1], item[2])
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        shards.append(current)
    if len(shards) == 1:
        return [(f"{prefix}.safetensors", shards[0])]
    n = len(shards)
    return [(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


def parse_size(text):
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = str(text).strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * units[unit])
    return int(s)


def torch_load_weights(path):
    """A pytorch_model.bin: only tensors and plain containers are unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(f"{path}: refusing to load: it holds objects other than tensors "
                                    f"({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointFormatError(f"{path}: cannot read ({type(e).__name__}: {e})") from None

