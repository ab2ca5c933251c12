#!/usr/bin/env python3
"""Checkpoint conversion: time and peak memory (RSS) of tools/convert_checkpoint.py on a model
with random weights, against the usual way of converting (load every tensor into one state
dict, build the model, `save_pretrained`), measured in the same run.

Each conversion runs in a fresh process whose peak RSS (VmHWM) is read when it ends; the
ratio column is peak RSS / the size of one fp32 copy of the weights.

    python benchmarks/convert.py                       # BioMedLM 2.7B (needs ~45 GB of disk)
    python benchmarks/convert.py --model gpt2-medium --baseline
"""
import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class RandomSource:
    """A converter source with random weights, produced tensor by tensor."""

    def __init__(self, cfg):
        import torch

        from megatron_biomed.convert.common import expected_specs
        self.config, self.iteration, self.description = cfg, 0, "random weights"
        self.specs = expected_specs(cfg)
        self._torch = torch

    def model_tensor(self, name):
        shape = self.specs[name][0]
        g = self._torch.Generator().manual_seed(hash(name) % 2**31)
        return self._torch.randn(shape, generator=g) * 0.02

    def tokenizer(self):
        return None


def vm_hwm_gb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def child(argv):
    """Run one conversion (ours or the baseline) in this process and print its peak RSS."""
    kind, args = argv[0], argv[1:]
    t0 = time.time()
    if kind == "tool":
        from megatron_biomed.convert.cli import main
        code = main(args)
        if code:
            sys.exit(code)
    elif kind == "baseline_to_hf":  # what most converters do: everything in memory at once
        import torch
        from transformers import GPT2LMHeadModel

        from megatron_biomed.convert import hf
        from megatron_biomed.convert.ours import OursSource
        src = OursSource(args[0])
        state = {n: src.model_tensor(n) for n in src.specs}
        with torch.device("meta"):
            model = GPT2LMHeadModel(hf.to_hf_config(src.config))
        model.load_state_dict(hf.to_hf_state_dict(state, src.config), strict=False, assign=True)
        model.tie_weights()
        del state
        model.save_pretrained(args[1])
    print(f"RESULT {time.time() - t0:.2f} {vm_hwm_gb():.3f}")


def measure(kind, *args):
    r = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} {args} failed:\n{r.stderr[-3000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    seconds, peak = map(float, line.split()[1:])
    return seconds, peak


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="biomedlm-2.7b", help="preset (biomedlm-2.7b, gpt2-medium, gpt2-small)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the load-everything baseline (needs ~3x the weights in memory)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed at the end)")
    args = p.parse_args()

    from megatron_biomed.config import preset
    from megatron_biomed.convert.ours import model_size_bytes, write_ours
    cfg = preset(args.model)
    work = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        source = RandomSource(cfg)
        weights_gb = model_size_bytes(source) / 2**30
        n_params = sum(math.prod(s) for s, _ in source.specs.values())
        print(f"{args.model}: {n_params / 1e9:.2f}B parameters, one fp32 copy = {weights_gb:.2f} GiB", flush=True)
        ours = os.path.join(work, "ours_tp1")
        t0 = time.time()
        write_ours(source, ours)
        print(f"wrote the random checkpoint in {time.time() - t0:.0f} s", flush=True)

        rows = []

        def run(label, kind, *a):
            seconds, peak = measure(kind, *a)
            rows.append((label, seconds, peak, peak / weights_gb))
            print(f"  {label}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)

        hf_dir = os.path.join(work, "hf")
        run("ours -> HF (tools/convert_checkpoint.py)", "tool", "--load", ours, "--save", hf_dir,
            "--target-format", "hf", "--no-tokenizer")
        if args.baseline:
            run("ours -> HF, load everything + save_pretrained (baseline)", "baseline_to_hf", ours,
                os.path.join(work, "hf_baseline"))
            shutil.rmtree(os.path.join(work, "hf_baseline"), ignore_errors=True)
        back = os.path.join(work, "ours_from_hf")
        run("HF -> ours tp=2 (tools/convert_checkpoint.py)", "tool", "--load", hf_dir, "--save", back,
            "--target-format", "megatron_biomed", "--target-tensor-parallel-size", "2")
        shutil.rmtree(hf_dir)
        reshard = os.path.join(work, "ours_tp4pp2")
        run("ours tp=2 -> ours tp=4 pp=2 (tools/convert_checkpoint.py)", "tool", "--load", back, "--save", reshard,
            "--target-format", "megatron_biomed", "--target-tensor-parallel-size", "4",
            "--target-pipeline-parallel-size", "2")

        print()
        print(f"| conversion ({args.model}, {weights_gb:.2f} GiB of fp32 weights) | seconds | peak RSS GiB | "
              f"peak / weights |")
        print("|---|---|---|---|")
        for label, seconds, peak, ratio in rows:
            print(f"| {label} | {seconds:.1f} | {peak:.2f} | {ratio:.2f}x |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
