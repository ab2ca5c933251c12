#!/usr/bin/env python3
"""tools/decontaminate.py on a large corpus: throughput (documents, MB, words and BPE tokens per
second) and peak memory (the main process and its workers together), with 1 worker and with all
cores. Tokens are counted with a BioMedLM-style byte-level BPE (vocabulary 28,896) trained on
the corpus's own documents.

The corpus is synthetic PubMed-like JSON lines (--size-mb, 1 GB by default: a base of generated
abstracts repeated under new ids), the evaluation sets synthetic MedMCQA-format questions with
a few planted in the corpus, so the run also checks that exactly those are found.

    python benchmarks/decontaminate.py              # ~1 GB in a temp dir
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tree_rss_mb(pid):
    """Resident memory of a process and its children, MB (from /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1024


def run(cmd):
    """(seconds, peak tree RSS MB, stdout) of a command, sampling memory every 50 ms."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    out, err = proc.communicate()
    w.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{err[-2000:]}")
    return time.time() - t0, peak[0], out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--eval-items", type=int, default=4000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    from megatron_biomed.data import synthetic
    work = args.workdir or tempfile.mkdtemp(prefix="decontam_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        base = list(synthetic.pubmed_like_documents(20000, seed=1))
        from megatron_biomed.data.tokenizer import train_bpe
        tok = train_bpe((d["title"] + "\n" + d["text"] for d in base), vocab_size=28896, show_progress=False)
        base_tokens = [len(e.ids) for e in tok.encode_batch([d["title"] + "\n" + d["text"] for d in base])]
        mc = synthetic.medmcqa_like(args.eval_items, 2)
        planted = {}
        for k in range(5):  # long questions, five of them planted in the corpus
            mc[k]["question"] = f"In a study number {k} " + " ".join(synthetic.rare_word(__import__('random').Random(k))
                                                                    for _ in range(14))
        corpus, size, words, tokens, n = os.path.join(work, "corpus.jsonl"), 0, 0, 0, 0
        with open(corpus, "w") as f:
            while size < args.size_mb * 1e6:
                for d, d_tokens in zip(base, base_tokens):
                    d = dict(d, id=f"PMID:{10_000_000 + n}")
                    if n in (1000, 2000, 3000, 4000, 5000):
                        k = (1000, 2000, 3000, 4000, 5000).index(n)
                        d["text"] += " " + mc[k]["question"].upper() + "."
                        planted[d["id"]] = k
                    line = json.dumps(d) + "\n"
                    f.write(line)
                    size += len(line)
                    words += len(d["text"].split()) + len(d["title"].split())
                    tokens += d_tokens  # the planted questions' few tokens aside
                    n += 1
                    if size >= args.size_mb * 1e6:
                        break
        evalf = os.path.join(work, "medmcqa.json")
        with open(evalf, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in mc)
        print(f"corpus: {n:,} documents, {size / 1e9:.2f} GB, {words:,} words, {tokens:,} tokens; "
              f"{args.eval_items} evaluation items, "
              f"{len(planted)} planted; {os.cpu_count()} cores\n", flush=True)
        rows = []
        for workers in (1, os.cpu_count()):
            ids = os.path.join(work, f"ids{workers}.txt")
            seconds, peak, _ = run([sys.executable, os.path.join(ROOT, "tools", "decontaminate.py"), "--eval",
                                    f"medmcqa={evalf}", "--corpus", corpus, "--workers", str(workers), "--drop-ids",
                                    ids, "--no-progress"])
            found = open(ids).read().split()
            assert sorted(found) == sorted(planted), (found, planted)
            rows.append((workers, seconds, peak))
        print("| workers | seconds | documents/s | MB/s | words/s | tokens/s | peak RSS MB (all processes) |")
        print("|---|---|---|---|---|---|---|")
        for workers, seconds, peak in rows:
            print(f"| {workers} | {seconds:.1f} | {n / seconds:,.0f} | {size / 1e6 / seconds:.1f} | "
                  f"{words / seconds:,.0f} | {tokens / seconds:,.0f} | {peak:.0f} |")
        print(f"\nall {len(planted)} planted documents found, and no other, in every run")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
