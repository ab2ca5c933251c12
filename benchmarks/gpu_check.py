#!/usr/bin/env python3
"""`make gpu-check`: prove a fresh GPU machine trains this project fast and right, in < 10 min.

Needs only a Python with CUDA torch (and this checkout; nothing is installed or downloaded).
Runs the GPU-only tests (tests/test_gpu.py: attention kernels, bf16 steps with and without
--compile, checkpoints on GPU, KV-cache generation), then benchmarks/train_throughput.py
(ours vs megatron-core, when importable, vs transformers), and writes both to a markdown file.
Without a CUDA GPU it says so and exits 0.
"""
import argparse
import datetime
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="gpu_check.md", help="the markdown report")
    p.add_argument("--bench-args", default="", help="extra arguments for train_throughput.py")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print(f"gpu-check: {sys.executable} has no torch: nothing to check (set GPU_PYTHON to a CUDA python)")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch sees none): nothing to check")
        return 0
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    name = torch.cuda.get_device_name()
    start = time.time()
    print(f"gpu-check on {name}, torch {torch.__version__}", flush=True)
    print("[1/2] GPU tests (tests/test_gpu.py)", flush=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=",
                            os.path.join(ROOT, "tests", "test_gpu.py")], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(tests.stdout, flush=True)
    results = re.findall(r"tests/test_gpu\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", tests.stdout)
    print(f"[2/2] training throughput ({time.time() - start:.0f} s so far)", flush=True)
    bench_md = os.path.join(ROOT, ".gpu_check_bench.md")
    bench = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"),
                            "--markdown", bench_md, *args.bench_args.split()], cwd=ROOT, env=env)
    table = open(bench_md, encoding="utf-8").read() if os.path.exists(bench_md) else "(the benchmark wrote no table)\n"
    if os.path.exists(bench_md):
        os.remove(bench_md)
    lines = [f"# gpu-check: {name}, torch {torch.__version__}, {datetime.date.today().isoformat()}", "",
             "| GPU test | result |", "|---|---|"]
    lines += [f"| {t} | {r} |" for t, r in results]
    lines += ["", table, f"Total time: {time.time() - start:.0f} s", ""]
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"gpu-check: wrote {args.output} in {time.time() - start:.0f} s", flush=True)
    return 0 if tests.returncode == 0 and bench.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
