"""Before the first training job on a cluster: do the ranks reach each other, how fast, and do
the nodes share a filesystem? `python -m megatron_biomed.preflight --help`.

Launch it as training is launched, one process per GPU (slurm/preflight.sbatch does):
    srun --nodes 2 --ntasks-per-node 8 python -m megatron_biomed.preflight --shared-dir $PWD
It reports, from rank 0:
  - the shared filesystem: every node writes a file under --shared-dir and every other node
    must read it back (checkpoints, data caches and logs rely on this);
  - the bus bandwidth of an all-reduce among each node's ranks, and among all ranks
    (nccl-tests' definition: algorithm bandwidth x 2(n-1)/n);
  - each link between neighbouring nodes (a ring over the nodes): send/receive bandwidth between
    their first ranks, and which link is the slowest.
Exit code 1 when the filesystem is not shared or a figure is below --min-bus-bandwidth.
"""
import argparse
import os
import secrets
import socket
import sys
import time

import torch
import torch.distributed as dist

from megatron_biomed.errors import entry_point
from megatron_biomed.parallel import mesh as M


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_biomed.preflight", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--shared-dir", default=".",
                   help="a directory every node should see (default: the working directory); a subdirectory "
                        "is written there and removed")
    p.add_argument("--size-mb", type=float, default=None,
                   help="buffer size in MiB (default 256 on GPU, 16 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (default 20 on GPU, 5 on CPU)")
    p.add_argument("--min-bus-bandwidth", type=float, default=None, metavar="GBPS",
                   help="fail when a node's, a link's or the whole job's bandwidth is below this (GB/s)")
    p.add_argument("--distributed-timeout-minutes", type=int, default=5,
                   help="how long a rank waits for the others before failing (default 5)")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, iters, device):
    fn()  # warm-up: connections and buffers are set up outside the timing
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _bus_bandwidth(buf, group, n, iters, device):
    """nccl-tests' bus bandwidth of an all-reduce of `buf` among the `n` ranks of `group` (GB/s)."""
    seconds = _timed(lambda: dist.all_reduce(buf, group=group), iters, device)
    return buf.numel() * buf.element_size() / seconds * 2 * (n - 1) / n / 1e9


def _link_bandwidth(buf, a, b, rank, iters, device):
    """a sends `buf` to b and b sends it back, `iters` times: bytes moved per second (GB/s) at a."""
    def ping_pong():
        if rank == a:
            dist.send(buf, b)
            dist.recv(buf, b)
        elif rank == b:
            dist.recv(buf, a)
            dist.send(buf, a)
    seconds = _timed(ping_pong, iters, device)
    return 2 * buf.numel() * buf.element_size() / seconds / 1e9


def _check_shared_dir(path, token, nodes, host, leader):
    """Each node's first rank writes <path>/.preflight-<token>/<host>; then each reads the others'.
    Returns, on every rank, a list of (reader, writer) pairs that failed."""
    d = os.path.join(os.path.abspath(path), f".preflight-{token}")
    problems = []
    if leader:
        try:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, host), "w") as f:
                f.write(f"{host} {token}\n")
        except OSError as e:
            problems.append((host, None, f"cannot write in {path}: {e.strerror}"))
    dist.barrier()
    if leader:
        for other in nodes:
            if other == host:
                continue
            try:
                with open(os.path.join(d, other)) as f:
                    ok = f.read() == f"{other} {token}\n"
            except OSError:
                ok = False
            if not ok:
                problems.append((host, other, f"{host} cannot read the file {other} wrote in {path}"))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    dist.barrier()
    if leader:
        try:
            os.remove(os.path.join(d, host))
            os.rmdir(d)  # the last node to get here removes the directory
        except OSError:
            pass
    return [p for ps in everyone for p in ps]


@entry_point
def main(argv=None):
    args = parse_args(argv)
    device = M.init_distributed(timeout_minutes=args.distributed_timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    size_mb = args.size_mb or (256 if device.type == "cuda" else 16)
    iters = args.iters or (20 if device.type == "cuda" else 5)
    host = socket.gethostname()
    hosts = [None] * world
    dist.all_gather_object(hosts, host)
    nodes = list(dict.fromkeys(hosts))  # in rank order
    node_ranks = {n: [r for r, h in enumerate(hosts) if h == n] for n in nodes}
    leaders = [node_ranks[n][0] for n in nodes]
    token = [secrets.token_hex(4) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)

    problems = _check_shared_dir(args.shared_dir, token[0], nodes, host, rank in leaders)

    buf = torch.ones(int(size_mb * 2**20) // 4, dtype=torch.float32, device=device)
    per_node = {}
    for n in nodes:  # every rank joins every group's creation, as torch.distributed requires
        group = dist.new_group(node_ranks[n])
        if host == n and len(node_ranks[n]) > 1:
            per_node[n] = _bus_bandwidth(buf, group, len(node_ranks[n]), iters, device)
    links = []
    ring = [(leaders[i], leaders[(i + 1) % len(leaders)]) for i in range(len(leaders) if len(leaders) > 2 else 1)] \
        if len(leaders) > 1 else []
    for a, b in ring:
        gbps = _link_bandwidth(buf, a, b, rank, iters, device)
        links.append((hosts[a], hosts[b], gbps if rank == a else None))
        dist.barrier()
    overall = _bus_bandwidth(buf, None, world, iters, device) if world > 1 else None

    gathered = [None] * world
    dist.all_gather_object(gathered, (per_node, [(x, y, g) for x, y, g in links if g is not None]))
    node_bw = {n: g for pn, _ in gathered for n, g in pn.items()}
    link_bw = [link for _, ls in gathered for link in ls]
    failed = bool(problems)
    floor = args.min_bus_bandwidth
    if rank == 0:
        backend = dist.get_backend()
        iface = os.environ.get("NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME") or "(not set)"
        print(f"preflight: {world} rank(s) on {len(nodes)} node(s), {backend} on "
              f"{'GPUs' if device.type == 'cuda' else 'CPUs'}, interface {iface}, {size_mb:g} MiB x {iters}")
        if problems:
            for _, _, what in problems:
                print(f"error: --shared-dir {args.shared_dir}: {what}; checkpoints, data caches and logs need one "
                      f"filesystem on every node: give a directory on it")
        else:
            print(f"shared filesystem: ok ({args.shared_dir}: a file written on each node was read on every other)")
        rows = [("node", "ranks", "all-reduce bus bandwidth")]
        for n in nodes:
            g = node_bw.get(n)
            rows.append((n, str(len(node_ranks[n])), f"{g:.2f} GB/s" if g is not None else "one rank: none"))
        slowest = min(link_bw, key=lambda x: x[2]) if link_bw else None
        for x, y, g in link_bw:
            rows.append((f"{x} <-> {y}", "1 + 1", f"{g:.2f} GB/s (send/receive)" +
                         ("  <- slowest link" if len(link_bw) > 1 and (x, y, g) == slowest else "")))
        if overall is not None:
            rows.append(("all nodes", str(world), f"{overall:.2f} GB/s"))
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        for r in rows:
            print(f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}")
        if slowest is not None:
            print(f"slowest link: {slowest[0]} <-> {slowest[1]} at {slowest[2]:.2f} GB/s")
        if floor is not None:
            low = [(what, g) for what, g in [*node_bw.items(), *[(f"{x} <-> {y}", g) for x, y, g in link_bw],
                                             ("all nodes", overall)] if g is not None and g < floor]
            for what, g in low:
                print(f"error: --min-bus-bandwidth {floor:g}: {what} reached {g:.2f} GB/s; check that node's network "
                      f"(NETWORK_INTERFACE / NCCL_SOCKET_IFNAME, the InfiniBand links) before training on it")
            failed = failed or bool(low)
        print("preflight: " + ("FAILED" if failed else "ok"), flush=True)
    verdict = [failed]
    dist.broadcast_object_list(verdict, src=0)
    M.destroy()
    if verdict[0]:
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
