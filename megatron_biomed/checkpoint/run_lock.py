"""One run per save directory, and outputs kept apart from their inputs.

A run (pretraining, fine-tuning) holds an exclusive `flock` on `<save>/.run.lock` for its whole
life: a job submitted twice, or a requeued job beside a manual run, stops at start with one line
naming the holder (host, PID, Slurm job) instead of interleaving checkpoints with it. The OS
releases the lock when the holder dies, however it dies, so a killed or requeued job never has
to clean up. flock is honoured across nodes on NFS (Linux emulates it with POSIX locks there);
on Lustre the file system must be mounted with `-o flock`.
"""
import fcntl
import json
import os
import socket
import time

from megatron_biomed.errors import UsageError, UserError

LOCK_NAME = ".run.lock"
_held = {}  # realpath -> open file descriptor, kept for the life of the process


class RunLockError(UserError, RuntimeError):
    pass


def _describe(info):
    if not info:
        return "a process that left no details"
    parts = [f"host {info.get('host', '?')}", f"PID {info.get('pid', '?')}"]
    if info.get("slurm_job_id"):
        parts.append(f"Slurm job {info['slurm_job_id']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return ", ".join(parts)


def holder(directory):
    """What the lock file of `directory` says about its holder ({} when unreadable)."""
    try:
        with open(os.path.join(directory, LOCK_NAME), encoding="utf-8") as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def acquire(directory, flag="--save", tool="run"):
    """Take `directory`'s run lock for this process (idempotent); raise RunLockError naming the
    holder (what it is: `tool`, host, PID, Slurm job) when another process has it. Creating the directory and the lock file also finds a
    read-only or full file system before any work is done."""
    directory = os.path.abspath(directory)
    real = os.path.realpath(directory)
    if real in _held:
        return
    made_dir = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    made_file = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = holder(directory)
        raise RunLockError(f"{flag} {directory}: in use by another {info.get('tool', 'run')} ({_describe(info)}); "
                           f"wait for it to finish or stop it, or give another {flag}") from None
    info = {"tool": tool, "host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as e:  # a full disk: found now, before any work, and nothing left behind
        os.close(fd)
        if made_file:
            os.unlink(path)
        if made_dir:
            os.rmdir(directory)
        raise OSError(e.errno, e.strerror, path) from None
    _held[real] = fd


def _within(inner, outer):
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_apart(load, save, allow_same=False, load_flag="--load", save_flag="--save"):
    """Refuse an output that is, contains or lies inside its input: writing (or --force replacing)
    it would destroy the input. A training run may save where it loads (resuming) when
    `allow_same`; it still may not save inside a checkpoint or into a directory holding it."""
    if not load or not save:
        return
    same = os.path.realpath(load) == os.path.realpath(save)
    if same and allow_same:
        return
    if same or _within(save, load):
        where = "is" if same else "lies inside"
        raise UsageError(f"{save_flag} {save}: {where} {load_flag} {load}; writing there would overwrite the "
                         f"input: give a {save_flag} outside it")
    if _within(load, save) and not allow_same:
        raise UsageError(f"{save_flag} {save}: contains {load_flag} {load}; writing there would replace the "
                         f"input: give a {save_flag} outside it")
