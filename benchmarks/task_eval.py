#!/usr/bin/env python3
"""What --eval-tasks costs, measured and at the BioMedLM preset.

1. Measured here: pretrain_gpt trains --iters iterations and scores a synthetic MedMCQA-like
   task (4 answers an item) every --interval iterations; from its log, the seconds of one task
   evaluation, and the training time of one iteration. A scored answer is one forward pass of a
   seq-length row; a trained sample is a forward and a backward pass (3 forwards' FLOPs), so the
   measured seconds per scored row over seconds per trained sample shows how efficient scoring
   is next to training (1/3 if as efficient).
2. At the preset (megatron_biomed/configs/biomedlm-2.7b.yaml: global batch 1024, seq 1024,
   --eval-interval 1000), by the planner's FLOP count: the share of training time that
   --eval-tasks takes with the default --eval-tasks-limit, for MedMCQA + MedQA + MMLU (4 answers)
   and PubMedQA (3), scaled by the measured efficiency of step 1.

    python benchmarks/task_eval.py                 # tiny model, 1 process, CPU
    python benchmarks/task_eval.py --layers 8 --hidden 512 --nproc 2
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([\d.]+)")
TASK = re.compile(r" medmcqa at iteration (\d+) \| acc [\d.]+ \| acc_norm [\d.]+ \| n (\d+) \| ([\d.]+) s")
PRESET_TASKS = {"medmcqa": 4, "medqa": 4, "mmlu": 4, "pubmedqa": 3}  # answers per item


def measure(args, work):
    from megatron_biomed.data import synthetic
    from benchmarks.async_save import make_dataset

    def write_jsonl(path, rows):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path
    make_dataset(os.path.join(work, "data"), 1000, 2_000_000)
    tok = os.path.join(work, "tok")
    corpus = write_jsonl(os.path.join(work, "corpus.jsonl"), synthetic.pubmed_like_documents(300, seed=1))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus,
                    "--output-dir", tok, "--vocab-size", "1000", "--no-progress"], check=True, capture_output=True)
    dev = write_jsonl(os.path.join(work, "dev.json"), synthetic.medmcqa_like(args.limit, 3))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "megatron_biomed.pretrain_gpt", "--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
           "--num-attention-heads", str(max(1, args.hidden // 64)), "--seq-length", str(args.seq),
           "--max-position-embeddings", str(args.seq), "--micro-batch-size", str(args.mbs),
           "--global-batch-size", str(args.gbs), "--train-iters", str(args.iters), "--lr", "1e-4",
           "--data-path", os.path.join(work, "data"), "--vocab-file", os.path.join(tok, "vocab.json"),
           "--merge-file", os.path.join(tok, "merges.txt"), "--eval-iters", "0", "--log-interval", "1",
           "--eval-tasks", f"medmcqa={dev}", "--eval-tasks-interval", str(args.interval),
           "--eval-tasks-limit", str(args.limit)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if r.returncode:
        sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
    steps = {int(i): float(ms) / 1000 for i, ms in STEP.findall(r.stdout)}
    tasks = [(int(i), int(n), float(s)) for i, n, s in TASK.findall(r.stdout)]
    # iterations that carry an evaluation are timed by the step log without it (the log comes first)
    step = statistics.median(v for i, v in steps.items() if i > 2)
    task_s = statistics.median(s for _, _, s in tasks)
    rows = tasks[0][1] * 4
    return {"step_s": step, "task_s": task_s, "rows": rows, "samples_per_step": args.gbs,
            "row_over_sample": (task_s / rows) / (step / args.gbs)}


def preset_share(efficiency, limit):
    """Share of training time at the BioMedLM preset, by FLOPs, scaled by the measured efficiency
    (a scored row costs `efficiency` trained samples' time; 1/3 when as efficient as training)."""
    import yaml
    cfg = yaml.safe_load(open(os.path.join(ROOT, "megatron_biomed", "configs", "biomedlm-2.7b.yaml")))
    rows = limit * sum(PRESET_TASKS.values())
    samples = cfg["eval-interval"] * cfg["global-batch-size"]
    return rows / samples / 3, rows * efficiency / samples, cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--limit", type=int, default=32, help="items scored (measured run)")
    p.add_argument("--preset-limit", type=int, default=None, help="--eval-tasks-limit at the preset "
                                                                 "(default: the flag's default)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from megatron_biomed.training.arguments import parse_args
    default_limit = parse_args(["--config", "tiny", "--data-path", "x"]).eval_tasks_limit
    limit = args.preset_limit or default_limit
    with tempfile.TemporaryDirectory() as work:
        m = measure(args, work)
    flops_share, measured_share, cfg = preset_share(m["row_over_sample"], limit)
    print(f"--eval-tasks cost: {args.layers} layers x {args.hidden}, seq {args.seq}, {args.nproc} process(es), CPU")
    print("| measured here | value |\n|---|---|")
    print(f"| training step ({m['samples_per_step']} samples) | {m['step_s'] * 1000:.1f} ms |")
    print(f"| one task evaluation ({m['rows']} rows) | {m['task_s'] * 1000:.1f} ms |")
    print(f"| a scored row / a trained sample | {m['row_over_sample']:.3f} (1/3 = as efficient as training) |")
    print(f"\nAt the preset (global batch {cfg['global-batch-size']}, --eval-interval {cfg['eval-interval']}), "
          f"--eval-tasks-limit {limit} on MedMCQA, MedQA, MMLU and PubMedQA "
          f"({limit * sum(PRESET_TASKS.values())} rows):")
    print(f"| share of training time | by FLOPs {flops_share:.3%} | at the measured efficiency {measured_share:.3%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(m, preset_limit=limit, preset_share_flops=flops_share,
                           preset_share_measured=measured_share), f, indent=2)


if __name__ == "__main__":
    main()
