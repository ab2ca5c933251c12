"""PubMed baseline/update XML and PMC Open Access JATS -> JSONL documents (tools/pubmed_to_jsonl.py).

Each input file is parsed by a worker into a shard of JSONL lines plus an event log: for every
record version its key (PMID or PMCID) and whether it was written, and every DeleteCitation.
The parent then replays the events of all files in order, so the last version of a record wins
and a later DeleteCitation removes it, and writes the surviving lines to a temp file that is
renamed to the output name only when everything is done.
"""
import argparse
import collections
import errno
import gzip
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np
from lxml import etree

from megatron_biomed.data import pubmed_xml as px
from megatron_biomed.utils import atomic_output, clean_stale_temps, make_temp_dir, progress
from megatron_biomed.errors import UserError, add_debug_flag, entry_point

OUTPUT_FIELDS = ("id", "source", "title", "text", "year", "journal")
XML_SUFFIXES = (".xml", ".nxml", ".xml.gz", ".nxml.gz")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
RECORD_SKIPPED, RECORD_WRITTEN, DELETE = 0, 1, 2


class InputError(UserError):
    """A problem with one input (file or tar member), reported with its location."""


@dataclass
class Filters:
    min_chars: int = 0
    languages: frozenset = frozenset()
    exclude_pmids: frozenset = frozenset()


@dataclass
class FileResult:
    path: str
    shard: str
    counts: collections.Counter = field(default_factory=collections.Counter)
    errors: list = field(default_factory=list)
    keys: np.ndarray = None
    kinds: np.ndarray = None


def natural_key(path):
    name = os.path.basename(path)
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)] + [path]


def discover_inputs(paths):
    """Expand files and directories into the supported input files, in natural name order."""
    files, missing = [], []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                for n in names:
                    if n.lower().endswith(XML_SUFFIXES + TAR_SUFFIXES):
                        files.append(os.path.join(root, n))
        elif os.path.isfile(p):
            files.append(p)
        else:
            missing.append(p)
    if missing:
        raise FileNotFoundError("input not found: " + ", ".join(missing))
    return sorted(dict.fromkeys(files), key=natural_key)


class _CountingReader:
    """File-like wrapper that remembers how many bytes the parser has consumed."""

    def __init__(self, f, raw=None):
        self.f, self.raw, self.consumed = f, raw, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.consumed += len(data)
        return data

    def where(self):
        pos = f"uncompressed byte {self.consumed}" if self.raw is not None else f"byte {self.consumed}"
        if self.raw is not None:
            try:
                pos += f", compressed byte {self.raw.tell()}"
            except (OSError, ValueError):
                pass
        return pos


class _Prefixed:
    """Re-serve bytes already read for sniffing, then the rest of the stream."""

    def __init__(self, head, f):
        self.head, self.f = head, f

    def read(self, n=-1):
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.f.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.f.read(n)


def _doc_key(doc, fallback):
    m = re.fullmatch(r"PMC(\d+)", doc["id"] or "")
    if doc["source"] == "pmc_fulltext":
        return int(m.group(1)) * 2 + 1 if m else fallback
    return doc["pmid"] * 2 if doc.get("pmid") is not None else fallback


class _FileWorker:
    def __init__(self, result, out, filters, file_index):
        self.result, self.out, self.filters = result, out, filters
        self.keys, self.kinds = [], []
        self.unkeyed = 0
        self.file_index = file_index

    def _fallback_key(self):
        self.unkeyed += 1
        return -(self.file_index * (1 << 32) + self.unkeyed)

    def record(self, doc):
        c = self.result.counts
        c["records"] += 1
        if doc is None:
            c["skipped: unparseable record (no id)"] += 1
            return
        key = _doc_key(doc, None)
        if key is None:
            key = self._fallback_key()
        reason = self._skip_reason(doc)
        self.keys.append(key)
        if reason:
            c["skipped: " + reason] += 1
            self.kinds.append(RECORD_SKIPPED)
            return
        self.kinds.append(RECORD_WRITTEN)
        record = {k: doc[k] for k in OUTPUT_FIELDS}
        if doc.get("source") == "pmc_fulltext" and doc.get("pmid") is not None:
            record["pmid"] = doc["pmid"]  # pairs the full text with its abstract (tools/dedup.py --prefer)
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _skip_reason(self, doc):
        f = self.filters
        if not doc["text"]:
            return "no text (no abstract or body)"
        if doc.get("pmid") is not None and doc["pmid"] in f.exclude_pmids:
            return "excluded PMID"
        if f.languages and doc["languages"] and not f.languages.intersection(doc["languages"]):
            return "language"
        if len(doc["text"]) < f.min_chars:
            return f"shorter than --min-chars {f.min_chars}"
        return None

    def delete(self, pmids):
        self.result.counts["DeleteCitation PMIDs"] += len(pmids)
        for p in pmids:
            self.keys.append(p * 2)
            self.kinds.append(DELETE)

    # -- parsing ---------------------------------------------------------------------------
    def parse_stream(self, stream, name, fallback_id=None):
        """Parse one XML stream (MEDLINE set or JATS article); raise InputError on bad input."""
        reader = stream if isinstance(stream, _CountingReader) else _CountingReader(stream)
        try:
            head = reader.read(65536)
            kind = px.sniff_kind(head)
            if kind is None:
                raise InputError(f"{name}: neither MEDLINE/PubMed nor JATS XML (root element not recognised)")
            reader.f, reader.consumed = _Prefixed(head, reader.f), 0
            tags = px.MEDLINE_RECORD_TAGS if kind == "medline" else None
            n_articles = 0
            for _, el in etree.iterparse(reader, events=("end",), tag=tags, **px.SAFE_PARSE):
                if kind == "medline":
                    if el.tag == "DeleteCitation":
                        self.delete(px.deleted_pmids(el))
                    else:
                        self.record(px.parse_medline_record(el))
                elif px.local_name(el.tag) == "article":
                    n_articles += 1
                    self.record(px.parse_jats_article(el, fallback_id if n_articles == 1 else None))
                else:
                    continue
                # Free what was parsed so memory stays flat however large the file is.
                el.clear(keep_tail=False)
                parent = el.getparent()
                if parent is not None:
                    while el.getprevious() is not None:
                        del parent[0]
        except etree.XMLSyntaxError as e:
            line, col = e.position
            raise InputError(f"{name}: line {line}, column {col}: malformed XML: {e.msg}") from None
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise InputError(f"{name}: corrupt or truncated gzip at {reader.where()}: {e}") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{name}: at {reader.where()}: not UTF-8: {e}") from None

    def parse_tar(self, path):
        """Every .nxml/.xml member of a PMC OA bundle; unsafe or broken members are reported."""
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    name = member.name
                    if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or \
                            re.match(r"^[A-Za-z]:", name):
                        self.result.errors.append(
                            f"{path}: refused tar member {name!r}: absolute path or '..'")
                        self.result.counts["refused tar members"] += 1
                        continue
                    if not (member.isfile() or member.isdir()):
                        # links and devices: never followed or created, and counted so it shows
                        kind = ("symlink" if member.issym() else "hard link" if member.islnk() else
                                "device or fifo" if (member.isdev() or member.isfifo()) else "special file")
                        self.result.errors.append(f"{path}: refused tar member {name!r}: {kind}")
                        self.result.counts["refused tar members"] += 1
                        continue
                    if not member.isfile() or not name.lower().endswith((".nxml", ".xml")):
                        continue
                    f = tar.extractfile(member)
                    stem = os.path.basename(name).split(".")[0]
                    try:
                        self.parse_stream(f, f"{path}:{name}", stem if stem.startswith("PMC") else None)
                    except InputError as e:
                        self.result.errors.append(str(e))
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise InputError(f"{path}: corrupt or truncated tar archive: {e}") from None


_FILTERS = Filters()


def _init_worker(filters):
    global _FILTERS
    _FILTERS = filters


_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def process_file(task):
    index, path, shard_path = task
    filters = _FILTERS
    result = FileResult(path=path, shard=shard_path)
    with open(shard_path, "w", encoding="utf-8") as out:
        w = _FileWorker(result, out, filters, index)
        try:
            low = path.lower()
            if low.endswith(TAR_SUFFIXES):
                w.parse_tar(path)
            else:
                stem = os.path.basename(path).split(".")[0]
                fallback = stem if stem.startswith("PMC") else None
                with open(path, "rb") as raw:
                    if raw.read(2) == b"\x1f\x8b":
                        raw.seek(0)
                        w.parse_stream(_CountingReader(gzip.GzipFile(fileobj=raw), raw), path, fallback)
                    else:
                        raw.seek(0)
                        w.parse_stream(_CountingReader(raw), path, fallback)
        except InputError as e:
            result.errors.append(str(e))
        except OSError as e:
            if e.errno in _OUTPUT_ERRNOS:  # the output side failed: fatal, not this input's fault
                raise
            result.errors.append(f"{path}: {e}")
    result.keys = np.asarray(w.keys, dtype=np.int64)
    result.kinds = np.asarray(w.kinds, dtype=np.int8)
    return result


def winning_events(results, with_deleted=False):
    """Boolean mask over all events (files in order): True for record versions to write;
    with `with_deleted`, also the PMIDs whose last event is a DeleteCitation."""
    keys = np.concatenate([r.keys for r in results]) if results else np.zeros(0, np.int64)
    kinds = np.concatenate([r.kinds for r in results]) if results else np.zeros(0, np.int8)
    keep = np.zeros(len(keys), dtype=bool)
    if len(keys):
        order = np.lexsort((np.arange(len(keys)), keys))  # by key, then event order
        sorted_keys = keys[order]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = sorted_keys[:-1] != sorted_keys[1:]
        winners = order[last]
        keep[winners[kinds[winners] == RECORD_WRITTEN]] = True
        deleted = keys[winners[kinds[winners] == DELETE]] // 2
    else:
        deleted = np.zeros(0, np.int64)
    return (keep, kinds, deleted) if with_deleted else (keep, kinds)


def slice_files(files, num_slices, index):
    """The `index`-th of `num_slices` contiguous, near-equal runs of `files` (kept in order)."""
    if not 0 <= index < num_slices:
        raise ValueError(f"--slice {index} is not in 0..{num_slices - 1}")
    bounds = [len(files) * i // num_slices for i in range(num_slices + 1)]
    return files[bounds[index]:bounds[index + 1]]


def convert(inputs, output, workers=1, filters=Filters(), show_progress=True, deleted_output=None,
            num_slices=1, slice_index=0):
    """Run the whole conversion; returns (counts, errors)."""
    files = discover_inputs(inputs)
    if not files:
        raise FileNotFoundError("no .xml, .xml.gz, .nxml or .tar.gz files in: " + ", ".join(inputs))
    files = slice_files(files, num_slices, slice_index)
    if not files:
        raise ValueError(f"slice {slice_index} of {num_slices} is empty: fewer input files than slices")
    out_dir = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(out_dir, exist_ok=True)
    for path in [output] + ([deleted_output] if deleted_output else []):
        clean_stale_temps(path)
    shard_dir = make_temp_dir(output, "shards")
    try:
        tasks = [(i, f, os.path.join(shard_dir, f"{i:06d}.jsonl")) for i, f in enumerate(files)]
        sizes = {f: os.path.getsize(f) for f in files}
        results = []
        bar = progress(total=sum(sizes.values()), unit="B", unit_scale=True, desc="parsing",
                       disable=not show_progress)
        written_so_far = 0

        def collect(r):
            nonlocal written_so_far
            results.append(r)
            written_so_far += r.counts["records"]
            bar.update(sizes[r.path])
            bar.set_postfix(records=written_so_far, refresh=False)

        if workers <= 1 or len(files) == 1:
            _init_worker(filters)
            for t in tasks:
                collect(process_file(t))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(filters,)) as pool:
                for r in pool.imap(process_file, tasks):
                    collect(r)
        bar.close()

        keep, kinds, deleted = winning_events(results, with_deleted=True)
        counts = collections.Counter()
        errors = []
        offset = 0
        with atomic_output(output, "w", encoding="utf-8") as out:
            for r in results:
                counts.update(r.counts)
                errors.extend(r.errors)
                n = len(r.keys)
                file_kinds, file_keep = kinds[offset:offset + n], keep[offset:offset + n]
                offset += n
                # Shard lines are the RECORD_WRITTEN events of this file, in order.
                line_keep = file_keep[file_kinds == RECORD_WRITTEN]
                with open(r.shard, encoding="utf-8") as shard:
                    for line, k in zip(shard, line_keep):
                        if k:
                            out.write(line)
                superseded = int((~line_keep).sum())
                counts["documents"] += int(line_keep.sum())
                counts["files"] += 1
                counts["files failed"] += bool(r.errors)
                counts["dropped: superseded by a later version or DeleteCitation"] += superseded
        counts["deleted PMIDs"] = len(deleted)
        if deleted_output:
            with atomic_output(deleted_output, "w", encoding="utf-8") as f:
                f.write("".join(f"PMID:{p}\n" for p in np.sort(deleted)))
        return counts, errors
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)


def format_summary(counts, errors, output):
    lines = [f"wrote {counts['documents']:,} documents to {output}",
             f"  files: {counts['files']:,} ({counts['files failed']:,} with errors)",
             f"  records parsed: {counts['records']:,}"]
    for k in sorted(counts):
        if k.startswith(("skipped", "dropped", "refused", "DeleteCitation")) and counts[k]:
            lines.append(f"  {k}: {counts[k]:,}")
    if errors:
        lines.append(f"errors ({len(errors)}):")
        lines.extend("  " + e for e in errors)
    return "\n".join(lines)


def read_pmid_list(path):
    pmids = set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip().removeprefix("PMID:")
            if not s or s.startswith("#"):
                continue
            if not s.isdigit():
                raise ValueError(f"{path}:{n}: not a PMID: {line.strip()!r}")
            pmids.add(int(s))
    return frozenset(pmids)


def build_parser():
    p = argparse.ArgumentParser(
        description="Turn MEDLINE/PubMed baseline and update XML (.xml, .xml.gz), PMC Open Access "
                    "JATS articles (.nxml, .xml) and PMC OA bundles (.tar.gz) into JSONL documents "
                    "{id, source, title, text, year, journal}, one per line. Records are "
                    "deduplicated by PMID/PMCID: files are applied in natural file-name order, so "
                    "update files (higher numbers) replace baseline records and their "
                    "DeleteCitation entries remove them.")
    p.add_argument("inputs", nargs="+", help="files or directories (searched recursively)")
    p.add_argument("--output", "-o", required=True, help="output JSONL path")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (one file each)")
    p.add_argument("--min-chars", type=int, default=0, help="skip documents whose text is shorter")
    p.add_argument("--languages", default="",
                   help="comma-separated MEDLINE language codes to keep, e.g. eng "
                        "(records without language information are kept)")
    p.add_argument("--exclude-pmids", metavar="FILE",
                   help="file with one PMID per line; those articles (abstract or full text) are skipped")
    p.add_argument("--write-deleted", metavar="FILE",
                   help="also write the PMIDs that these inputs delete (DeleteCitation, not re-added "
                        "later), one 'PMID:n' per line; merge_datasets.py --drop-superseded applies "
                        "them to datasets of earlier slices")
    p.add_argument("--num-slices", type=int, default=1,
                   help="split the inputs (in natural file-name order) into this many contiguous slices")
    p.add_argument("--slice", type=int, default=0, help="which slice to process (0-based)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        filters = Filters(
            min_chars=args.min_chars,
            languages=frozenset(x.strip().lower() for x in args.languages.split(",") if x.strip()),
            exclude_pmids=read_pmid_list(args.exclude_pmids) if args.exclude_pmids else frozenset())
        counts, errors = convert(args.inputs, args.output, args.workers, filters,
                                 show_progress=not args.no_progress, deleted_output=args.write_deleted,
                                 num_slices=args.num_slices, slice_index=args.slice)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(counts, errors, args.output), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
