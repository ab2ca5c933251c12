#!/usr/bin/env python3
"""Batched generation: our generate_batch vs transformers' batched `generate`, same weights,
same left-padded prompts, greedy, measured in the same run (interleaved, median of repeats).

tokens/s counts the new tokens of every row (prompt processing included in the time); no row
stops early (no end-of-text token), so both generate exactly --max-new-tokens per row. The
`same tokens` column is the share of new tokens equal to transformers' (greedy; in bf16 the two
kernels' rounding can make a near-tie go the other way and the rows part from there).

    python benchmarks/generate.py                          # CPU: gpt2-small shape, fp32
    python benchmarks/generate.py --model biomedlm-2.7b    # GPU default: bf16
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_biomed.config import preset  # noqa: E402
from megatron_biomed.convert import hf  # noqa: E402
from megatron_biomed.generation import generate, generate_batch  # noqa: E402
from megatron_biomed.model.gpt import GPT  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_run(model, prompts, new, **kw):
    if len(prompts) == 1 and not kw:
        return [generate(model, prompts[0], new)[0]]
    return [ids for ids, _ in generate_batch(model, prompts, new, **kw)]


LABELS = {"ours": "megatron_biomed", "ours-static": "megatron_biomed fixed-shape step",
          "ours-compiled": "megatron_biomed compiled step", "transformers": "transformers generate"}


@torch.no_grad()
def theirs_run(model, prompts, new, device):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a preset (default: biomedlm-2.7b on a GPU, gpt2-small on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,8,32 on a GPU, 1,8 on CPU)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", default="16-96", help="prompt lengths drawn from this range")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    from transformers import GPT2LMHeadModel
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    name = args.model or ("biomedlm-2.7b" if gpu else "gpt2-small")
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    sizes = [int(b) for b in (args.batch_sizes or ("1,8,32" if gpu else "1,8")).split(",")]
    lo, hi = (int(n) for n in args.prompt_tokens.split("-"))
    cfg = preset(name, hidden_dropout=0.0, attention_dropout=0.0)

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (seconds, not minutes, for 2.7B on a GPU)
        ours = GPT(cfg)
    ours = ours.to(dtype).eval()
    hf_cfg = hf.to_hf_config(cfg)
    with torch.device("meta"):
        theirs = GPT2LMHeadModel(hf_cfg)
    theirs.load_state_dict(hf.to_hf_state_dict(ours.state_dict(), cfg), assign=True, strict=False)
    theirs.tie_weights()
    theirs = theirs.to(device=device, dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None  # every row runs the full length, as ours

    g = torch.Generator().manual_seed(1)
    prompts_all = [torch.randint(0, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(max(sizes))]
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"generation: {name}, {dtype_name}, {where}, torch {torch.__version__}, prompts {lo}-{hi} tokens, "
          f"{args.max_new_tokens} new tokens per row, greedy, median of {args.repeats}\n", flush=True)
    rows = []
    for b in sizes:
        prompts = prompts_all[:b]
        runs = {"ours": lambda: ours_run(ours, prompts, args.max_new_tokens),
                "ours-static": lambda: ours_run(ours, prompts, args.max_new_tokens, static=True),
                "ours-compiled": lambda: ours_run(ours, prompts, args.max_new_tokens, compile=True),
                "transformers": lambda: theirs_run(theirs, prompts, args.max_new_tokens, device)}
        for fn in runs.values():  # warm-up: kernels chosen, caches allocated
            timed(fn, device)
        times, outs = {k: [] for k in runs}, {}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                dt, outs[k] = timed(fn, device)
                times[k].append(dt)
        tokens = b * args.max_new_tokens
        assert all(len(x) == args.max_new_tokens for k in runs for x in outs[k])
        base = statistics.median(times["transformers"])
        for k in runs:
            t = statistics.median(times[k])
            same = sum(a == c for x, y in zip(outs[k], outs["transformers"]) for a, c in zip(x, y))
            rows.append(dict(impl=k, batch_size=b, seconds=t, tokens_per_s=tokens / t, vs_transformers=base / t,
                             same_tokens=same / tokens))
    print(f"| {'implementation':<34} | {'batch':>5} | {'tokens/s':>9} | {'vs transformers':>15} | {'same tokens':>11} |")
    print(f"|{'-' * 36}|{'-' * 7}|{'-' * 11}|{'-' * 17}|{'-' * 13}|")
    for r in rows:
        label = LABELS[r["impl"]]
        print(f"| {label:<34} | {r['batch_size']:>5} | {r['tokens_per_s']:>9,.0f} | {r['vs_transformers']:>14.2f}x "
              f"| {r['same_tokens']:>10.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=name, dtype=dtype_name, device=where, torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
