"""Evaluation-set contamination of a training corpus (tools/decontaminate.py).

An evaluation item leaks into the corpus when a document shares a word n-gram with it (13
words by default, as in the GPT-3 paper) after lower-casing and punctuation normalisation, or
when the document is an article the item is built from (PubMedQA and BioASQ carry PMIDs). Only
the evaluation n-grams are held in memory (as 64-bit hashes); the corpus is streamed in chunks
through a pool of worker processes. The report lists, per evaluation set, the contaminated
items and the documents they leak from; --drop writes the corpus without those documents and
--drop-ids their ids (for tools/pubmed_to_jsonl.py --exclude-pmids).
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


def gram_hashes(ws, n):
    """64-bit hashes of the n-word windows of `ws`; a text shorter than n is one window of
    its own length."""
    if len(ws) < n:
        return {xxhash.xxh3_64_intdigest(" ".join(ws).encode())} if ws else set()
    return {xxhash.xxh3_64_intdigest(" ".join(ws[i:i + n]).encode()) for i in range(len(ws) - n + 1)}


def item_text(example):
    """Everything of an evaluation item a model could have memorised: question, options, context."""
    return "\n".join([example.question, *example.options, example.context])


def _pmid(doc_id):
    """'12345' of a document id '12345' or 'PMID:12345' (PMC ids stay as they are)."""
    return doc_id.removeprefix("PMID:")


class EvalIndex:
    """The n-grams (hash -> items) and PMIDs (-> items) of the evaluation sets."""

    def __init__(self, sets, n):
        self.n, self.sets = n, sets  # sets: {name: [Example]}
        self.grams = collections.defaultdict(set)
        self.pmids = collections.defaultdict(set)
        self.short_lengths = set()  # items shorter than n words are matched at their own length
        for name, examples in sets.items():
            for i, e in enumerate(examples):
                ws = words(item_text(e))
                if 0 < len(ws) < n:
                    self.short_lengths.add(len(ws))
                for h in gram_hashes(ws, n):
                    self.grams[h].add((name, i))
                for p in e.pmids:
                    self.pmids[str(p)].add((name, i))

    def matching(self, doc_id, text):
        """(hashes of the document's n-grams found in the evaluation sets, PMID hit or None)."""
        ws = words(text)
        hits = {h for h in gram_hashes(ws, self.n) if h in self.grams}
        for length in self.short_lengths:
            if len(ws) >= length:
                hits |= {h for h in gram_hashes(ws, length) if h in self.grams}
        pmid = doc_id if _pmid(doc_id) in self.pmids else None
        return hits, pmid


_INDEX = None


def _init_worker(index):
    global _INDEX
    _INDEX = index


def _scan_chunk(chunk):
    """[(position, doc id, n-gram hashes, PMID hit)] for the contaminated documents of a chunk."""
    out = []
    for position, doc_id, text in chunk:
        hits, pmid = _INDEX.matching(doc_id, text)
        if hits or pmid:
            out.append((position, doc_id, sorted(hits), pmid))
    return out


def read_jsonl_corpus(path, text_key="text", id_key="id"):
    """(position, id, text incl. the title) of each document of a JSON lines corpus."""
    for line_no, record, text in read_jsonl_documents(path, text_key):
        yield line_no, str(record.get(id_key, line_no)), text


def read_indexed_corpus(prefix, tokenizer):
    """(position, id, text) of each document of a .bin/.idx dataset, its ids from the .ids file
    that tools/preprocess_data.py writes beside it (else the document number)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise CorpusError(f"{prefix}{ext}: no such file; give the dataset prefix (without .bin/.idx)")
    ds = IndexedDataset(prefix)
    docs = ds.document_indices
    ids = None
    if os.path.isfile(prefix + ".ids"):
        with open(prefix + ".ids", encoding="utf-8") as f:
            ids = f.read().split()
        if len(ids) != len(docs) - 1:
            raise CorpusError(f"{prefix}.ids: {len(ids)} ids for {len(docs) - 1} documents; it belongs to another "
                              f"dataset")
    for d in range(len(docs) - 1):
        tokens = [int(t) for s in range(docs[d], docs[d + 1]) for t in ds[s]]
        yield d + 1, ids[d] if ids else str(d + 1), tokenizer.decode(tokens)


def scan(index, docs, workers=None, chunk_docs=256, show_progress=True):
    """{position: (doc id, n-gram hashes, PMID hit)} of the contaminated documents."""
    found = {}
    bar = progress(total=None, unit=" docs", desc="scanning", disable=not show_progress)
    try:
        for part in map_chunks(_scan_chunk, docs, workers or os.cpu_count() or 1, _init_worker, index, bar,
                               chunk_docs):
            for position, doc_id, hits, pmid in part:
                found[position] = (doc_id, hits, pmid)
    finally:
        bar.close()
    return found


def report(index, found):
    """Per evaluation set: its items, the contaminated ones (by n-gram, by PMID) and the
    documents each leaks from."""
    leaks = collections.defaultdict(lambda: {"ngram_docs": set(), "pmid_docs": set()})
    for _, (doc_id, hits, pmid) in sorted(found.items()):
        for h in hits:
            for item in index.grams[h]:
                leaks[item]["ngram_docs"].add(doc_id)
        if pmid:
            for item in index.pmids[_pmid(pmid)]:
                leaks[item]["pmid_docs"].add(doc_id)
    out = {}
    for name, examples in index.sets.items():
        items = []
        for i, e in enumerate(examples):
            if (name, i) in leaks:
                leak = leaks[(name, i)]
                items.append({"id": e.id, "question": e.question[:200], "ngram_docs": sorted(leak["ngram_docs"]),
                              "pmid_docs": sorted(leak["pmid_docs"])})
        out[name] = {"items": len(examples), "contaminated": len(items),
                     "by_ngram": sum(1 for x in items if x["ngram_docs"]),
                     "by_pmid": sum(1 for x in items if x["pmid_docs"]),
                     "fraction": len(items) / len(examples) if examples else 0.0, "contaminated_items": items}
    return out


def table(result, ngram, corpus_docs, flagged):
    lines = [f"| evaluation set | items | contaminated | by {ngram}-gram | by PMID | % |", "|---|---|---|---|---|---|"]
    for name, r in result["sets"].items():
        lines.append(f"| {name} | {r['items']} | {r['contaminated']} | {r['by_ngram']} | {r['by_pmid']} | "
                     f"{100 * r['fraction']:.1f} |")
    lines.append(f"\n{flagged} of {corpus_docs} corpus documents contain evaluation text or are evaluation articles")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        description="Measure (and remove) evaluation-set contamination of a training corpus: word n-gram overlap "
                    "after lower-casing and punctuation normalisation, and PMIDs of the articles PubMedQA and "
                    "BioASQ items are built from.")
    p.add_argument("--eval", action="append", required=True, metavar="TASK=FILE",
                   help="an evaluation file as published, read with the task's reader (medmcqa, medqa, pubmedqa, "
                        "bioasq, mmlu); repeatable")
    p.add_argument("--corpus", required=True, help="JSON lines documents (tools/pubmed_to_jsonl.py output) or, with "
                                                   "--corpus-format indexed, a .bin/.idx dataset prefix")
    p.add_argument("--corpus-format", choices=["jsonl", "indexed"], default="jsonl")
    p.add_argument("--text-key", default="text")
    p.add_argument("--id-key", default="id", help="the document id field (PMID or PMCID)")
    p.add_argument("--vocab-file", default=None, help="indexed corpora: the tokenizer's vocab.json")
    p.add_argument("--merge-file", default=None, help="indexed corpora: the tokenizer's merges.txt")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram (13, as the GPT-3 paper)")
    p.add_argument("--cop-base", type=int, choices=[0, 1], default=None, help="MedMCQA: see tools/evaluate.py")
    p.add_argument("--report", default=None, help="write the full report (every contaminated item) as JSON")
    p.add_argument("--drop", default=None, help="write the JSON lines corpus without the contaminated documents")
    p.add_argument("--drop-ids", default=None, help="write the contaminated documents' ids, one per line "
                                                    "(tools/pubmed_to_jsonl.py --exclude-pmids takes the PMIDs)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    return add_debug_flag(p)


def read_eval_sets(specs, cop_base=None):
    from megatron_biomed.finetune.tasks import TASKS, read_task
    sets = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep or task not in TASKS:
            raise UsageError(f"--eval {spec!r}: give TASK=FILE with TASK one of {', '.join(sorted(TASKS))}")
        name = f"{task}:{os.path.basename(path)}"
        sets[name] = read_task(task, path, cop_base=cop_base)
    return sets


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.ngram < 1:
        raise UsageError(f"--ngram {args.ngram}: give 1 or more")
    if args.drop and args.corpus_format != "jsonl":
        raise UsageError("--drop writes a JSON lines corpus: use --drop-ids with an indexed corpus (and rebuild it "
                         "from JSON lines with tools/pubmed_to_jsonl.py --exclude-pmids)")
    for out in (args.report, args.drop, args.drop_ids):
        if out:
            clean_stale_temps(out)
    sets = read_eval_sets(args.eval, args.cop_base)
    index = EvalIndex(sets, args.ngram)
    print(f"evaluation sets: {', '.join(f'{k} ({len(v)} items)' for k, v in sets.items())}; "
          f"{len(index.grams)} distinct {args.ngram}-grams, {len(index.pmids)} PMIDs", file=sys.stderr)
    if args.corpus_format == "jsonl":
        if not os.path.isfile(args.corpus):
            raise CorpusError(f"--corpus {args.corpus}: no such file")
        docs = lambda: read_jsonl_corpus(args.corpus, args.text_key, args.id_key)  # noqa: E731
    else:
        from megatron_biomed.data.tokenizer import load_tokenizer
        tok = load_tokenizer("GPT2BPETokenizer", args.vocab_file, args.merge_file)
        docs = lambda: read_indexed_corpus(args.corpus, tok)  # noqa: E731
    counted = collections.Counter()

    def counting(it):
        for doc in it:
            counted["docs"] += 1
            yield doc
    found = scan(index, counting(docs()), args.workers, show_progress=not args.no_progress)
    result = {"ngram": args.ngram, "corpus": args.corpus, "corpus_documents": counted["docs"],
              "contaminated_documents": len(found), "sets": report(index, found)}
    print(table(result, args.ngram, counted["docs"], len(found)))
    if args.report:
        with atomic_output(args.report, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    if args.drop_ids:
        with atomic_output(args.drop_ids, "w", encoding="utf-8") as f:
            f.writelines(f"{doc_id}\n" for doc_id, _, _ in (found[k] for k in sorted(found)))
    if args.drop:
        kept = write_kept_lines(args.corpus, args.drop, found)
        print(f"wrote {args.drop}: {kept} documents kept, {len(found)} dropped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
