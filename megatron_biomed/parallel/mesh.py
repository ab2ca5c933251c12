"""Process group and device mesh from the torchrun or Slurm environment."""
import errno
import datetime
import os
import re
import socket

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from megatron_biomed.errors import UserError


def _first_host(nodelist):
    """First host of a Slurm nodelist such as 'gpu[003-005,007],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def distributed_env(environ=os.environ):
    """(rank, world_size, local_rank, master_addr, master_port) from torchrun or Slurm variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
        local = int(environ.get("SLURM_LOCALID", 0))
    else:  # one process (init_distributed then binds no port)
        return 0, 1, 0, "127.0.0.1", int(environ.get("MASTER_PORT") or 0) or free_port()
    addr = environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    port = int(environ.get("MASTER_PORT") or 20000 + int(environ.get("SLURM_JOB_ID", "9500")) % 40000)
    return rank, world, local, addr, port


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUseError(UserError, RuntimeError):
    pass


def _address_in_use(e):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.EADDRINUSE or "EADDRINUSE" in str(e) or "address already in use" \
                in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def init_distributed(backend=None, timeout_minutes=None):
    """Join (or create) the default process group; NCCL on GPU, gloo on CPU. Idempotent.
    `timeout_minutes`: how long a collective may wait (--distributed-timeout-minutes)."""
    rank, world, local, addr, port = distributed_env()
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    kw = {"timeout": datetime.timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized() and world == 1:
        # nobody to meet: an in-memory store, no port bound (single-process jobs sharing a node, or
        # an array job's tasks, never collide) and no MASTER_* variables left for later processes
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    elif not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, **kw)
        except Exception as e:  # noqa: BLE001 - torch raises DistNetworkError / RuntimeError
            if not _address_in_use(e):
                raise
            raise PortInUseError(f"MASTER_PORT {os.environ['MASTER_PORT']}: already in use on "
                                 f"{os.environ['MASTER_ADDR']} (another job on this node?); set MASTER_PORT to a "
                                 f"free port, or leave it unset under srun (a port from the job id is used)") from None
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def collective_timeout_minutes():
    """The default process group's collective timeout, as its backend holds it."""
    pg = dist.distributed_c10d._get_default_group()
    device = torch.device("cuda") if torch.cuda.is_available() and dist.get_backend() == "nccl" else torch.device("cpu")
    return pg._get_backend(device).options._timeout.total_seconds() / 60


def build_mesh(parallel, device_type="cpu"):
    """The (pp, dp, tp) mesh; tp varies fastest across ranks, as in Megatron."""
    world = dist.get_world_size()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    return init_device_mesh(device_type, (pp, world // (tp * pp), tp), mesh_dim_names=("pp", "dp", "tp"))


def destroy():
    """Tear down cleanly: without the barrier, DTensor/DCP runs under gloo often crash at exit."""
    import gc
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
