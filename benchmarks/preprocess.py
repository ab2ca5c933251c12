#!/usr/bin/env python3
"""Benchmark tools/preprocess_data.py against Megatron-LM's approach, in the same run.

Corpus: generated PubMed-like JSONL (default 200 MB). Baseline (Megatron-LM's approach):
megatron-core's `IndexedDatasetBuilder` fed one document at a time, each encoded on its own by
the GPT-2 BPE tokenizer Megatron uses for `--tokenizer-type GPT2BPETokenizer` (megatron-core's
MegatronHFTokenizer loads transformers' GPT2Tokenizer with use_fast=False, a Python BPE).
A second, stricter reference feeds the builder the same way but encodes each document with the
Rust tokenizer we use (`Tokenizer.encode`). Ours: tools/preprocess_data.py with 1 and 2
workers. Prints a table with ratios to the baseline and checks that every run wrote
byte-identical .bin/.idx files.
"""
import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_biomed.data import synthetic, tokenizer  # noqa: E402


def make_corpus(path, megabytes):
    if os.path.exists(path) and os.path.getsize(path) >= megabytes * 1e6:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in synthetic.pubmed_like_documents(10**9, seed=1):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            if f.tell() >= megabytes * 1e6:
                break
    os.replace(tmp, path)


def baseline(corpus, tok_dir, prefix, python_bpe):
    """Megatron-LM's way: encode each document separately, add it to IndexedDatasetBuilder."""
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    if python_bpe:
        from transformers import GPT2Tokenizer
        slow = GPT2Tokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
        eod = slow.convert_tokens_to_ids(tokenizer.EOD_TOKEN)

        def encode(text):
            return slow.convert_tokens_to_ids(slow.tokenize(text))
    else:
        tok = tokenizer.load_tokenizer("HuggingFaceTokenizer", tokenizer_model=tok_dir)
        eod = tokenizer.eod_id(tok)

        def encode(text):
            return tok.encode(text, add_special_tokens=False).ids
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    t0 = time.time()
    docs = tokens = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ids = encode(json.loads(line)["text"]) + [eod]
            builder.add_item(torch.IntTensor(ids))
            builder.end_document()
            docs += 1
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return time.time() - t0, docs, tokens


def ours(corpus, tok_dir, prefix, workers):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
           "--tokenizer-model", tok_dir, "--append-eod", "--workers", str(workers), "--no-progress"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/megatron_biomed_bench")
    p.add_argument("--megabytes", type=float, default=200)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, f"corpus_{args.megabytes:g}MB.jsonl")
    t = time.time()
    make_corpus(corpus, args.megabytes)
    print(f"corpus: {corpus} ({os.path.getsize(corpus) / 1e6:.0f} MB, ready in {time.time() - t:.0f}s)")
    tok_dir = os.path.join(args.workdir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                        corpus, "--output-dir", tok_dir, "--max-documents", "20000",
                        "--no-sentence-splitter", "--no-progress"], check=True)

    out = os.path.join(args.workdir, "out")
    os.makedirs(out, exist_ok=True)
    rows = []
    secs, docs, tokens = baseline(corpus, tok_dir, os.path.join(out, "baseline"), python_bpe=True)
    rows.append(("Megatron-LM: builder + per-doc GPT2BPETokenizer (baseline)", 1, secs))
    secs, _, _ = baseline(corpus, tok_dir, os.path.join(out, "rust_per_doc"), python_bpe=False)
    rows.append(("builder + per-doc Rust Tokenizer.encode", 1, secs))
    for w in (1, 2):
        rows.append((f"tools/preprocess_data.py --workers {w}", w, ours(corpus, tok_dir, os.path.join(out, f"ours{w}"), w)))

    outputs = ["rust_per_doc"] + [f"ours{w}_text_document" for w in (1, 2)]
    identical = all(filecmp.cmp(os.path.join(out, "baseline" + ext), os.path.join(out, o + ext), shallow=False)
                    for o in outputs for ext in (".bin", ".idx"))
    base = rows[0][2]
    print(f"\n{docs:,} documents, {tokens:,} tokens, {os.cpu_count()} CPU cores\n")
    print(f"| {'method':<60} | {'processes':>9} | {'seconds':>8} | {'docs/s':>9} | {'tokens/s':>11} | {'vs baseline':>11} |")
    print(f"|{'-' * 62}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 13}|")
    for name, procs, s in rows:
        print(f"| {name:<60} | {procs:>9} | {s:>8.1f} | {docs / s:>9,.0f} | {tokens / s:>11,.0f} | {base / s:>10.2f}x |")
    print(f"\nall outputs byte-identical to the baseline's: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
