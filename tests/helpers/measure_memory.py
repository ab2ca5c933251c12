"""Peak memory of one training micro-batch on CPU, for the planner test: run in a fresh process.

Resident memory (VmHWM, reset through /proc/self/clear_refs) above what the process held before
the model was built: weights, AdamW state (created first, as after a step), then forward and
backward of one micro-batch. Prints the bytes.
"""
import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_biomed.config import ParallelConfig, preset  # noqa: E402
from megatron_biomed.parallel import mesh as M  # noqa: E402
from megatron_biomed.parallel.parallelize import ParallelGPT  # noqa: E402
from megatron_biomed.training.optimizer import build_optimizer, init_optimizer_state  # noqa: E402


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="preset:key=value,... e.g. tiny:hidden_size=256")
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--recompute", default=None)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    name, _, kv = a.config.partition(":")
    overrides = {k: type(getattr(preset(name), k))(v) for k, v in (x.split("=") for x in kv.split(",") if x)}
    cfg = preset(name, recompute_granularity=a.recompute, **overrides)
    torch.set_num_threads(1)
    device = M.init_distributed("gloo")
    parallel = ParallelConfig(micro_batch_size=a.mbs, global_batch_size=a.mbs)
    mesh = M.build_mesh(parallel)
    # warm up the kernels and allocator on a throwaway model, then give the memory back
    warm = ParallelGPT(cfg.replace(num_layers=1, vocab_size=128), ParallelConfig(), mesh, device)
    warm.forward_backward(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    del warm
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    model = ParallelGPT(cfg, parallel, mesh, device, param_dtype=torch.bfloat16 if a.bf16 else None)
    opt = build_optimizer(model, argparse.Namespace(lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                                                    adam_eps=1e-8), device)
    init_optimizer_state(opt)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (a.mbs, cfg.seq_length + 1), generator=g)
    model.forward_backward(data[:, :-1], data[:, 1:])
    print(rss("VmHWM") - base)
    M.destroy()


if __name__ == "__main__":
    main()
