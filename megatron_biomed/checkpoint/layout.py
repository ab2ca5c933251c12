"""A run directory (`--save`/`--load`):

    iter_0000100/                      one complete checkpoint (.metadata, *.distcp, config.json,
                                       manifest.json)
    latest_checkpointed_iteration.txt  the iteration to resume from

How a save makes a checkpoint visible (training/checkpoint.py): write iter_N.tmp/ completely
(manifest last), move an existing iter_N aside to iter_N.old, rename iter_N.tmp -> iter_N,
replace the latest file atomically, delete iter_N.old. A kill between any two steps leaves
something `clean_stale` repairs on the next start: a .tmp is deleted (it never became a
checkpoint), an .old is deleted when its iter_N exists and renamed back when it does not (it was
complete when it was moved aside), temporary latest files are deleted.
"""
import contextlib
import json
import os
import re
import shutil

from megatron_biomed.checkpoint.metadata import CheckpointFormatError
from megatron_biomed.utils import atomic_output, fsync_dir

LATEST = "latest_checkpointed_iteration.txt"
CONFIG = "config.json"
_ITER = re.compile(r"^iter_(\d{7,})$")
_STALE = re.compile(r"^iter_(\d{7,})\.(tmp|old|pruned)$")


class LayoutError(ValueError):
    pass


def iteration_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def iteration_of(path):
    """N for a path ending in iter_N, else None."""
    m = _ITER.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def is_checkpoint_dir(path):
    return os.path.isfile(os.path.join(path, ".metadata"))


def read_latest(root):
    """The iteration latest_checkpointed_iteration.txt names, or None when there is none."""
    path = os.path.join(root, LATEST)
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise LayoutError(f"{path}: expected an iteration number, found {text[:40]!r}; write the iteration "
                          f"to resume from into it, or delete it to start from scratch")
    return int(text)


def write_latest(root, iteration):
    with atomic_output(os.path.join(root, LATEST), "w") as f:
        f.write(f"{iteration}\n")
    fsync_dir(root)


def complete_iterations(root):
    """Iterations with a complete-looking iter_N/ (has .metadata and config.json), newest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _ITER.match(name)
        d = os.path.join(root, name)
        if m and is_checkpoint_dir(d) and os.path.isfile(os.path.join(d, CONFIG)):
            out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def prunable(root, keep_last, keep_every=None):
    """Complete checkpoints that --keep-last-checkpoints/--keep-every let go, oldest first: not
    the newest `keep_last`, not a multiple of `keep_every`, never the one the latest file names."""
    latest = read_latest(root)
    iterations = complete_iterations(root)  # newest first
    keep = set(iterations[:keep_last]) | {latest}
    return sorted(i for i in iterations if i not in keep and not (keep_every and i % keep_every == 0))


def prune(root, keep_last, keep_every=None, log=print, hook=None):
    """Delete what `prunable` names. Each is renamed to iter_N.pruned first (atomic), so a kill
    never leaves a half-deleted iter_N that looks like a checkpoint; clean_stale finishes it."""
    removed = []
    for iteration in prunable(root, keep_last, keep_every):
        d = iteration_dir(root, iteration)
        os.replace(d, d + ".pruned")
        if hook is not None:
            hook(iteration)
        shutil.rmtree(d + ".pruned", ignore_errors=True)
        removed.append(iteration)
    if removed:
        fsync_dir(root)
        log(f"deleted checkpoint(s) {', '.join(map(str, removed))} (--keep-last-checkpoints {keep_last}"
            + (f", --keep-every {keep_every})" if keep_every else ")"))
    return removed


def clean_stale(root, log=print):
    """Repair what killed saves left in `root` (see the module docstring); one log line each.
    Only the process that saves (rank 0) may call this, before it saves."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(root, name)
        m = _STALE.match(name)
        if m and m.group(2) == "tmp":
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}: left by a save that was interrupted before it completed")
        elif m and m.group(2) == "pruned":
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}: a checkpoint whose deletion (--keep-last-checkpoints) was interrupted")
        elif m and m.group(2) == "old":
            final = os.path.join(root, f"iter_{m.group(1)}")
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
                log(f"removed {path}: the previous copy of a checkpoint that was saved again")
            else:
                os.replace(path, final)
                log(f"restored {final} from {path}: a save that replaced it was interrupted")
        elif name.startswith(f".{LATEST}."):
            os.unlink(path)
            log(f"removed {path}: a temporary file of an interrupted save")
    fsync_dir(root)


def detect_format(path):
    """'hf', 'megatron_biomed' or 'megatron_lm' for a checkpoint directory (a run directory or
    one iteration's), from the files it holds."""
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with contextlib.suppress(OSError, ValueError):
            with open(cfg) as f:
                d = json.load(f)
            if "model_type" in d or "architectures" in d or "n_embd" in d:
                return "hf"
            if "config" in d and os.path.isfile(os.path.join(path, ".metadata")):
                return "megatron_biomed"
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "megatron_lm"
    latest = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(latest):
        text = open(latest).read().strip()
        sub = os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}"
                           if text.isdigit() else text)
        if os.path.isfile(os.path.join(sub, "metadata.json")):
            return "megatron_lm"
        if os.path.isfile(os.path.join(sub, "config.json")):
            return "megatron_biomed"
    if not os.path.exists(path):
        raise CheckpointFormatError(f"--load {path}: no such directory")
    raise CheckpointFormatError(f"--load {path}: cannot tell its format (no config.json, metadata.json or "
                                f"latest_checkpointed_iteration.txt); pass --source-format")
