#!/usr/bin/env python3
"""Forward + backward throughput of our GPT vs Hugging Face GPT2LMHeadModel, same config and
weights, one process on CPU, measured in the same run (interleaved, median of repeats)."""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_biomed.config import preset  # noqa: E402
from megatron_biomed.convert import hf  # noqa: E402
from megatron_biomed.model.gpt import GPT  # noqa: E402


def step_time(model, x, y, ours):
    t = time.perf_counter()
    logits = model(x) if ours else model(x).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from transformers import GPT2LMHeadModel
    cfg = preset("biomedlm-2.7b", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=None,
                 num_attention_heads=args.heads, seq_length=args.seq)
    cfg = cfg.replace(ffn_hidden_size=4 * args.hidden)
    torch.manual_seed(0)
    models = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        models[f"megatron_biomed GPT ({backend} attention)"] = (GPT(cfg.replace(attention_backend=backend)), True)
    theirs = GPT2LMHeadModel(hf.to_hf_config(cfg))
    theirs.load_state_dict(hf.to_hf_state_dict(next(iter(models.values()))[0].state_dict(), cfg))
    models["transformers GPT2LMHeadModel (baseline)"] = (theirs, False)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    for m, _ in models.values():
        m.train()
    times = {k: [] for k in models}
    for r in range(args.repeats + 2):
        for name, (m, ours) in models.items():
            dt = step_time(m, x, y, ours)
            if r >= 2:  # warm-up
                times[name].append(dt)
    tokens = args.batch * args.seq
    base = statistics.median(times["transformers GPT2LMHeadModel (baseline)"])
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
          f"batch {args.batch}, vocab {cfg.vocab_size}, fp32, {torch.get_num_threads()} threads\n")
    print(f"| {'model':<44} | {'ms/step':>8} | {'tokens/s':>9} | {'vs HF':>6} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 11}|{'-' * 8}|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name:<44} | {med * 1e3:>8.1f} | {tokens / med:>9,.0f} | {base / med:>5.2f}x |")


if __name__ == "__main__":
    main()
