#!/usr/bin/env python3
"""Benchmark tools/preprocess_data.py against Megatron-LM's approach, in the same run.

Corpus: generated PubMed-like JSONL (default 200 MB). Baseline (Megatron-LM's approach):
megatron-core's `IndexedDatasetBuilder` fed one document at a time, each encoded on its own by
the GPT-2 BPE tokenizer Megatron-LM uses for `--tokenizer-type GPT2BPETokenizer` (
Megatron-LM's gpt2_tokenization.py, a pure-Python BPE; re-implemented here as PythonGPT2BPE).
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


class PythonGPT2BPE:
    """GPT-2's byte-level BPE in pure Python: the algorithm of Megatron-LM's GPT2BPETokenizer
    (megatron/training/tokenizer/gpt2_tokenization.py): regex pre-tokenization, bytes mapped to
    printable characters, then the lowest-ranked adjacent pair merged until none is left, with
    a per-word cache. Re-implemented here; the byte-identical check below verifies it."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file, merges_file):
        import regex
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            pairs = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
        self.ranks = {p: i for i, p in enumerate(pairs)}
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        extra = iter(range(256, 512))
        self.byte_char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
        self.pattern = regex.compile(self.PATTERN)
        self.cache = {}

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, _ = min(ranked)
            if best == float("inf"):
                break
            first, second = parts[min(ranked)[1]], parts[min(ranked)[1] + 1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            if word not in self.cache:
                self.cache[word] = [self.vocab[t] for t in self._bpe(word)]
            ids.extend(self.cache[word])
        return ids


def baseline(corpus, tok_dir, prefix, python_bpe):
    """Megatron-LM's way: encode each document separately, add it to IndexedDatasetBuilder."""
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    if python_bpe:
        bpe = PythonGPT2BPE(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
        eod, encode = bpe.vocab[tokenizer.EOD_TOKEN], bpe.encode
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
