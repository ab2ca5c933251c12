"""Per-file checksums of a checkpoint (manifest.json), written before the checkpoint becomes
visible and verified before it is loaded or converted, so that a flipped bit or a truncated copy
is an error naming the file instead of a model that silently trains on garbage.

xxHash's XXH3-128 runs at about 15 GB/s on one core. A save checksums each shard as DCP writes
it (`HashingFileSystem`), in a thread that runs while the write system call does, so nothing is
read back and the checksum hides behind the write; benchmarks/checkpoint_hash.py measures it.
"""
import contextlib
import json
import os
import threading
from pathlib import Path

import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem

from megatron_biomed.utils import atomic_output

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20
_OVERLAP = 1 << 20  # writes at least this large are checksummed in parallel with the write


def hash_file(path):
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def file_entry(directory, name):
    path = os.path.join(directory, name)
    return {"size": os.path.getsize(path), ALGORITHM: hash_file(path)}


def write_manifest(directory, entries):
    """`entries`: {file name: file_entry(...)} of every file of the checkpoint but the manifest."""
    with atomic_output(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": 1, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, f, indent=1)


def read_manifest(directory):
    """The {name: entry} of `directory`'s manifest, or None when it has none (an older
    checkpoint). A manifest that is not valid JSON is itself a failed verification."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            data = json.load(f)
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"unknown algorithm {data.get('algorithm')!r}")
        return files
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {MANIFEST: {"error": f"unreadable ({type(e).__name__}: {e})"}}


def check_file(directory, name, entry):
    """None when the file matches its manifest entry, else what is wrong, naming the file."""
    path = os.path.join(directory, name)
    if "error" in entry:
        return f"{path}: {entry['error']}"
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{path}: missing"
    if size != entry["size"]:
        return f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or partly copied)"
    if hash_file(path) != entry[ALGORITHM]:
        return f"{path}: checksum mismatch (the file is corrupted)"
    return None


def verify(directory, names=None):
    """Problems found in `directory` (all files, or only `names`), as messages naming each
    file; [] when it verifies; None when it has no manifest."""
    files = read_manifest(directory)
    if files is None:
        return None
    if MANIFEST in files:
        return [check_file(directory, MANIFEST, files[MANIFEST])]
    problems = []
    for name in sorted(files) if names is None else names:
        p = check_file(directory, name, files[name])
        if p:
            problems.append(p)
    return problems


class _HashingStream:
    """A write-only file that checksums what passes through it; no seeking (DCP and torch.save
    write shards front to back), so the digest is that of the file."""

    def __init__(self, f, on_close):
        self._f, self._on_close = f, on_close
        self._h, self._n, self._done = xxhash.xxh3_128(), 0, False

    def write(self, b):
        view = memoryview(b).cast("B")
        if len(view) < _OVERLAP:
            n = self._f.write(view)
            n = len(view) if n is None else n
            self._h.update(view[:n])
        else:  # hash in a thread while this one is in the write system call (it releases the GIL)
            hasher = threading.Thread(target=self._h.update, args=(view,))
            hasher.start()
            try:
                n = self._f.write(view)
            finally:
                hasher.join()
            if n is not None and n != len(view):  # a raw file's short write: never from DCP's buffered files
                raise OSError(f"short write to {getattr(self._f, 'name', 'a checkpoint file')}")
            n = len(view)
        self._n += n
        return n

    def tell(self):
        return self._f.tell()

    def fileno(self):
        return self._f.fileno()

    def flush(self):
        self._f.flush()

    def writable(self):
        return True

    def seekable(self):
        return False

    @property
    def closed(self):
        return self._f.closed

    def close(self):
        if not self._done:
            self._done = True
            self._f.close()
            self._on_close(self._n, self._h.hexdigest())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HashingFileSystem(FileSystem):
    """DCP's file system with checksums taken while the shards are written: set it as a
    FileSystemWriter's `.fs`; `entries` then holds {file name: manifest entry} of the files this
    process wrote."""

    def __init__(self):
        super().__init__()
        self.entries = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as f:
                yield f
            return
        name = Path(path).name
        with Path(path).open(mode) as f:
            stream = _HashingStream(f, lambda n, digest: self.entries.__setitem__(
                name, {"size": n, ALGORITHM: digest}))
            yield stream
            stream.close()
