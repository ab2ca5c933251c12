"""JSONL documents -> Megatron indexed datasets (tools/preprocess_data.py).

Same flags and output names as Megatron-LM's tools/preprocess_data.py. How it is fast and
bounded: the input is cut into byte ranges on line boundaries; worker processes each read a
range, parse it and encode all its documents in one `encode_batch_fast` call of the Rust
tokenizer, and send back packed numpy token arrays, which the writer appends in input order.
Nothing holds more than a few ranges at a time. With --partitions P, P writer processes each
take a contiguous share of the input and their outputs are concatenated at the end, so the
result is identical to a single-partition run.
"""
import argparse
import functools
import glob
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from megatron_biomed.data import indexed
from megatron_biomed.utils import clean_stale_temps, make_temp_dir, progress
from megatron_biomed.errors import UsageError, UserError, add_debug_flag, entry_point


class PreprocessError(UserError):
    pass


@dataclass
class Chunk:
    path: str
    start: int
    end: int
    first_line: int  # 1-based line number of the first line in the range
    line_index: int = 0  # 0-based index of that line counting the lines of all inputs in order


@dataclass
class EncodeConfig:
    json_keys: tuple
    tokenizer_type: str
    vocab_file: str = None
    merge_file: str = None
    tokenizer_model: str = None
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    sentence_splitter: str = None
    lang: str = None  # NLTK's Punkt model for this language instead of sentence_splitter
    id_key: str = "id"
    # Partitions take every P-th line (Megatron-LM's default) or contiguous shares
    # (--keep-sequential-samples); a single partition keeps the input order either way.
    sequential: bool = True
    threads_per_worker: int = 0  # 0: let the Rust tokenizer use every core


# Lines end as Python's text mode (Megatron-LM's reader) ends them: at \n, \r\n or a lone \r.
_LINE_END = re.compile("\r\n|\r|\n")


def count_line_ends(data, after_cr=False):
    """Line ends in `data` (bytes); `after_cr`: the byte before it was a \r (so a leading \n
    completes that \r\n rather than ending a line of its own)."""
    n = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return n - 1 if after_cr and data[:1] == b"\n" else n


def plan_chunks(paths, chunk_bytes=8 << 20):
    """Cut the input files into ranges of about `chunk_bytes` that end at a \n (a line break of
    any kind is a line; the ranges' line numbers count them all)."""
    chunks, base = [], 0
    for path in paths:
        first = len(chunks)
        with open(path, "rb") as f:
            pos, line, after_cr, last = 0, 1, False, b""
            start, start_line = 0, 1
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                cut = block.rfind(b"\n")
                head, tail = (block, b"") if cut < 0 else (block[:cut + 1], block[cut + 1:])
                line += count_line_ends(head, after_cr)
                if cut >= 0:
                    end = pos + cut + 1
                    chunks.append(Chunk(path, start, end, start_line))
                    start, start_line = end, line
                    line += count_line_ends(tail)
                after_cr, last = block.endswith(b"\r"), block[-1:]
                pos += len(block)
            size = f.tell()
            if size > start:
                chunks.append(Chunk(path, start, size, start_line))
            if last not in (b"", b"\n", b"\r"):
                line += 1  # a last line without a line break is a line too
        for c in chunks[first:]:
            c.line_index = base + c.first_line - 1
        base += line - 1
    return chunks


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------
_W = {}


def init_worker(config):
    if config.threads_per_worker:
        os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(config.threads_per_worker)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from megatron_biomed.data import tokenizer as T
    tok = T.load_tokenizer(config.tokenizer_type, config.vocab_file, config.merge_file,
                           config.tokenizer_model)
    _W.clear()
    _W.update(config=config, tok=tok, encoder=T.BatchEncoder(tok, config.threads_per_worker),
              eod=T.eod_id(tok) if config.append_eod else None, checked=False,
              dtype=indexed.optimal_dtype(tok.get_vocab_size(with_added_tokens=True)))
    if config.split_sentences:
        _W["splitter"] = make_splitter(config)


def make_splitter(config):
    from megatron_biomed.data import sentences
    if config.lang:
        return sentences.NltkSplitter(config.lang, config.keep_newlines)
    return sentences.load_splitter(config.sentence_splitter)


def _line_of(data, offset, first_line):
    return first_line + count_line_ends(data[:offset])


_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_line(line, where):
    """One JSONL record, or the one-line reason it cannot be one (Megatron-LM's
    preprocess_data.py stops with a traceback on each of these)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise PreprocessError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise PreprocessError(f"{where}: JSON nested too deeply for Python to read; flatten the record") from None
    except ValueError as e:  # Python's limit on integer digits (int_max_str_digits)
        raise PreprocessError(f"{where}: {' '.join(str(e).split(';')[0].split())} in a JSON number; write it as a "
                              f"string, or drop the field") from None


def encode_chunk(chunk, take=None):
    """Encode one byte range; returns (stats, {key: (tokens, seq_lengths, seqs_per_doc)}, ids).
    `take`: (i, P) to encode only the lines whose 0-based line number is i modulo P.

    Each document is what Megatron-LM's preprocess_data.py makes of the line: a string field
    is one sentence (or, with --split-sentences, split into sentences), a list field is its
    sentences as given; sentences without tokens are dropped, EOD goes after the last token,
    and a document without tokens stays as an empty document, so documents match lines."""
    cfg, eod = _W["config"], _W["eod"]
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreprocessError(f"{chunk.path}:{_line_of(data, e.start, chunk.first_line)}: "
                              f"not UTF-8 (byte 0x{data[e.start]:02x})") from None
    docs, ids = [], []
    lines = _LINE_END.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines):
        if take is not None and (chunk.line_index + n) % take[1] != take[0]:
            continue
        if not line.strip():
            continue
        where = f"{chunk.path}:{chunk.first_line + n}"
        record = _json_line(line, where)
        if not isinstance(record, dict):
            raise PreprocessError(f"{where}: a JSON object per line is expected")
        for key in cfg.json_keys:
            value = record.get(key)
            if not (isinstance(value, str) or (isinstance(value, list)
                                               and all(isinstance(v, str) for v in value))):
                raise PreprocessError(f"{where}: record has no field {key!r} holding a string or a list "
                                      f"of strings (record id {record.get(cfg.id_key)!r})")
            for piece in [value] if isinstance(value, str) else value:
                bad = _SURROGATE.search(piece)
                if bad:
                    raise PreprocessError(
                        f"{where}: field {key!r} holds a lone surrogate (\\u{ord(bad.group()):04x}, from a JSON "
                        f"escape) at character {bad.start()}, which is not text and has no UTF-8 bytes; "
                        f"remove or replace it in the record")
        docs.append(record)
        doc_id = record.get(cfg.id_key)
        ids.append(str(doc_id) if doc_id is not None else f"{os.path.basename(chunk.path)}:{chunk.first_line + n}")
    out, stats = {}, {"docs": len(docs), "bytes": len(data), "empty": 0, "tokens": 0}
    empty = np.zeros(len(docs), dtype=bool)
    for key in cfg.json_keys:
        sentences = []
        for d in docs:
            value = d[key]
            if isinstance(value, list):
                sentences.append(value)
            elif cfg.split_sentences:
                sentences.append(_W["splitter"].split(value, cfg.keep_newlines))
            else:
                sentences.append([value])
        flat = list(itertools.chain.from_iterable(sentences))
        if not _W["checked"]:
            _W["encoder"].self_check(flat[:64])
            _W["checked"] = True
        seqs = _W["encoder"].encode(flat)
        seq_lengths, per_doc, pieces = [], [], []
        i = 0
        for doc_sentences in sentences:
            doc_seqs = [s for s in seqs[i:i + len(doc_sentences)] if s]
            i += len(doc_sentences)
            if eod is not None and doc_seqs:
                doc_seqs[-1] = doc_seqs[-1] + [eod]
            per_doc.append(len(doc_seqs))
            seq_lengths.extend(len(s) for s in doc_seqs)
            pieces.extend(doc_seqs)
        per_doc = np.asarray(per_doc, dtype=np.int64)
        empty |= per_doc == 0
        total = sum(seq_lengths)
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=_W["dtype"], count=total)
        out[key] = (tokens, np.asarray(seq_lengths, dtype=np.int32), per_doc)
        stats["tokens"] += total
    stats["empty"] = int(empty.sum())
    return stats, out, ids


# ------------------------------------------------------------------------------------------
# Writer side
# ------------------------------------------------------------------------------------------
def output_prefix_for(prefix, key, split_sentences):
    return f"{prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def encode_partition(chunks, prefix, config, workers, dtype, on_progress=None, if_empty=None, take=None):
    """Encode `chunks` in order into `{prefix}_{key}_{level}` datasets; returns totals. With
    `if_empty` (a message), no tokens at all is a PreprocessError and nothing is written. `take`:
    see encode_chunk."""
    writers = {k: indexed.IndexedDatasetWriter(output_prefix_for(prefix, k, config.split_sentences), dtype)
               for k in config.json_keys}
    totals = {"docs": 0, "tokens": 0, "empty": 0, "bytes": 0}
    pool = None
    try:
        if workers <= 1:
            init_worker(config)
            results = map(functools.partial(encode_chunk, take=take), chunks)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, init_worker, (config,))
            results = pool.imap(functools.partial(encode_chunk, take=take), chunks)
        for stats, out, ids in results:
            for key, (tokens, lengths, per_doc) in out.items():
                writers[key].add_documents(tokens, lengths, per_doc, ids)
            for k in totals:
                totals[k] += stats[k]
            if on_progress:
                on_progress(stats)
        if if_empty and totals["tokens"] == 0:
            raise PreprocessError(if_empty)
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return totals


PROGRESS_KEYS = ("bytes", "docs", "tokens")


def _partition_main(chunks, prefix, config, workers, dtype, counter, errors, take):
    try:
        def bump(stats):
            with counter.get_lock():
                for i, k in enumerate(PROGRESS_KEYS):
                    counter[i] += stats[k]
        totals = encode_partition(chunks, prefix, config, workers, dtype, bump, take=take)
        errors.put(("ok", totals))
    except BaseException as e:  # reported to the parent, which cleans up
        errors.put(("error", str(e) if isinstance(e, PreprocessError) else f"{type(e).__name__}: {e}"))
        raise SystemExit(1)


def split_partitions(chunks, n):
    """`n` contiguous groups of chunks with about equal bytes."""
    sizes = np.array([c.end - c.start for c in chunks], dtype=np.int64)
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), n + 1)[1:-1], side="right")
    edges = [0, *bounds.tolist(), len(chunks)]
    return [chunks[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]


def preprocess(inputs, output_prefix, config, workers=1, partitions=1, chunk_bytes=8 << 20,
               show_progress=True, log=None, log_interval=None):
    """With `log_interval`, progress is Megatron-LM's lines ("Processed N documents (...)") every
    that many documents instead of a live bar."""
    paths = []
    for pattern in inputs:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"input not found: {pattern}")
        paths.extend(matched)
    from megatron_biomed.data import tokenizer as T
    tok = T.load_tokenizer(config.tokenizer_type, config.vocab_file, config.merge_file,
                           config.tokenizer_model)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if config.append_eod:
        T.eod_id(tok)
    if config.split_sentences and config.lang:
        from megatron_biomed.data.sentences import NltkSplitter
        NltkSplitter(config.lang)  # fails here, before any work, when the model is missing
    elif config.split_sentences:
        if not config.sentence_splitter:
            raise ValueError("--split-sentences needs a sentence splitter: pass --sentence-splitter "
                             "or keep sentence_splitter.json beside the tokenizer files, or --lang "
                             "english for NLTK's Punkt model as Megatron-LM uses it")
        if not os.path.isfile(config.sentence_splitter):
            raise FileNotFoundError(f"sentence splitter not found: {config.sentence_splitter} "
                                    "(tools/train_tokenizer.py writes it)")
    dtype = indexed.optimal_dtype(vocab_size)
    chunks = plan_chunks(paths, chunk_bytes)
    total_bytes = sum(c.end - c.start for c in chunks)
    bar = progress(total=total_bytes, unit="B", unit_scale=True, desc="encoding",
                   disable=not show_progress or bool(log_interval))
    t0 = time.time()
    seen = {"docs": 0, "tokens": 0, "bytes": 0}

    def on_progress(stats):
        before = seen["docs"]
        for k in seen:
            seen[k] += stats[k]
        dt = max(time.time() - t0, 1e-9)
        if log_interval:  # one line per multiple of the interval, as Megatron-LM prints them
            for count in range((before // log_interval + 1) * log_interval, seen["docs"] + 1, log_interval):
                print(f"Processed {count} documents ({count / dt} docs/s, "
                      f"{seen['bytes'] / dt / 1024 / 1024} MB/s).", file=log or sys.stderr, flush=True)
        bar.update(stats["bytes"])
        bar.set_postfix_str(f"{seen['docs'] / dt:,.0f} docs/s, {seen['tokens'] / dt:,.0f} tokens/s",
                            refresh=False)

    if_empty = (f"{', '.join(paths)}: no tokens to write (no non-blank line, or every "
                f"{'/'.join(config.json_keys)} field is empty); check --input and --json-keys")
    outputs = {output_prefix}
    for key in config.json_keys:
        key_prefix = output_prefix_for(output_prefix, key, config.split_sentences)
        outputs |= {key_prefix, *indexed.dataset_paths(key_prefix)}
    for out in sorted(outputs):
        clean_stale_temps(out)  # what a killed run into the same output left behind
    if partitions <= 1 or (config.sequential and len(chunks) < 2):
        totals = encode_partition(chunks, output_prefix, config, workers, dtype, on_progress, if_empty)
    else:
        totals = _run_partitions(chunks, output_prefix, config, workers, partitions, dtype, bar, if_empty,
                                 on_progress)
    bar.close()
    totals["seconds"] = time.time() - t0
    totals["vocab_size"] = vocab_size
    totals["dtype"] = np.dtype(dtype).name
    return totals


def _run_partitions(chunks, output_prefix, config, workers, partitions, dtype, bar, if_empty, on_progress):
    if config.sequential:
        groups = split_partitions(chunks, partitions)
        takes = [None] * len(groups)
    else:  # Megatron-LM's order: partition i has lines i, i+P, i+2P, ...; outputs concatenated
        groups, takes = [chunks] * partitions, [(i, partitions) for i in range(partitions)]
        bar.total = bar.total * partitions  # every partition reads all of the input
    per_partition = max(1, workers // len(groups))
    tmp = make_temp_dir(output_prefix, "partitions")  # makes the output directory too
    ctx = multiprocessing.get_context("spawn")
    counter, queue = ctx.Array("q", len(PROGRESS_KEYS)), ctx.Queue()
    procs = []
    try:
        for i, group in enumerate(groups):
            p = ctx.Process(target=_partition_main, args=(
                group, os.path.join(tmp, f"part{i:04d}"), config, per_partition, dtype, counter, queue,
                takes[i]))
            p.start()
            procs.append(p)
        outcomes, shown = [], [0] * len(PROGRESS_KEYS)
        while len(outcomes) < len(procs):
            try:
                outcomes.append(queue.get(timeout=0.5))
            except Exception:  # queue.Empty: refresh the bar, check for dead processes
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    time.sleep(0.5)
                    if queue.empty():
                        raise PreprocessError("a partition process died without reporting")
            now = list(counter[:])
            on_progress({k: now[i] - shown[i] for i, k in enumerate(PROGRESS_KEYS)})
            shown = now
        errors = [msg for status, msg in outcomes if status == "error"]
        if errors:
            raise PreprocessError(errors[0])
        for p in procs:
            p.join()
        totals = {"docs": 0, "tokens": 0, "empty": 0, "bytes": 0}
        for _, t in outcomes:
            for k in totals:
                totals[k] += t[k]
        if totals["tokens"] == 0:
            raise PreprocessError(if_empty)
        for key in config.json_keys:
            parts = [output_prefix_for(os.path.join(tmp, f"part{i:04d}"), key, config.split_sentences)
                     for i in range(len(groups))]
            indexed.merge_datasets(parts, output_prefix_for(output_prefix, key, config.split_sentences))
        return totals
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser():
    p = argparse.ArgumentParser(
        description="Tokenize JSONL documents into Megatron indexed datasets "
                    "{output-prefix}_{key}_document.bin/.idx (+ .ids: the document id of every "
                    "document, in order). Flags follow Megatron-LM's tools/preprocess_data.py.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, nargs="+",
                   help="JSONL file(s) or glob pattern(s), one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from the JSON")
    g.add_argument("--id-key", default="id", help="key holding the document id written to .ids")
    g.add_argument("--split-sentences", action="store_true",
                   help="split documents into sentences, one sequence each (a list-valued field is "
                        "taken as its sentences, with or without this flag, as in Megatron-LM)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="keep newlines (and all whitespace) between sentences when splitting")
    g.add_argument("--sentence-splitter", help="sentence splitter JSON trained on the corpus (tools/train_tokenizer.py "
                   "writes sentence_splitter.json beside the tokenizer files): Punkt that knows PubMed's "
                   "abbreviations; recommended for PubMed")
    g.add_argument("--lang", help="split with NLTK's Punkt model for this language, exactly as Megatron-LM does; "
                   "read from the local NLTK data (python -m nltk.downloader punkt_tab), never downloaded. "
                   "Default with --split-sentences and no --sentence-splitter: english, as in Megatron-LM")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help="GPT2BPETokenizer (--vocab-file, --merge-file) or "
                   "HuggingFaceTokenizer (--tokenizer-model); Megatron-LM's other types are refused with a reason")
    g.add_argument("--vocab-file", help="vocab.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", help="merges.txt (GPT2BPETokenizer)")
    g.add_argument("--tokenizer-model", help="directory with tokenizer.json, or the file (HuggingFaceTokenizer)")
    g.add_argument("--append-eod", action="store_true",
                   help="append <|endoftext|> to every document that has tokens (a literal "
                        "<|endoftext|> in the text is always encoded as plain text)")
    g.add_argument("--legacy-tokenizer", action="store_true",
                   help="accepted for Megatron-LM command lines: GPT2BPETokenizer here is Megatron's "
                        "legacy GPT2BPETokenizer, token for token, with or without this flag")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes encoding in parallel")
    g.add_argument("--partitions", type=int, default=1,
                   help="independent writer processes, merged at the end. As in Megatron-LM, "
                        "partition i takes lines i, i+P, i+2P, ... (so documents are reordered) "
                        "unless --keep-sequential-samples")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="with --partitions: each partition takes a contiguous share of the input, "
                        "so the output keeps the input order (the same files as --partitions 1)")
    g.add_argument("--log-interval", type=int,
                   help="print Megatron-LM's progress line every this many documents instead of "
                        "the live progress bar")
    g.add_argument("--chunk-size-mb", type=float, default=8.0, help="input bytes per worker task")
    g.add_argument("--no-progress", action="store_true")
    from megatron_biomed.compat import megatron_lm
    return megatron_lm.register(add_debug_flag(p), "preprocess_data")


TOKENIZER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer")


@entry_point
def main(argv=None):
    from megatron_biomed.compat import megatron_lm
    from megatron_biomed.errors import debug_enabled
    args = build_parser().parse_args(argv)
    megatron_lm.check(args, "preprocess_data", debug_print=print if debug_enabled(argv) else None)
    if args.tokenizer_type not in TOKENIZER_TYPES:
        raise UsageError(f"--tokenizer-type {args.tokenizer_type}: not built here; give GPT2BPETokenizer "
                         f"(--vocab-file, --merge-file) or HuggingFaceTokenizer (--tokenizer-model DIR)")
    splitter = args.sentence_splitter
    if args.log_interval is not None and args.log_interval < 1:
        raise UsageError(f"--log-interval {args.log_interval}: must be at least 1")
    if args.lang and args.sentence_splitter:
        raise UsageError("--lang and --sentence-splitter both choose the sentence splitter; give one")
    if args.split_sentences and not splitter and not args.lang:
        args.lang = "english"  # Megatron-LM's default
        print("--split-sentences: NLTK's English Punkt, Megatron-LM's default (--sentence-splitter FILE: the "
              "splitter trained on your corpus, which knows PubMed's abbreviations)", file=sys.stderr)
    config = EncodeConfig(
        json_keys=tuple(args.json_keys), tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file, merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
        append_eod=args.append_eod, split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines, sentence_splitter=splitter, lang=args.lang, id_key=args.id_key,
        sequential=args.keep_sequential_samples, threads_per_worker=1 if args.workers > 1 else 0)
    totals = preprocess(args.input, args.output_prefix, config, args.workers, args.partitions,
                        int(args.chunk_size_mb * (1 << 20)), show_progress=not args.no_progress,
                        log_interval=args.log_interval)
    dt = max(totals["seconds"], 1e-9)
    print(f"encoded {totals['docs']:,} documents, {totals['tokens']:,} tokens in {dt:.1f}s "
          f"({totals['docs'] / dt:,.0f} docs/s, {totals['tokens'] / dt:,.0f} tokens/s); "
          f"vocabulary {totals['vocab_size']:,} -> {totals['dtype']}"
          + (f"; {totals['empty']:,} documents without tokens kept as empty documents, as "
             f"Megatron-LM does" if totals["empty"] else ""),
          file=sys.stderr)
    for key in args.json_keys:
        prefix = output_prefix_for(args.output_prefix, key, args.split_sentences)
        for path in indexed.dataset_paths(prefix):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
