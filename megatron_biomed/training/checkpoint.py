"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, crash-safe.

Layout of `--save`:
    iter_0000100/              .metadata, __<rank>_0.distcp shards, config.json
    latest_checkpointed_iteration.txt

Every tensor is saved under its name in the full, unsharded model ("model.h.3.attn.c_attn.weight",
"optim.h.3.attn.c_attn.weight.exp_avg"), with its global shape: DTensor shards of any TP/FSDP
layout and the stages of any pipeline layout map onto the same keys, so a checkpoint loads into
any other layout. The tied output layer is stored once, as the embedding ("wte.weight").

A checkpoint is written to iter_N.tmp/, then renamed to iter_N/, and only then is
latest_checkpointed_iteration.txt replaced (atomically). A save killed at any point therefore
leaves the previous checkpoint as the latest, and a .tmp directory is never read.
"""
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_biomed.convert.storage import SafeFileSystemReader, read_dcp_metadata
from megatron_biomed.training.optimizer import init_optimizer_state
from megatron_biomed.utils import atomic_output

LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


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


def read_latest(root):
    """The latest complete iteration in `root`, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None
    d = iteration_dir(root, iteration)
    if not os.path.exists(os.path.join(d, ".metadata")):
        raise CheckpointError(f"{path} names iteration {iteration} but {d}/.metadata is missing")
    return iteration


def saved_model_config(root):
    """The model settings (GPTConfig fields) of the latest checkpoint in `root`."""
    iteration = read_latest(root)
    if iteration is None:
        raise CheckpointError(f"--use-checkpoint-args: no checkpoint in --load {root}")
    path = os.path.join(iteration_dir(root, iteration), "config.json")
    try:
        with open(path) as f:
            return json.load(f)["config"]["model"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: no model settings ({e})") from None


def save(root, iteration, model, optimizer, scaler, config, consumed_samples, layout, kill_hook=None):
    """Collective: every rank calls it."""
    rank = dist.get_rank()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        os.makedirs(tmp)
    dist.barrier()
    sd = state_dict(model, optimizer, scaler)
    sd["train.iteration"] = torch.tensor(iteration, dtype=torch.int64)
    sd["train.consumed_samples"] = torch.tensor(consumed_samples, dtype=torch.int64)
    t0 = time.time()
    dcp.save(sd, checkpoint_id=tmp)
    dist.barrier()
    if kill_hook is not None:
        kill_hook(iteration)
    if rank == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples, "layout": layout,
                "world_size": dist.get_world_size(), "config": config}
        with atomic_output(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(root)
        with atomic_output(os.path.join(root, LATEST), "w") as f:
            f.write(f"{iteration}\n")
        _fsync_dir(root)
    dist.barrier()
    return time.time() - t0


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(root, model, optimizer, scaler, layout, load_optim=True, load_rng=True):
    """Load the latest checkpoint in `root` into the model (and optimizer); returns
    (iteration, consumed_samples, saved meta), or None when `root` has none."""
    iteration = read_latest(root)
    if iteration is None:
        return None
    d = iteration_dir(root, iteration)
    with open(os.path.join(d, "config.json")) as f:
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
    dcp.load(sd, storage_reader=SafeFileSystemReader(d))
    for k, target in padded.items():
        _copy_rows(target, sd[k])
    if "train.loss_scaler" in sd and scaler is not None:
        scaler.load_state_tensor(sd["train.loss_scaler"])
    rank = dist.get_rank()
    if f"rng.rank{rank}.cpu" in sd:
        torch.set_rng_state(sd[f"rng.rank{rank}.cpu"])
    if f"rng.rank{rank}.cuda" in sd:
        torch.cuda.set_rng_state(sd[f"rng.rank{rank}.cuda"])
    return int(sd["train.iteration"]), int(sd["train.consumed_samples"]), meta


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
