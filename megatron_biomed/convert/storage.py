"""Streaming reads and writes of the checkpoint files we convert between, one tensor in memory
at a time: DCP directories (ours, Megatron-LM's torch_dist) and safetensors files.

Security: a DCP directory's `.metadata` is read without arbitrary unpickling
(checkpoint/metadata.py); tensors are read by DCP with `torch.load(weights_only=True)`.
"""
import contextlib
import errno
import io
import json
import math
import mmap
import os
import pickle
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.utils.serialization import config as serialization_config
from torch.distributed.checkpoint.api import CheckpointException

from megatron_biomed.checkpoint import manifest as MF
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


class _BufferPool:
    """Large output buffers (the transposes' results) reused within one streaming write. A fresh
    buffer costs the kernel a page fault and a zeroed page for every page of it: a fifth of a
    conversion's CPU time, measured. Only buffers a writer hands back once their bytes are on
    their way to the file are reused; at most `limit` bytes wait unused."""

    def __init__(self, limit=1 << 30):
        self._free, self._lent, self._idle, self._limit = {}, {}, 0, limit
        self._lock = threading.Lock()

    def take(self, nbytes):
        with self._lock:
            free = self._free.get(nbytes)
            buf = free.pop() if free else None
            if buf is not None:
                self._idle -= nbytes
        if buf is None:
            buf = aligned_empty(nbytes)
        with self._lock:
            self._lent[buf.ctypes.data] = buf
        return buf

    def give_back(self, t):
        with self._lock:
            buf = self._lent.pop(t.untyped_storage().data_ptr(), None)
            if buf is not None and self._idle + buf.nbytes <= self._limit:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self._idle += buf.nbytes


_POOL = None
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@contextlib.contextmanager
def reused_buffers():
    """Within the block, empty_buffer() draws on buffers that recycle() handed back."""
    global _POOL
    outer, _POOL = _POOL, _BufferPool()
    try:
        yield _POOL
    finally:
        _POOL = outer


def bytes_view(t):
    """A numpy view of a CPU tensor as integers of its element size: a copy between two such
    views moves bits, whatever the dtype (bf16 has no numpy type)."""
    return t.detach().view(_INTS[t.element_size()]).numpy()


def empty_buffer(shape, dtype):
    """An uninitialised CPU tensor and its bytes_view(), allocated by numpy, which asks the
    kernel for huge pages (filling it takes far fewer page faults than a torch.empty), and
    reused from earlier tensors inside reused_buffers()."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = _POOL.take(nbytes) if _POOL is not None and nbytes >= Prefetch.LARGE else aligned_empty(nbytes)
    t = torch.from_numpy(raw).view(dtype).view(shape)
    return t, bytes_view(t)


def aligned_empty(nbytes):
    """An uninitialised numpy byte array starting on an OutputFile.ALIGN boundary (so it can be
    written with direct I/O), allocated by numpy, which asks the kernel for huge pages."""
    raw = np.empty(nbytes + OutputFile.ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % OutputFile.ALIGN
    return raw[start:start + nbytes]


class OutputFile:
    """A file written from start to end with direct I/O (O_DIRECT) where the file system allows
    it: the bytes go from our buffers to the disk without the copy into the page cache, which on
    the 2-core VM here costs more CPU than a conversion's transposes (buffered writes of 5 GB:
    2.8-12.6 s, 12 s of it kernel CPU at worst; direct: 3.1-3.7 s, under 1 s of CPU), and the
    final fsync has little left to do. An aligned buffer at an aligned offset goes straight out;
    anything else passes through an aligned staging buffer. Where O_DIRECT is refused (tmpfs,
    some network file systems) it is an ordinary buffered file."""

    ALIGN = 4096

    def __init__(self, path, staging=8 << 20, on_write=None, direct=True):
        """`on_write(bytes)` sees every byte written, in order (a checksum of the file);
        direct=False writes through the page cache from the start."""
        self._on_write = on_write
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            if not self.direct:
                raise
            self.fd, self.direct = os.open(path, flags, 0o644), False
        self.size, self._fill = 0, 0
        self._stage = aligned_empty(staging) if self.direct else None

    def write(self, data):
        """Append `data` (bytes, a numpy array or a CPU tensor)."""
        if isinstance(data, torch.Tensor):
            data = data.detach().reshape(-1).view(torch.uint8).numpy()
        arr = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        self.size += arr.nbytes
        if self._on_write is not None:
            self._on_write(arr)
        if self.direct and self._fill % self.ALIGN == 0 and arr.nbytes >= self.ALIGN \
                and arr.ctypes.data % self.ALIGN == 0:
            if self._fill:
                self._flush_stage()
            whole = arr.nbytes - arr.nbytes % self.ALIGN
            self._write_all(arr[:whole])
            arr = arr[whole:]
        if not self.direct:
            if self._fill:  # staged before direct I/O was given up
                self._flush_stage()
            self._write_all(arr)
            return
        while arr.nbytes:
            n = min(arr.nbytes, self._stage.nbytes - self._fill)
            self._stage[self._fill:self._fill + n] = arr[:n]
            self._fill, arr = self._fill + n, arr[n:]
            if self._fill == self._stage.nbytes:
                self._flush_stage()

    def _flush_stage(self):
        fill, self._fill = self._fill, 0
        # Direct I/O writes whole blocks: the last one is padded here and cut back in close().
        self._write_all(self._stage[:fill + -fill % self.ALIGN], real=fill)

    def _write_all(self, arr, real=None):
        """Write `arr`; only its first `real` bytes are data (the rest pads a direct write)."""
        view = memoryview(arr)
        real = view.nbytes if real is None else real
        while real > 0:
            try:
                n = os.write(self.fd, view if self.direct else view[:real])
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._buffered()  # an alignment this file system does not take: write normally
                continue
            view, real = view[n:], real - n

    def _buffered(self):
        import fcntl
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self):
        """Write what is staged; the file ends exactly after the last byte written."""
        try:
            if self._fill:
                self._flush_stage()  # padded to a whole block when direct: cut back below
            if os.fstat(self.fd).st_size != self.size:
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recycle(t):
    """The writer is done with `t`: its buffer, when empty_buffer() lent it, may be reused."""
    if _POOL is not None:
        _POOL.give_back(t)


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
        self.prefetch = self._last = None

    def finish_plan(self, new_plan):
        plan = super().finish_plan(new_plan)
        self.prefetch = Prefetch([item.index.fqn for item in plan.items], self._produce,
                                 sizes={item.index.fqn: _item_bytes(item) for item in plan.items})
        return plan

    def resolve_data(self, write_item):
        # One file per tensor, written in turn on one thread: when the next tensor is asked
        # for, the last one is in its file and its buffer can be reused.
        if self._last is not None:
            recycle(self._last)
        key = write_item.index.fqn
        t = self._last = self._produce(key) if self.prefetch is None else self.prefetch.get(key)
        if self._progress is not None:  # here, on the writer's thread (Ctrl-C, test hooks)
            self._progress.update(t.numel() * t.element_size())
        return t


class _DirectStream(io.RawIOBase):
    """A file object over an OutputFile, for torch.save and DCP's writer."""

    def __init__(self, path, on_write=None, direct=True):
        super().__init__()
        self._out = OutputFile(path, on_write=on_write, direct=direct)

    def writable(self):
        return True

    def write(self, b):
        self._out.write(b)
        return memoryview(b).nbytes

    def tell(self):
        return self._out.size

    def fileno(self):
        return self._out.fd

    def close(self):
        if not self.closed:
            self._out.close()
        super().close()


class _DirectFileSystem(FileSystem):
    """DCP's file system, writing with OutputFile and checksumming each file as it is written
    (`entries`: {file name: manifest entry})."""

    def __init__(self, direct=True):
        super().__init__()
        self.entries, self.direct = {}, direct

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        checksum = MF.StreamingEntry()
        with _DirectStream(str(path), on_write=checksum.update, direct=self.direct) as stream:
            yield stream
        self.entries[os.path.basename(path)] = checksum.entry()

    def rename(self, path, new_path):  # DCP writes .metadata under another name first
        super().rename(path, new_path)
        entry = self.entries.pop(os.path.basename(path), None)
        if entry is not None:
            self.entries[os.path.basename(new_path)] = entry


def write_dcp(directory, specs, produce, progress=None, direct_io=True):
    """Write a DCP checkpoint of `specs` ({key: (shape, dtype)}) into `directory`, calling
    `produce(key)` for each tensor as it is written (a background thread runs it one tensor
    ahead), so only a few are in memory at a time; `progress.update(bytes)` after each. Returns
    the manifest entries of the files written ({name: entry}, checksummed as they were written).
    direct_io=False: through the page cache (OutputFile)."""
    state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}

    def checked(key):
        t = produce(key).detach().to("cpu").contiguous()
        want = tuple(specs[key][0])
        if tuple(t.shape) != want or t.dtype != specs[key][1]:
            raise CheckpointFormatError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {want} {specs[key][1]}")
        return t
    planner = _StreamingSavePlanner(checked, progress)
    # torch.save's zip records carry a CRC-32 each, which halves its write speed; the manifest
    # (XXH3-128 of every file, checked on load) already covers these bytes. Its tensor data
    # starts on a 4 KB boundary of the file, so it is written with direct I/O (OutputFile);
    # torch.load reads any alignment.
    crc, alignment = torch.serialization.get_crc32_options(), serialization_config.save.storage_alignment
    torch.serialization.set_crc32_options(False)
    serialization_config.save.storage_alignment = OutputFile.ALIGN
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process")
            # One file per tensor: torch's writer keeps every tensor of a file alive until the file
            # is complete, so one file for everything would hold the whole model in memory.
            # sync_files=False: the caller syncs the finished tree once (sync_tree), so writing the
            # next file never waits for the disk to take the last one.
            writer = FileSystemWriter(directory, single_file_per_rank=False, thread_count=1, sync_files=False)
            writer.fs = _DirectFileSystem(direct_io)
            with reused_buffers():
                dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
            return writer.fs.entries
    finally:
        torch.serialization.set_crc32_options(crc)
        serialization_config.save.storage_alignment = alignment
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


def write_safetensors(path, items, produce, progress=None, direct_io=True):
    """Write [(name, shape, dtype), ...] to `path`, calling `produce(name)` for each tensor in turn
    (one ahead, on a background thread); `progress.update(bytes)` after each. The data starts on
    a 4 KB boundary (the header is padded with spaces, as the format allows) and tensors whose
    size is a multiple of 4 KB come first, so every large tensor is written from its buffer
    with direct I/O (OutputFile; direct_io=False: through the page cache)."""
    align = OutputFile.ALIGN
    items = sorted(items, key=lambda it: tensor_bytes(it[1], it[2]) % align != 0)  # stable
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in items:
        nbytes = tensor_bytes(shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)

    def ready(item):  # on the prefetch thread: the bytes as they go to the file
        name, shape, dtype = item
        t = produce(name).detach().to("cpu", dtype).contiguous()
        if tuple(t.shape) != tuple(shape):
            raise CheckpointFormatError(f"{name}: produced shape {tuple(t.shape)}, planned {tuple(shape)}")
        return t
    sizes = {i: tensor_bytes(shape, dtype) for i, (_, shape, dtype) in enumerate(items)}
    with reused_buffers(), OutputFile(path, direct=direct_io) as f, \
            Prefetch(range(len(items)), lambda i: ready(items[i]), sizes=sizes) as ahead:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(len(items)):
            t = ahead.get(i)
            if progress is not None:
                progress.update(t.numel() * t.element_size())
            f.write(t)
            recycle(t)


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

