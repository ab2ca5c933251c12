"""One training step of a tiny GPT in a given layout (run under torchrun by the tests).

Writes, from the tp=0/dp=0 rank of each pipeline rank, the updated full weights of its stages
plus the loss and gradient norm, for the test to compare with a single-process step.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_biomed.config import LayoutError, ParallelConfig, preset  # noqa: E402
from megatron_biomed.parallel import mesh as M  # noqa: E402
from megatron_biomed.parallel.parallelize import ParallelGPT  # noqa: E402


def batch(config, global_batch, seq, seed=7):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, config.vocab_size, (global_batch, seq + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def tiny_config(**kw):
    return preset("tiny-8l", hidden_dropout=0.0, attention_dropout=0.0, **kw)


def build_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--vpp", type=int, default=None, help="layers per virtual pipeline stage")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--sharding", default="none")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="bf16 parameters, fp32 main weights")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--many", default=None,
                   help="a JSON list of flag lists: run each layout in turn in this process group, its "
                        "results under --out/<index>/ (saves a process start per layout)")
    return p


def run_one(args, device):
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              sequence_parallel=args.sp, num_layers_per_virtual_pipeline_stage=args.vpp,
                              pipeline_schedule=args.schedule, data_parallel_sharding=args.sharding,
                              micro_batch_size=args.micro_batch, global_batch_size=args.global_batch)
    config = tiny_config(num_attention_heads=args.heads)
    try:
        parallel.validate(config, torch.distributed.get_world_size())
    except LayoutError as e:
        if torch.distributed.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    mesh = M.build_mesh(parallel)
    model = ParallelGPT(config, parallel, mesh, device, param_dtype=torch.bfloat16 if args.bf16 else None,
                        compile=args.compile)
    assert model.compile_problem is None or not args.compile, model.compile_problem
    tokens, targets = batch(config, args.global_batch, args.seq)
    opt = torch.optim.SGD(list(model.parameters()), lr=1.0)
    loss, norm = model.train_step(model.data_slice(tokens), model.data_slice(targets), opt, clip_grad=1.0)
    state = model.full_state_dict()
    os.makedirs(args.out, exist_ok=True)
    if mesh["tp"].get_local_rank() == 0 and mesh["dp"].get_local_rank() == 0:
        torch.save({"loss": loss, "grad_norm": norm, "state": state},
                   os.path.join(args.out, f"pp{mesh['pp'].get_local_rank()}.pt"))
    torch.distributed.barrier()
    return 0


def main():
    parser = build_parser()
    args = parser.parse_args()
    device = M.init_distributed("gloo")
    if args.many is None:
        code = run_one(args, device)
    else:
        code = 0
        for i, flags in enumerate(json.loads(args.many)):
            code = max(code, run_one(parser.parse_args([*map(str, flags), "--out", os.path.join(args.out, str(i))]),
                                     device))
    M.destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
