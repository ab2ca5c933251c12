"""Duplicate removal for a JSON lines corpus (tools/dedup.py), after tools/pubmed_to_jsonl.py.

Three kinds of duplicates, each document compared with the documents kept before it (the first
of a group is kept):
  * exact: the same words after NFKC, lower-casing and punctuation removal (a 128-bit hash);
  * near: estimated Jaccard similarity of word-shingle sets at or above --threshold, found with
    MinHash LSH (datasketch) and confirmed on the two MinHash signatures;
  * an abstract and the PMC full text of the same article (pubmed_to_jsonl writes the full
    text's `pmid`): --prefer fulltext (default) drops the abstract, abstract drops the full
    text, both keeps the two.
Signatures are computed on all cores; only the signatures of kept documents are held.
"""
import argparse
import collections
import json
import os
import sys

import xxhash

from megatron_biomed.data.corpus import CorpusError, map_chunks, read_jsonl_documents, words, write_kept_lines
from megatron_biomed.errors import UsageError, add_debug_flag, entry_point
from megatron_biomed.utils import atomic_output, clean_stale_temps, progress

_SETTINGS = {}


def _init_worker(settings):
    _SETTINGS.update(settings)


def signature(text, num_perm, shingle, seed=1):
    """(exact-duplicate hash, LeanMinHash of its word shingles) of a document's text."""
    from datasketch import LeanMinHash, MinHash
    ws = words(text)
    exact = xxhash.xxh3_128_hexdigest(" ".join(ws).encode())
    grams = {" ".join(ws[i:i + shingle]).encode() for i in range(max(1, len(ws) - shingle + 1))}
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(grams))
    return exact, LeanMinHash(m)


def _signatures(chunk):
    return [(pos, signature(text, _SETTINGS["num_perm"], _SETTINGS["shingle"])) for pos, text in chunk]


def _pmid_of_abstract(doc_id):
    return int(doc_id[5:]) if doc_id.startswith("PMID:") and doc_id[5:].isdigit() else None


def pair_policy(path, prefer, text_key):
    """Line numbers to drop under --prefer: abstracts whose PMC full text is in the corpus
    (fulltext) or those full texts (abstract)."""
    if prefer == "both":
        return {}
    abstracts, fulltexts = {}, {}
    for line_no, record, _ in read_jsonl_documents(path, text_key):
        pmid = _pmid_of_abstract(str(record.get("id", "")))
        if pmid is not None:
            abstracts.setdefault(pmid, (line_no, record["id"]))
        elif record.get("source") == "pmc_fulltext" and isinstance(record.get("pmid"), int):
            fulltexts.setdefault(record["pmid"], (line_no, record["id"]))
    both = abstracts.keys() & fulltexts.keys()
    if prefer == "fulltext":
        return {abstracts[p][0]: fulltexts[p][1] for p in both}
    return {fulltexts[p][0]: abstracts[p][1] for p in both}


def dedup(path, output, threshold=0.8, num_perm=128, shingle=5, prefer="fulltext", text_key="text",
          workers=None, show_progress=True):
    """Write the kept documents of `path` (their lines byte for byte, in order) to `output`;
    returns (counts, removed [{id, reason, duplicate_of}])."""
    from datasketch import MinHashLSH
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold {threshold}: give a Jaccard similarity in (0, 1]")
    paired = pair_policy(path, prefer, text_key)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    exact_seen, kept_sigs, removed = {}, {}, []
    counts = collections.Counter()
    ids = {}

    def texts():  # the ids stay here; the workers get the texts
        for line_no, record, text in read_jsonl_documents(path, text_key):
            ids[line_no] = str(record.get("id", line_no))
            yield line_no, text
    drop = set()
    bar = progress(total=None, unit=" docs", desc="deduplicating", disable=not show_progress)
    try:
        for part in map_chunks(_signatures, texts(), workers or os.cpu_count() or 1, _init_worker,
                               {"num_perm": num_perm, "shingle": shingle}, bar):
            for line_no, (exact, m) in part:
                counts["documents"] += 1
                doc_id = ids.pop(line_no)
                if line_no in paired:
                    reason, other = ("abstract of a PMC full text" if prefer == "fulltext" else
                                     "PMC full text of an abstract"), paired[line_no]
                elif exact in exact_seen:
                    reason, other = "exact duplicate", exact_seen[exact]
                else:
                    near = [k for k in lsh.query(m) if kept_sigs[k].jaccard(m) >= threshold]
                    reason, other = ("near duplicate", min(near, key=lambda k: k[0])[1]) if near else (None, None)
                    if reason is None:
                        exact_seen[exact] = doc_id
                        key = (line_no, doc_id)
                        lsh.insert(key, m)
                        kept_sigs[key] = m
                if reason is not None:
                    drop.add(line_no)
                    counts[reason] += 1
                    removed.append({"id": doc_id, "reason": reason, "duplicate_of": other})
    finally:
        bar.close()
    counts["kept"] = write_kept_lines(path, output, drop)
    return counts, removed


def build_parser():
    p = argparse.ArgumentParser(
        description="Remove exact and near duplicates (MinHash LSH) from a JSON lines corpus and resolve PubMed "
                    "abstract / PMC full text pairs of the same article; the first document of a group is kept "
                    "and kept lines are written byte for byte, in order.")
    p.add_argument("--input", required=True, help="JSON lines documents (tools/pubmed_to_jsonl.py output)")
    p.add_argument("--output", required=True)
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity (of word shingles) at or "
                                                                "above which two documents are near duplicates")
    p.add_argument("--shingle", type=int, default=5, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--prefer", choices=["fulltext", "abstract", "both"], default="fulltext",
                   help="an abstract whose PMC full text is also in the corpus: keep the full text (default), the "
                        "abstract, or both")
    p.add_argument("--text-key", default="text")
    p.add_argument("--report", default=None, help="JSON: the counts and every removed document with its reason and "
                                                  "the kept document it duplicates")
    p.add_argument("--workers", type=int, default=None, help="processes for the signatures (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.shingle < 1 or args.num_perm < 16:
        raise UsageError("--shingle must be 1 or more and --num-perm 16 or more")
    if not os.path.isfile(args.input):
        raise CorpusError(f"--input {args.input}: no such file")
    for out in (args.output, args.report):
        if out:
            clean_stale_temps(out)
    counts, removed = dedup(args.input, args.output, args.threshold, args.num_perm, args.shingle, args.prefer,
                            args.text_key, args.workers, not args.no_progress)
    print(f"{counts['documents']} documents: {counts['exact duplicate']} exact duplicates, {counts['near duplicate']} "
          f"near duplicates (Jaccard >= {args.threshold}), "
          f"{counts['abstract of a PMC full text'] + counts['PMC full text of an abstract']} "
          f"{'abstracts with a PMC full text' if args.prefer == 'fulltext' else 'PMC full texts with an abstract'} "
          f"removed (--prefer {args.prefer}); {counts['kept']} kept -> {args.output}")
    if args.report:
        with atomic_output(args.report, "w", encoding="utf-8") as f:
            json.dump({"counts": dict(counts), "removed": removed}, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
