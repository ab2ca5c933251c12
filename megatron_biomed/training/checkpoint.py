"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, crash-safe, verified.

Layout of `--save` (checkpoint/layout.py):
    iter_0000100/              .metadata, __<rank>_0.distcp shards, config.json, manifest.json
    latest_checkpointed_iteration.txt

Every tensor is saved under its name in the full, unsharded model ("model.h.3.attn.c_attn.weight",
"optim.h.3.attn.c_attn.weight.exp_avg"), with its global shape: DTensor shards of any TP/FSDP
layout and the stages of any pipeline layout map onto the same keys, so a checkpoint loads into
any other layout. The tied output layer is stored once, as the embedding ("wte.weight").

A save writes iter_N.tmp/ completely, checksums included (checkpoint/manifest.py), and only then
makes it iter_N/ and the latest; a kill at any point leaves the previous checkpoint as the latest,
and what it left behind is repaired by the next save or start (checkpoint/layout.clean_stale).
A load verifies the checksums first; when `--load` names a run directory, a checkpoint that fails
is skipped, loudly, for the newest one that verifies.
"""
import errno
import functools
import json
import os
import shutil
import signal
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_biomed.checkpoint import layout as L
from megatron_biomed.checkpoint import manifest as MF
from megatron_biomed.checkpoint.layout import iteration_dir
from megatron_biomed.checkpoint.metadata import SafeFileSystemReader, read_dcp_metadata, storage_problems
from megatron_biomed.errors import UserError, find_os_error, one_line
from megatron_biomed.training.optimizer import init_optimizer_state
from megatron_biomed.utils import atomic_output, fsync_dir, print0


class CheckpointError(UserError, RuntimeError):
    pass


# Fault injection for the crash-safety tests: MEGATRON_BIOMED_TEST_KILL_AT=<point>@<iteration>
# makes rank 0 kill itself with SIGKILL at that point of that iteration's save.
KILL_POINTS = ("shards_written", "manifest_written", "moved_aside", "renamed", "latest_written", "pruning")


def _kill_point(point, iteration):
    spec = os.environ.get("MEGATRON_BIOMED_TEST_KILL_AT")
    if spec and spec == f"{point}@{iteration}" and dist.get_rank() == 0:
        print(f"test hook: kill -9 at {point} of the save of iteration {iteration}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def agree(error, group=None):
    """Collective: every rank learns whether any rank failed (a one-line message) and raises."""
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, one_line(error) if error is not None else None, group=group)
    failed = [m for m in messages if m]
    if failed:
        raise CheckpointError(failed[0])


def _disk_full(path):
    """torch.save's zip writer reports a short write as 'unexpected pos', without the errno."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def canonical_name(name):
    return "wte.weight" if name == "lm_head.weight" else name


def _model_items(model):
    return [(canonical_name(n), p) for n, p in model.named_parameters()]


def state_dict(model, optimizer, scaler=None, rank_rng=True):
    """The tensors of a checkpoint, keyed by full-model names (see the module docstring)."""
    sd = {}
    params = _model_items(model)
    for name, p in params:
        sd[f"model.{name}"] = p
    if optimizer is not None:
        init_optimizer_state(optimizer)
        for name, p in params:
            st = optimizer.state[p]
            for k in ("exp_avg", "exp_avg_sq", "step"):
                sd[f"optim.{name}.{k}"] = st[k]
    if scaler is not None:
        sd["train.loss_scaler"] = scaler.state_tensor()
    if rank_rng:
        # Per-rank streams (dropout): restored only into the same layout.
        r = dist.get_rank()
        sd[f"rng.rank{r}.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd[f"rng.rank{r}.cuda"] = torch.cuda.get_rng_state()
    return sd


def resolve_load(path):
    """(root, explicit dir or None): `path` is a run directory or one iter_N directory in it."""
    if L.is_checkpoint_dir(path) and L.iteration_of(path) is not None:
        return os.path.dirname(os.path.abspath(path)), path
    return path, None


def read_latest(path):
    """The iteration to load from `path` (a run directory or an iter_N directory), or None."""
    root, explicit = resolve_load(path)
    if explicit:
        return L.iteration_of(explicit)
    try:
        return L.read_latest(root)
    except L.LayoutError as e:
        raise CheckpointError(str(e)) from None


def saved_model_config(path):
    """The model settings (GPTConfig fields) of the checkpoint `path` names (its latest)."""
    iteration = read_latest(path)
    if iteration is None:
        raise CheckpointError(f"--load {path}: no checkpoint there; --use-checkpoint-args needs one")
    root, explicit = resolve_load(path)
    cfg = os.path.join(explicit or iteration_dir(root, iteration), L.CONFIG)
    try:
        with open(cfg) as f:
            return json.load(f)["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg}: no model settings ({type(e).__name__}: {e}); the file is damaged "
                              f"or not ours") from None


class PendingSave:
    """An --async-save in flight: the checkpoint was staged in memory and a background thread
    writes it, checksums it and (rank 0) makes it complete, collectively over its own gloo group.
    `wait()` returns the seconds it took or raises the save's CheckpointError (on every rank)."""

    def __init__(self, iteration, staged_seconds, finish):
        self.iteration, self.staged_seconds = iteration, staged_seconds
        self._result = None
        self._thread = threading.Thread(target=self._run, args=(finish,), name=f"async-save-{iteration}", daemon=True)
        self._thread.start()

    def _run(self, finish):
        try:
            self._result = finish()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread in wait()
            self._result = e

    def done(self):
        return not self._thread.is_alive()

    def wait(self):
        self._thread.join()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


def save(root, iteration, model, optimizer, scaler, config, consumed_samples, layout, kill_hook=None,
         keep_last=None, keep_every=None, async_group=None):
    """Collective: every rank calls it. On failure every rank raises CheckpointError, nothing is
    left under iter_N (unless it existed before, untouched) and the latest is unchanged.
    Returns the seconds it took, or with `async_group` (a gloo group used by checkpoint writes
    only) a PendingSave once the state is staged in memory: the rest happens in the background,
    with the same guarantees, and the checkpoint becomes the latest only when it is complete."""
    rank = dist.get_rank()
    final = iteration_dir(root, iteration)
    tmp, old = final + ".tmp", final + ".old"
    error = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            L.clean_stale(root, log=lambda m: print(m, flush=True))
            os.makedirs(tmp)
        except OSError as e:
            error = e
    agree(error)
    sd = state_dict(model, optimizer, scaler)
    sd["train.iteration"] = torch.tensor(iteration, dtype=torch.int64)
    sd["train.consumed_samples"] = torch.tensor(consumed_samples, dtype=torch.int64)
    t0 = time.time()
    finish = functools.partial(_write_and_publish, root, iteration, tmp, final, old, config, consumed_samples,
                               layout, kill_hook, keep_last, keep_every, t0)
    if async_group is None:
        return finish(lambda: dcp.save(sd, checkpoint_id=tmp), None)
    try:
        future = dcp.async_save(sd, checkpoint_id=tmp, process_group=async_group)  # staged in memory here
        write = future.result
    except Exception as e:  # noqa: BLE001 - e.g. out of host memory while staging: agreed on in the background
        def write(e=e):
            raise e
    return PendingSave(iteration, time.time() - t0, functools.partial(finish, write, async_group))


def _write_and_publish(root, iteration, tmp, final, old, config, consumed_samples, layout, kill_hook, keep_last,
                       keep_every, t0, write, group):
    """Every rank: write (dcp), checksum its shards; rank 0 publishes; all agree over `group`."""
    rank, world = dist.get_rank(), dist.get_world_size(group)
    error = None
    entries = {}
    try:
        write()
        # each rank checksums the shards it wrote (still in its page cache)
        entries = MF.file_entries(tmp, [n for n in os.listdir(tmp) if n.startswith(f"__{rank}_")])
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - disk full, read-only, ...: reported by every rank
        error = e if find_os_error(e) is not None or not _disk_full(tmp) else \
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
    gathered = [None] * world
    dist.all_gather_object(gathered, (one_line(error) if error is not None else None, entries), group=group)
    failed = [m for m, _ in gathered if m]
    error = None
    if rank == 0:
        try:
            if failed:
                raise CheckpointError(failed[0])
            _kill_point("shards_written", iteration)
            if kill_hook is not None:
                kill_hook(iteration)
            _publish(root, iteration, tmp, final, old, gathered, config, consumed_samples, layout)
            if keep_last:  # only now that the new checkpoint is complete and recorded
                try:
                    L.prune(root, keep_last, keep_every, log=lambda m: print(m, flush=True),
                            hook=lambda _: _kill_point("pruning", iteration))
                except OSError as e:  # the save itself succeeded: say so, and go on
                    print(f"warning: {one_line(e)} (deleting old checkpoints; they are kept)", flush=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(old) and not os.path.exists(final):
                os.replace(old, final)
    elif failed:
        error = CheckpointError(failed[0])
    try:
        agree(error, group)
    except CheckpointError as e:
        latest = L.read_latest(root) if os.path.isdir(root) else None
        raise CheckpointError(f"saving {final} failed: {e} (the latest checkpoint is still "
                              f"{iteration_dir(root, latest) if latest is not None else 'none'})") from None
    return time.time() - t0


def _publish(root, iteration, tmp, final, old, gathered, config, consumed_samples, layout):
    """Rank 0: config, manifest, then make iter_N and the latest point at it (see layout.py)."""
    meta = {"iteration": iteration, "consumed_samples": consumed_samples, "layout": layout,
            "world_size": dist.get_world_size(), "config": config}
    with atomic_output(os.path.join(tmp, L.CONFIG), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    entries = {}
    for _, e in gathered:
        entries.update(e)
    for name in os.listdir(tmp):
        if name not in entries and name != MF.MANIFEST:
            entries[name] = MF.file_entry(tmp, name)  # .metadata, config.json
    MF.write_manifest(tmp, entries)
    fsync_dir(tmp)
    _kill_point("manifest_written", iteration)
    if os.path.exists(final):  # saved before by a run that was killed before recording it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        _kill_point("moved_aside", iteration)
    os.replace(tmp, final)
    fsync_dir(root)
    _kill_point("renamed", iteration)
    L.write_latest(root, iteration)
    _kill_point("latest_written", iteration)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(root, keep_last=None, keep_every=None):
    """Collective: rank 0 repairs what killed saves left in `root` before anyone reads it, and
    finishes a --keep-last-checkpoints deletion a kill cut short."""
    error = None
    if dist.get_rank() == 0 and os.path.isdir(root):
        try:
            L.clean_stale(root, log=lambda m: print(m, flush=True))
            if keep_last and L.read_latest(root) is not None:
                L.prune(root, keep_last, keep_every, log=lambda m: print(m, flush=True))
        except (OSError, L.LayoutError) as e:
            error = e
    agree(error)


def _problems(d, verify):
    """Collective: what is wrong with checkpoint directory `d` (a list of messages naming files;
    [] when it is fine), plus a note when it has no manifest. Ranks share the checksumming."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local, note = [], None
    meta_path, cfg_path = os.path.join(d, ".metadata"), os.path.join(d, L.CONFIG)
    if not os.path.isfile(meta_path):
        local.append(f"{meta_path}: missing")
    elif verify:
        files = MF.read_manifest(d)
        if files is None:
            note = f"{d} has no {MF.MANIFEST} (saved by an older version): loading it without verification"
        else:
            names = sorted(files)
            local += MF.verify(d, names[rank::world]) if MF.MANIFEST not in files else \
                ([MF.check_file(d, MF.MANIFEST, files[MF.MANIFEST])] if rank == 0 else [])
    if not local and os.path.isfile(meta_path):
        try:
            with open(cfg_path) as f:
                json.load(f)
            local += storage_problems(d, read_dcp_metadata(meta_path))
        except (OSError, ValueError, UserError) as e:
            local.append(str(e) if isinstance(e, UserError) else f"{cfg_path}: unreadable ({type(e).__name__}: {e})")
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    problems = []
    for p in gathered:
        problems += [x for x in p if x not in problems]
    return problems, note


def _choose(path, verify):
    """Collective: (iteration, directory) to load, or None; falls back past checkpoints that fail
    verification when `path` is a run directory, and says so loudly."""
    root, explicit = resolve_load(path)
    if explicit:
        candidates = [(L.iteration_of(explicit), explicit)]
    else:
        latest = read_latest(root)
        if latest is None:
            return None
        older = [i for i in L.complete_iterations(root) if i < latest]
        candidates = [(i, iteration_dir(root, i)) for i in [latest] + older]
    failures = []
    for iteration, d in candidates:
        problems, note = _problems(d, verify)
        if not problems:
            if note:
                print0(f"note: {note}")
            if failures:
                bar = "!" * 100
                print0(f"{bar}\nWARNING: {'; '.join(failures)}\nWARNING: falling back to {d}, the newest "
                       f"checkpoint that verifies: training continues from iteration {iteration}\n{bar}")
            return iteration, d
        what = f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        if explicit:
            raise CheckpointError(f"{what}; --load names this checkpoint: name another iter_N directory or "
                                  f"the run directory (to fall back automatically), or pass "
                                  f"--no-verify-checkpoint to load it anyway")
        failures.append(f"checkpoint {d} fails verification: {what}")
    raise CheckpointError(f"--load {path}: no checkpoint verifies ({'; '.join(failures)}); restore the files "
                          f"from a copy, or pass --no-verify-checkpoint to load the latest anyway")


def load(root, model, optimizer, scaler, layout, load_optim=True, load_rng=True, verify=True):
    """Collective. Load the checkpoint `root` names (a run directory: its latest verified one; an
    iter_N directory: that one) into the model (and optimizer); returns (iteration,
    consumed_samples, saved meta, directory), or None when there is none."""
    chosen = _choose(root, verify)
    if chosen is None:
        return None
    iteration, d = chosen
    with open(os.path.join(d, L.CONFIG)) as f:
        meta = json.load(f)
    saved = read_dcp_metadata(os.path.join(d, ".metadata")).state_dict_metadata  # no arbitrary unpickling
    same_layout = meta.get("layout") == layout and meta.get("world_size") == dist.get_world_size()
    if load_optim and optimizer is not None and iteration == 0 and not any(k.startswith("optim.") for k in saved):
        load_optim = False  # an imported/converted model (no optimizer state yet): start the optimizer fresh
    sd = state_dict(model, optimizer if load_optim else None, scaler if load_optim else None,
                    rank_rng=load_rng and same_layout)
    sd["train.iteration"] = torch.zeros((), dtype=torch.int64)
    sd["train.consumed_samples"] = torch.zeros((), dtype=torch.int64)
    missing = [k for k in sd if k not in saved and not k.startswith("rng.")]
    if "train.loss_scaler" in missing:
        missing.remove("train.loss_scaler")  # bf16/fp32 checkpoint loaded for fp16 training: fresh scaler
        del sd["train.loss_scaler"]
    if missing:
        hint = ("it has no optimizer state: pass --no-load-optim or --finetune"
                if all(k.startswith("optim.") for k in missing) else "a checkpoint of another model?")
        raise CheckpointError(f"{d}: has no {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                              f"({hint})")
    for k in [k for k in sd if k.startswith("rng.") and k not in saved]:
        del sd[k]
    # The embedding is padded to a multiple of 128 x TP: another TP size can change its rows.
    padded = {k: v for k, v in sd.items() if k in saved and tuple(saved[k].size) != tuple(_global_shape(v))}
    for k in padded:
        if not _resizable(k, saved[k].size, _global_shape(padded[k])):
            raise CheckpointError(f"{d}: {k} has shape {tuple(saved[k].size)}, the model needs "
                                  f"{tuple(_global_shape(padded[k]))} (another model configuration?)")
        sd[k] = torch.empty(tuple(saved[k].size), dtype=padded[k].dtype)
    error = None
    try:
        dcp.load(sd, storage_reader=SafeFileSystemReader(d))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged file that no manifest could catch
        error = e
    try:
        agree(error)
    except CheckpointError as e:
        raise CheckpointError(f"{d}: cannot be read ({e}); load an earlier iter_N directory") from None
    for k, target in padded.items():
        _copy_rows(target, sd[k])
    if "train.loss_scaler" in sd and scaler is not None:
        scaler.load_state_tensor(sd["train.loss_scaler"])
    rank = dist.get_rank()
    if f"rng.rank{rank}.cpu" in sd:
        torch.set_rng_state(sd[f"rng.rank{rank}.cpu"])
    if f"rng.rank{rank}.cuda" in sd:
        torch.cuda.set_rng_state(sd[f"rng.rank{rank}.cuda"])
    return int(sd["train.iteration"]), int(sd["train.consumed_samples"]), meta, d


def _global_shape(t):
    return t.shape  # a DTensor's .shape is its global shape


def _resizable(key, saved_shape, shape):
    return ("wte.weight" in key and len(saved_shape) == len(shape) == 2 and saved_shape[1] == shape[1])


@torch.no_grad()
def _copy_rows(target, full):
    """Copy the shared leading rows of `full` into `target` (a DTensor or a tensor); the padded
    rows beyond the real vocabulary are zero."""
    rows = min(full.shape[0], target.shape[0])
    new = torch.zeros(tuple(target.shape), dtype=target.dtype)
    new[:rows] = full[:rows]
    if isinstance(target, DTensor):
        new = distribute_tensor(new.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(new.to_local())
    else:
        target.copy_(new.to(target.device))
