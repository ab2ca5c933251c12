"""Train the BioMedLM tokenizer and the offline sentence splitter (tools/train_tokenizer.py)."""
import argparse
import json
import os
import shutil
import sys

from megatron_biomed.data import sentences, tokenizer
from megatron_biomed.utils import progress
from megatron_biomed.errors import add_debug_flag, entry_point


def iter_texts(paths, keys, limit_docs=None):
    """Texts of the given JSON keys, one JSONL line at a time (errors name file and line)."""
    n = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: malformed JSON: {e.msg}") from None
                for key in keys:
                    value = record.get(key) if isinstance(record, dict) else None
                    if not isinstance(value, str):
                        raise ValueError(f"{path}:{line_no}: record has no string field {key!r}")
                    yield value
                n += 1
                if limit_docs and n >= limit_docs:
                    return


def build_parser():
    p = argparse.ArgumentParser(
        description="Train a byte-level BPE tokenizer with BioMedLM's settings (vocabulary 28,896, "
                    "min frequency 2, no prefix space, <|endoftext|> last) and the offline Punkt "
                    "sentence splitter on JSONL documents. Writes vocab.json, merges.txt, "
                    "tokenizer.json, tokenizer_config.json, special_tokens_map.json and "
                    "sentence_splitter.json into --output-dir.")
    p.add_argument("--input", nargs="+", required=True, help="JSONL file(s) of documents")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--vocab-size", type=int, default=28896)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-documents", type=int, default=0,
                   help="train on at most this many documents (0: all)")
    p.add_argument("--splitter-max-chars", type=int, default=50_000_000,
                   help="characters of text the sentence splitter learns from")
    p.add_argument("--no-sentence-splitter", action="store_true")
    p.add_argument("--model-max-length", type=int, default=1024)
    p.add_argument("--no-progress", action="store_true")
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            print(f"error: input not found: {path}", file=sys.stderr)
            return 1
    if args.vocab_size < 257:
        print("error: --vocab-size must be at least 257 (256 bytes + <|endoftext|>)", file=sys.stderr)
        return 1
    tmp_dir = args.output_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        print(f"removed {tmp_dir}: left by an interrupted run", file=sys.stderr)
    try:
        texts = iter_texts(args.input, args.json_keys, args.max_documents)
        bar = progress(desc="documents", unit=" docs", disable=args.no_progress)
        counted = (bar.update(1) or t for t in texts)
        tok = tokenizer.train_bpe(counted, args.vocab_size, args.min_frequency, show_progress=False)
        bar.close()
        tokenizer.save_tokenizer(tok, tmp_dir, args.model_max_length)
        if not args.no_sentence_splitter:
            params = sentences.train_splitter(iter_texts(args.input, args.json_keys, args.max_documents),
                                              args.splitter_max_chars)
            sentences.save_splitter(params, os.path.join(tmp_dir, sentences.SPLITTER_FILE))
    except BaseException as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, (ValueError, UnicodeDecodeError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    os.makedirs(args.output_dir, exist_ok=True)
    for name in sorted(os.listdir(tmp_dir)):
        os.replace(os.path.join(tmp_dir, name), os.path.join(args.output_dir, name))
        print(os.path.join(args.output_dir, name))
    os.rmdir(tmp_dir)
    size = tok.get_vocab_size(with_added_tokens=True)
    print(f"vocabulary: {size:,} tokens, <|endoftext|> = {tok.token_to_id(tokenizer.EOD_TOKEN)}"
          + ("" if size == args.vocab_size else
             f" (the corpus supports fewer merges than --vocab-size {args.vocab_size})"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
