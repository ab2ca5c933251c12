#!/usr/bin/env python3
"""Private, cheap inference on a CPU: greedy decoding with a BioMedLM-shaped model (2.7B, random
weights, the real shape) in our generator (fp32, bf16), transformers (fp32) and CTranslate2
(float32, int8), the same prompts for all, at batch 1 and 8, each engine in a fresh process.

Reports tokens/s (new tokens of every row), seconds per answer of --new-tokens tokens (a batch's
time over its rows), peak resident memory of the process (VmHWM) and the ratios to transformers.
No row stops early: every engine generates exactly --new-tokens per row.

    python benchmarks/cpu_inference.py                   # BioMedLM 2.7B: about 30 min on 2 cores
    python benchmarks/cpu_inference.py --model tiny      # a smoke run
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert import vm_hwm_gb  # noqa: E402  (benchmarks/convert.py: the process's peak RSS in GiB)

ENGINES = [("transformers", "fp32"), ("ours", "fp32"), ("ours", "bf16"), ("ctranslate2", "float32"),
           ("ctranslate2", "int8")]


def make_model(directory, preset_name):
    """A release-shaped directory: portable HF weights (bf16) of a randomly initialised preset, with
    a vocabulary of placeholder tokens (what CTranslate2's converter needs from a tokenizer). Every
    engine reads the same bf16 values; the fp32 ones compute on them exactly upcast."""
    import torch
    from megatron_biomed.config import preset
    from megatron_biomed.convert.hf import to_hf_config, to_hf_state_dict
    from megatron_biomed.model.gpt import GPT
    from safetensors.torch import save_file
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return
    os.makedirs(directory, exist_ok=True)
    cfg = preset(preset_name).replace(scale_attn_by_inverse_layer_idx=False, hidden_dropout=0.0,
                                      attention_dropout=0.0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # bf16 weights, as BioMedLM is released: 5.4 GB, not 10.8
    try:
        model = GPT(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    sd = to_hf_state_dict(model.state_dict(), cfg)
    del sd["lm_head.weight"], model  # tied
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    to_hf_config(cfg, dtype=torch.bfloat16).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size - 1)}
    vocab["<|endoftext|>"] = cfg.vocab_size - 1
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def prompts(vocab_size, batch, length=32):
    import random
    rng = random.Random(1)
    return [[rng.randrange(vocab_size - 1) for _ in range(length)] for _ in range(batch)]


def run_engine(engine, dtype, model_dir, batch, new):
    """In this (fresh) process: load, generate once, report as JSON."""
    import torch
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    ps = prompts(cfg["vocab_size"], batch)
    t0 = time.perf_counter()
    if engine == "transformers":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        load = time.perf_counter() - t0
        ids = torch.tensor(ps)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        rows = out[:, ids.shape[1]:].tolist()
    elif engine == "ours":
        from megatron_biomed.generation import generate, generate_batch, load_for_inference
        model, _ = load_for_inference(model_dir, "cpu", dtype)
        load = time.perf_counter() - t0
        t1 = time.perf_counter()
        rows = [generate(model, ps[0], new)[0]] if batch == 1 else [r for r, _ in generate_batch(model, ps, new)]
    else:
        import ctranslate2
        ct2_dir = model_dir + "-ct2"
        if not os.path.exists(os.path.join(ct2_dir, "model.bin")):
            from ctranslate2.converters import TransformersConverter
            TransformersConverter(model_dir).convert(ct2_dir, force=True)
        gen = ctranslate2.Generator(ct2_dir, device="cpu", compute_type=dtype,
                                    intra_threads=len(os.sched_getaffinity(0)))
        load = time.perf_counter() - t0
        vocab = {i: t for t, i in json.load(open(os.path.join(model_dir, "vocab.json"))).items()}
        t1 = time.perf_counter()
        res = gen.generate_batch([[vocab[i] for i in p] for p in ps], max_length=new, min_length=new,
                                 sampling_topk=1, include_prompt_in_result=False, end_token=[])
        rows = [r.sequences_ids[0] for r in res]
    seconds = time.perf_counter() - t1
    assert all(len(r) == new for r in rows), [len(r) for r in rows]
    return {"load_s": load, "seconds": seconds, "rows": rows, "peak_gib": vm_hwm_gb()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="biomedlm-2.7b", help="a preset of megatron_biomed/config.py")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "cpu_inference"))
    p.add_argument("--engines", default=",".join(f"{e}:{d}" for e, d in ENGINES))
    p.add_argument("--worker", nargs=4, metavar=("ENGINE", "DTYPE", "DIR", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        engine, dtype, model_dir, batch = args.worker
        print(json.dumps(run_engine(engine, dtype, model_dir, int(batch), args.new_tokens)))
        return
    model_dir = os.path.join(args.workdir, args.model)
    t = time.time()
    make_model(model_dir, args.model)
    print(f"model: {args.model} (random weights) in {model_dir} ({time.time() - t:.0f} s to make); "
          f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
    results = {}
    for batch in map(int, args.batch_sizes.split(",")):
        for spec in args.engines.split(","):
            engine, dtype = spec.split(":")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--new-tokens", str(args.new_tokens),
                                "--worker", engine, dtype, model_dir, str(batch)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{engine} {dtype} batch {batch}: failed\n{r.stderr[-2000:]}", flush=True)
                continue
            results[(engine, dtype, batch)] = json.loads(r.stdout.strip().splitlines()[-1])
            x = results[(engine, dtype, batch)]
            print(f"  {engine} {dtype} batch {batch}: {x['seconds']:.1f} s, peak {x['peak_gib']:.2f} GiB", flush=True)
    print(f"\n| engine | dtype | batch | tokens/s | s per {args.new_tokens}-token answer | peak memory GiB | "
          f"same tokens as transformers | speed vs transformers | memory vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (engine, dtype, batch), x in results.items():
        base = results.get(("transformers", "fp32", batch))
        tps = batch * args.new_tokens / x["seconds"]
        same = speed = mem = "n/a"
        if base:
            flat = [t for r in x["rows"] for t in r]
            ref = [t for r in base["rows"] for t in r]
            same = f"{sum(a == b for a, b in zip(flat, ref)) / len(ref):.0%}"
            speed = f"{base['seconds'] / x['seconds']:.2f}x"
            mem = f"{x['peak_gib'] / base['peak_gib']:.2f}x"
        print(f"| {engine} | {dtype} | {batch} | {tps:.2f} | {x['seconds'] / batch:.2f} | {x['peak_gib']:.2f} | "
              f"{same} | {speed} | {mem} |")


if __name__ == "__main__":
    main()
