"""Small helpers shared by the tools: atomic outputs, progress bars, JSONL records."""
import contextlib
import json
import os
import sys
import tempfile

from tqdm.auto import tqdm


@contextlib.contextmanager
def atomic_output(path, mode="wb", **kwargs):
    """Write to a temp file beside `path`; rename onto `path` only if the block succeeds.

    An interrupted or failing writer therefore never leaves a truncated file under the final
    name (the rename is atomic on POSIX file systems).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path):
    """Make renames and new files in `path` durable (a crash after this keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def progress(**kwargs):
    """A tqdm bar on stderr; quiet when not a terminal unless asked (keeps CI logs short)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)


def print0(*args, **kwargs):
    """print on rank 0 of the default process group (or when there is none), flushed."""
    import torch.distributed as dist  # here: the data tools import this module without torch
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def iter_json_objects(path, error=ValueError):
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object raises `error` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise error(f"{path}:{line_no}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record
