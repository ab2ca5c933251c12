#!/usr/bin/env python3
"""Checkpoint conversion and loading against transformers, measured in the same run: time
(each step a fresh process, wall clock including imports) and peak memory (VmHWM).

The source is a Hugging Face directory of BioMedLM's shape (random weights, bf16 safetensors,
as the released model). Each step's source is read once before it (so it is in the page cache,
as a model just downloaded or written is), and each step starts after `sync`. Rows:
transformers `from_pretrained` + `save_pretrained` (baseline) vs our HF -> ours TP2xPP2 and
ours -> HF (checked bit-identical to the source, same dtype); then loading for generation,
transformers `from_pretrained` vs our `load_for_inference`, in bf16 and fp32. The ratio column
is seconds / the matching transformers row, best against best.

    python benchmarks/convert.py                       # BioMedLM 2.7B (~16 GB of disk, ~16 GB RAM)
    python benchmarks/convert.py --model gpt2-medium
"""
import argparse
import math
import os
import shutil
import statistics
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
    """Run one step in this process and print its peak RSS."""
    kind, args = argv[0], argv[1:]
    t0 = time.time()
    if kind == "tool":  # tools/convert_checkpoint.py as a user runs it
        import runpy
        sys.argv = ["convert_checkpoint.py", *args]
        try:
            runpy.run_path(os.path.join(ROOT, "tools", "convert_checkpoint.py"), run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    elif kind in ("hf_load_save", "hf_load_save_sync"):  # transformers' own round trip: load, save
        from transformers import GPT2LMHeadModel
        GPT2LMHeadModel.from_pretrained(args[0], dtype="auto").save_pretrained(args[1])
        if kind == "hf_load_save_sync":  # on disk, as our converter leaves its output
            from megatron_biomed.convert.storage import sync_tree
            sync_tree(args[1])
    elif kind in ("hf_load", "ours_load"):  # load for generation, then one forward pass
        import torch
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args[1]]
        if kind == "hf_load":
            from transformers import GPT2LMHeadModel
            model = GPT2LMHeadModel.from_pretrained(args[0], dtype=dtype)
        else:
            from megatron_biomed.generation import load_for_inference
            model, _ = load_for_inference(args[0], "cpu", args[1], vocab_file=args[2], merge_file=args[3])
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]]))
    print(f"RESULT {time.time() - t0:.2f} {vm_hwm_gb():.3f}")


def measure(kind, *args):
    t0 = time.time()
    r = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{kind} {args} failed:\n{r.stderr[-3000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    _, peak = map(float, line.split()[1:])
    return wall, peak


def warm(root):
    """Read every file under `root` once, so a step reads its source from the page cache whatever
    wrote it (our converter writes with direct I/O, which leaves nothing there)."""
    buf = bytearray(64 << 20)
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def same_weights(a, b):
    """Every tensor of two HF directories bit-identical, in the same dtype."""
    import glob

    from megatron_biomed.convert import storage as S
    def tensors(d):
        out = {}
        for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            for name, entry in S.read_safetensors_header(f).items():
                out[name] = (f, entry)
        return out
    ta, tb = tensors(a), tensors(b)
    import torch
    return set(ta) == set(tb) and all(torch.equal(S.read_safetensors_tensor(*ta[k]), S.read_safetensors_tensor(*tb[k]))
                                      and ta[k][1][0] == tb[k][1][0] for k in ta), len(ta)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="biomedlm-2.7b", help="preset (biomedlm-2.7b, gpt2-medium, gpt2-small)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed at the end)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of all steps; each step's fastest and median "
                   "run are reported (the page cache and disk make single runs noisy)")
    args = p.parse_args()

    import torch

    from megatron_biomed.config import preset
    from megatron_biomed.convert.hf import write_hf
    from megatron_biomed.data import synthetic, tokenizer as T
    cfg = preset(args.model)
    work = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        source = RandomSource(cfg)
        n_params = sum(math.prod(s) for s, _ in source.specs.values())
        weights_gb = n_params * 2 / 2**30
        print(f"{args.model}: {n_params / 1e9:.2f}B parameters, bf16 weights = {weights_gb:.2f} GiB", flush=True)
        tok_dir = os.path.join(work, "tokenizer")
        texts = [d["text"] for d in synthetic.pubmed_like_documents(300, seed=1)]
        T.save_tokenizer(T.train_bpe(texts, vocab_size=1000, show_progress=False), tok_dir)
        vocab, merges = os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt")
        hf_src = os.path.join(work, "hf_bf16")
        t0 = time.time()
        write_hf(source, hf_src, torch.bfloat16, "5GB")
        print(f"wrote the random bf16 Hugging Face model in {time.time() - t0:.0f} s", flush=True)

        # Each round runs every step once, in order (each a fresh process, after `sync`, so
        # nothing an earlier step wrote is still going to the disk); rounds repeat --repeat
        # times and each step's fastest run is reported, so drift in the machine's speed over
        # the run touches all rows alike.
        tf_out, ours, back = (os.path.join(work, d) for d in ("hf_tf", "ours_tp2pp2", "hf_back"))
        base_label = "transformers: from_pretrained + save_pretrained"
        steps = [
            (base_label, None, tf_out, "hf_load_save", hf_src, tf_out),
            ("transformers: the same + fsync of its files", base_label, tf_out, "hf_load_save_sync", hf_src, tf_out),
            ("ours: HF -> ours TP2xPP2", base_label, ours, "tool", "--load", hf_src, "--save", ours,
             "--target-format", "megatron_biomed", "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2", "--no-tokenizer", "--force"),
            ("ours: ours TP2xPP2 -> HF", base_label, back, "tool", "--load", ours, "--save", back,
             "--target-format", "hf", "--no-tokenizer", "--force"),
        ]
        for dtype in ("bf16", "fp32"):
            label = f"transformers: from_pretrained ({dtype}) + 1 forward"
            steps.append((label, None, None, "hf_load", hf_src, dtype))
            steps.append((f"ours: load_for_inference ({dtype}) + 1 forward", label, None, "ours_load", ours, dtype,
                          vocab, merges))
        runs = {step[0]: [] for step in steps}
        identical = count = None
        for round_ in range(args.repeat):
            for label, _, output, kind, *a in steps:
                if output:  # the output of the previous round
                    shutil.rmtree(output, ignore_errors=True)
                warm(a[a.index("--load") + 1] if kind == "tool" else a[0])  # its source in the page cache
                os.sync()
                runs[label].append(measure(kind, *a))
                print(f"  round {round_ + 1}: {label}: {runs[label][-1][0]:.1f} s", flush=True)
                if label.startswith("ours: ours TP2xPP2 -> HF") and identical is None:
                    identical, count = same_weights(hf_src, back)
                    print(f"  round trip HF -> ours -> HF: {count} tensors, "
                          f"{'all bit-identical in the source dtype' if identical else 'DIFFERENT'}", flush=True)
        rows = []
        for label, baseline, *_ in steps:
            seconds, peak = min(r[0] for r in runs[label]), max(r[1] for r in runs[label])
            median = statistics.median(r[0] for r in runs[label])
            ratio = seconds / min(r[0] for r in runs[baseline]) if baseline else 1.0
            rows.append((label, seconds, median, peak, peak / weights_gb, ratio))
        print()
        print(f"| {args.model} ({n_params / 1e9:.2f}B, bf16 source) | best s | median s | best vs transformers "
              f"| peak RSS GiB | peak / bf16 weights |")
        print("|---|---|---|---|---|---|")
        for label, seconds, median, peak, ratio, vs in rows:
            print(f"| {label} | {seconds:.1f} | {median:.1f} | {vs:.2f}x | {peak:.2f} | {ratio:.2f}x |")
        print(f"\nround trip bit-identical in bf16: {identical}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
