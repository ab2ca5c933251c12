"""Small helpers shared by the tools: atomic outputs, progress bars, JSONL records."""
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile

from tqdm.auto import tqdm


@contextlib.contextmanager
def naming(path):
    """An OSError raised without a file name (a write() on a full disk) names `path`: the
    output the user asked for, not a temporary file they never saw."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def atomic_output(path, mode="wb", **kwargs):
    """Write to a temp file beside `path`; rename onto `path` only if the block succeeds.

    An interrupted or failing writer therefore never leaves a truncated file under the final
    name (the rename is atomic on POSIX file systems).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=directory)
    os.close(fd)
    try:
        with naming(path), open(tmp, mode, **kwargs) as f:
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


def temp_prefix(output):
    """Every temporary file or directory a tool makes for `output` lives beside it and is named
    `.<output name>.tmp-<random>`, so that the next run into the same output can find it."""
    return "." + os.path.basename(os.path.normpath(output)) + ".tmp-"


def make_temp_dir(output, kind=""):
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    return tempfile.mkdtemp(prefix=temp_prefix(output) + (kind + "-" if kind else ""), dir=directory)


def _legacy_temp(name, base):
    """Temporary names of earlier versions: `.X.<random>.tmp` files, `.X.partitions.<random>` and
    `.X.<8 random>` directories, `.pubmed_to_jsonl-<random>` directories."""
    rest = name[len(base) + 2:] if name.startswith("." + base + ".") else None
    if rest is not None and (re.fullmatch(r"[A-Za-z0-9_]{8}\.tmp", rest) or re.fullmatch(r"[A-Za-z0-9_]{8}", rest)
                             or re.fullmatch(r"partitions\.[A-Za-z0-9_]{8}", rest)):
        return True
    return re.fullmatch(r"\.pubmed_to_jsonl-[A-Za-z0-9_]{8}", name) is not None


def clean_stale_temps(output, log=None):
    """Remove what a killed run left beside `output` (see temp_prefix); one line on stderr each.
    Returns the paths removed. Call it before writing `output`, never while another run writes it."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    directory = os.path.dirname(os.path.abspath(output))
    base = os.path.basename(os.path.normpath(output))
    prefix = temp_prefix(output)
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if not (name.startswith(prefix) or _legacy_temp(name, base)):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log(f"removed {path}: left by an interrupted run")
        removed.append(path)
    return removed


def fsync_dir(path):
    """Make renames and new files in `path` durable (a crash after this keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cpu_budget(environ=None):
    """The CPUs this process is given: its affinity mask, capped by Slurm's SLURM_CPUS_PER_TASK and
    a cgroup v2 CPU quota (containers). Not os.cpu_count(), which counts the whole node."""
    environ = os.environ if environ is None else environ
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def follow_cpu_budget():
    """torch's intra-op threads = cpu_budget(), unless OMP_NUM_THREADS says otherwise (torchrun sets
    it to 1 per process). torch's own default counts the node's cores, so a tool on a shared node
    or in a small Slurm allocation would run more threads than it has CPUs."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(cpu_budget())


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


def _not_utf8(path, data, e, error, first_line=1):
    line = first_line + data.count(b"\n", 0, e.start)
    return error(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8")


def read_text(path, error=ValueError):
    """A UTF-8 text file's contents (a byte-order mark skipped); bytes that are not UTF-8 raise
    `error` naming the file and line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e, error) from None


def iter_json_objects(path, error=ValueError):
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object, or not UTF-8, raises `error` naming the file and line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:  # -sig: a byte-order mark is not part of the data
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, e, error, line_no) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise error(f"{path}:{line_no}: not a JSON object on this line ({e}); JSON lines "
                            f"(one object per line) expected") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{line_no}: expected a JSON object (JSON lines: one object per line)")
            yield line_no, record
