#!/usr/bin/env python3
"""What --async-save buys: the step time of an iteration that carries a checkpoint save, with
the save synchronous and with it staged in memory and written in the background, in the same
run (same model, data and machine), against the iterations that save nothing.

Each setting trains pretrain_gpt for --iters iterations, saving every --save-interval, and reads
the per-iteration times from its log (log interval 1): an iteration after a save pays for the
save (synchronous) or for the staging and a writer thread competing for the cores (async).

    python benchmarks/async_save.py                       # 8 x 512 model, 1 process, CPU
    python benchmarks/async_save.py --nproc 2 --layers 12 --hidden 768 --dir /scratch/bench
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([\d.]+)")
SAVED = re.compile(r"saved \S+iter_(\d+) in ([\d.]+) s")
STAGED = re.compile(r"staged in memory in ([\d.]+) s")


def make_dataset(prefix, vocab, tokens, seed=0):
    from megatron_biomed.data.indexed import IndexedDatasetWriter
    rng = np.random.default_rng(seed)
    lengths = rng.integers(200, 2000, size=tokens // 1000)
    w = IndexedDatasetWriter(prefix, np.uint16, write_ids=False)
    w.add_documents(rng.integers(0, vocab - 1, size=int(lengths.sum())), lengths, np.ones(len(lengths), np.int64))
    w.finalize()


def run(args, workdir, data, async_save):
    save = os.path.join(workdir, "async" if async_save else "sync")
    shutil.rmtree(save, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "megatron_biomed.pretrain_gpt", "--model", "gpt2-small", "--num-layers", str(args.layers),
           "--hidden-size", str(args.hidden), "--num-attention-heads", str(args.hidden // 64), "--seq-length",
           str(args.seq), "--vocab-size", str(args.vocab), "--micro-batch-size", str(args.mbs), "--global-batch-size",
           str(args.mbs * args.nproc), "--train-iters", str(args.iters), "--lr", "1e-4", "--data-path", data,
           "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--save", save, "--save-interval",
           str(args.save_interval), "--hidden-dropout", "0", "--attention-dropout", "0"]
    if async_save:
        cmd.append("--async-save")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"pretrain_gpt failed ({'async' if async_save else 'sync'}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    steps = {int(i): float(ms) for i, ms in STEP.findall(r.stdout)}
    saves = {int(i): float(s) for i, s in SAVED.findall(r.stdout)}
    staged = [float(s) for s in STAGED.findall(r.stdout)]
    after_save = [steps[i + 1] for i in saves if i + 1 in steps]
    plain = [ms for i, ms in steps.items() if i > 1 and i - 1 not in saves]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(save, f"iter_{min(saves):07d}"))
               for f in fs)
    shutil.rmtree(save, ignore_errors=True)
    return {"plain_ms": statistics.median(plain), "after_save_ms": statistics.mean(after_save),
            "save_s": statistics.mean(saves.values()), "staged_s": statistics.mean(staged) if staged else None,
            "ckpt_gb": size / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--save-interval", type=int, default=4)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = p.parse_args()
    workdir = tempfile.mkdtemp(dir=args.dir, prefix="async_save_bench.")
    try:
        data = os.path.join(workdir, "data")
        make_dataset(data, args.vocab, tokens=args.iters * args.mbs * args.nproc * args.seq * 4)
        rows = [("synchronous save", run(args, workdir, data, False)), ("--async-save", run(args, workdir, data, True))]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = rows[0][1]
    print(f"\nCheckpoint saves during training: {args.layers} layers x {args.hidden}, seq {args.seq}, "
          f"{args.nproc} process(es), checkpoint {base['ckpt_gb']:.2f} GB, saved every {args.save_interval} "
          f"of {args.iters} iterations\n")
    print("| save | step, no save (ms) | step carrying a save (ms) | its cost over a plain step | save written in (s) "
          "| training blocked (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        blocked = r["staged_s"] if r["staged_s"] is not None else r["save_s"]
        print(f"| {name} | {r['plain_ms']:.0f} | {r['after_save_ms']:.0f} | {r['after_save_ms'] / r['plain_ms']:.2f}x "
              f"| {r['save_s']:.2f} | {blocked:.2f} |")
    a = rows[1][1]
    print(f"\nthe step carrying a save: async {a['after_save_ms'] / base['after_save_ms']:.2f}x the synchronous one")


if __name__ == "__main__":
    main()
