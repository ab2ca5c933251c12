"""What the corpus tools (decontaminate.py, dedup.py) share: the documents of a JSON lines
corpus, their normalised words, a chunked map over forked worker processes, and writing the
kept lines of the corpus byte for byte."""
import multiprocessing
import re
import unicodedata

from megatron_biomed.errors import UserError
from megatron_biomed.utils import atomic_output, iter_json_objects

_NON_WORD = re.compile(r"[^\w]+|_")


class CorpusError(UserError, ValueError):
    pass


def words(text):
    """Lower-cased words with punctuation removed (NFKC first, so look-alike characters match)."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def read_jsonl_documents(path, text_key="text"):
    """(line number, record, text) of each document; the title, when there is one, is part of
    the text (PubMedQA's questions are article titles)."""
    for line_no, record in iter_json_objects(path, CorpusError):
        text = record.get(text_key)
        if not isinstance(text, str):
            raise CorpusError(f"{path}:{line_no}: no string field {text_key!r}; name the text field with --text-key")
        title = record.get("title")
        yield line_no, record, (title + "\n" + text) if isinstance(title, str) and title else text


def _chunks(items, size, bar):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            bar.update(len(chunk))
            yield chunk
            chunk = []
    if chunk:
        bar.update(len(chunk))
        yield chunk


def map_chunks(fn, items, workers, initializer, initarg, bar, chunk_size=256):
    """fn(chunk) for each chunk of `items`, in order, on `workers` processes forked after
    `initializer(initarg)` is known to them (so a large initarg is shared copy-on-write, not
    pickled per task); `bar` counts the items handed out."""
    chunks = _chunks(items, chunk_size, bar)
    if workers == 1:
        initializer(initarg)
        yield from map(fn, chunks)
        return
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=initializer, initargs=(initarg,))
    try:
        yield from pool.imap(fn, chunks)
    finally:
        pool.terminate()


def write_kept_lines(path, output, drop):
    """Copy the non-blank lines of `path` whose line numbers are not in `drop` to `output`, byte
    for byte and in order; returns how many."""
    kept = 0
    with open(path, encoding="utf-8-sig") as src, atomic_output(output, "w", encoding="utf-8") as f:
        for line_no, line in enumerate(src, 1):
            if line.strip() and line_no not in drop:
                f.write(line if line.endswith("\n") else line + "\n")
                kept += 1
    return kept
