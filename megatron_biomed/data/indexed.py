"""Write and merge Megatron indexed datasets (.bin/.idx) plus our .ids document-id files.

The format is megatron-core's `IndexedDataset` (megatron/core/datasets/indexed_dataset.py):
`.idx` = magic, version 1, dtype code, sequence count, document count, int32 sequence lengths,
int64 byte pointers, int64 document indices; `.bin` = the token arrays back to back. We write
it ourselves so whole batches of documents go to disk as single numpy writes instead of one
Python call per sequence; tests check the bytes equal megatron-core's `IndexedDatasetBuilder`.
"""
import contextlib
import os
import shutil
import struct

import numpy as np

from megatron_biomed.utils import make_temp_dir, naming

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_REDO = "; copy it again or rerun tools/preprocess_data.py"


def optimal_dtype(vocab_size):
    """megatron-core's DType.optimal_dtype: uint16 below 65,500 tokens, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dataset_paths(prefix):
    return prefix + ".bin", prefix + ".idx", prefix + ".ids"


class IndexedDatasetWriter:
    """Streams documents into `{prefix}.bin/.idx/.ids`; files appear under their final names
    only in `finalize()`, so an interrupted run leaves no half-written dataset."""

    def __init__(self, prefix, dtype, write_ids=True):
        self.prefix, self.dtype = prefix, np.dtype(dtype).type
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._tmp = make_temp_dir(prefix)
        self._bin = open(os.path.join(self._tmp, "data.bin"), "wb")
        self._ids = open(os.path.join(self._tmp, "data.ids"), "w", encoding="utf-8") if write_ids else None
        self._lengths = []      # int32 arrays, one per batch
        self._doc_counts = []   # sequences per document, int64 arrays
        self.num_tokens = 0
        self.num_documents = 0

    def add_documents(self, tokens, sequence_lengths, sequences_per_document, ids=None):
        """`tokens`: all sequences of a batch back to back; `sequence_lengths`: their lengths;
        `sequences_per_document`: how many sequences each document has."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        sequence_lengths = np.asarray(sequence_lengths, dtype=np.int32)
        sequences_per_document = np.asarray(sequences_per_document, dtype=np.int64)
        assert int(sequence_lengths.sum()) == len(tokens)
        assert int(sequences_per_document.sum()) == len(sequence_lengths)
        with naming(self.prefix + ".bin"):
            self._bin.write(tokens.tobytes())
        self._lengths.append(sequence_lengths)
        self._doc_counts.append(sequences_per_document)
        self.num_tokens += len(tokens)
        self.num_documents += len(sequences_per_document)
        if self._ids is not None:
            if ids is None or len(ids) != len(sequences_per_document):
                raise ValueError("one id per document is needed")
            with naming(self.prefix + ".ids"):
                self._ids.write("".join(f"{i}\n" for i in ids))

    def add_dataset(self, prefix, keep=None):
        """Append an existing dataset (streamed, not loaded); `keep`: optional boolean mask of
        the documents to take."""
        dtype, lengths, pointers, doc_idx = read_index(prefix + ".idx")
        if keep is not None and not np.all(keep):
            return self._add_selected(prefix, dtype, lengths, pointers, doc_idx, np.asarray(keep, bool))
        if np.dtype(dtype) != np.dtype(self.dtype):
            raise ValueError(f"{prefix}.idx has dtype {np.dtype(dtype).name}, expected "
                             f"{np.dtype(self.dtype).name}: datasets of different vocabularies")
        expected = int(lengths.astype(np.int64).sum()) * np.dtype(dtype).itemsize
        actual = os.path.getsize(prefix + ".bin")
        if actual != expected:
            raise ValueError(f"{prefix}.bin: {actual} bytes, but its .idx describes {expected} (truncated or partly "
                             f"copied); copy it again or rerun tools/preprocess_data.py for it")
        with open(prefix + ".bin", "rb") as f, naming(self.prefix + ".bin"):
            shutil.copyfileobj(f, self._bin, 16 << 20)
        self._lengths.append(lengths)
        self._doc_counts.append(np.diff(doc_idx))
        self.num_tokens += expected // np.dtype(dtype).itemsize
        self.num_documents += len(doc_idx) - 1
        if self._ids is not None:
            ids_path = prefix + ".ids"
            if not os.path.exists(ids_path):
                raise FileNotFoundError(f"{ids_path}: missing (needed to merge document ids); rerun tools/preprocess_data.py "
                                        f"for it, which writes the .ids file")
            with open(ids_path, encoding="utf-8") as f:
                n = 0
                with naming(self.prefix + ".ids"):
                    for line in f:
                        self._ids.write(line)
                        n += 1
            if n != len(doc_idx) - 1:
                raise ValueError(f"{ids_path}: {n} ids for {len(doc_idx) - 1} documents{_REDO}")

    def _add_selected(self, prefix, dtype, lengths, pointers, doc_idx, keep):
        if len(keep) != len(doc_idx) - 1:
            raise ValueError(f"{prefix}: mask of {len(keep)} for {len(doc_idx) - 1} documents")
        data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
        itemsize = np.dtype(dtype).itemsize
        ids = _read_ids(prefix + ".ids") if self._ids is not None else None
        for d in np.flatnonzero(keep):
            first, last = doc_idx[d], doc_idx[d + 1]
            seq_lengths = lengths[first:last]
            start = pointers[first] // itemsize if last > first else 0
            tokens = data[start:start + int(seq_lengths.astype(np.int64).sum())]
            self.add_documents(tokens, seq_lengths, [last - first],
                               [ids[d]] if ids is not None else None)
        del data

    def finalize(self):
        with naming(self.prefix + ".bin"):
            self._bin.close()
        if self._ids is not None:
            with naming(self.prefix + ".ids"):
                self._ids.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_counts = np.concatenate(self._doc_counts) if self._doc_counts else np.zeros(0, np.int64)
        with naming(self.prefix + ".idx"):
            write_index(os.path.join(self._tmp, "data.idx"), self.dtype, lengths, doc_counts)
        bin_path, idx_path, ids_path = dataset_paths(self.prefix)
        # The .idx goes last: a reader never finds a new .idx beside an old or partial .bin.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(idx_path)
        os.replace(os.path.join(self._tmp, "data.bin"), bin_path)
        if self._ids is not None:
            os.replace(os.path.join(self._tmp, "data.ids"), ids_path)
        os.replace(os.path.join(self._tmp, "data.idx"), idx_path)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def abort(self):
        for f in (self._bin, self._ids):
            if f is not None:
                f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_index(path, dtype, sequence_lengths, sequences_per_document):
    sequence_lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sequence_lengths), dtype=np.int64)
    if len(sequence_lengths) > 1:
        np.cumsum(sequence_lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.zeros(len(sequences_per_document) + 1, dtype=np.int64)
    np.cumsum(sequences_per_document, out=doc_idx[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", len(sequence_lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sequence_lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())


def read_index(path):
    """(dtype, sequence lengths, pointers, document indices) of an .idx file."""
    with open(path, "rb") as f:
        if f.read(9) != MAGIC:
            raise ValueError(f"{path}: not a Megatron .idx file (bad magic){_REDO}")
        header = f.read(25)
        if len(header) != 25:
            raise ValueError(f"{path}: truncated .idx file (its header is cut short){_REDO}")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header)
        if version != VERSION:
            raise ValueError(f"{path}: unsupported .idx version {version}{_REDO}")
        if code not in CODE_DTYPES:
            raise ValueError(f"{path}: unknown dtype code {code} in the .idx header{_REDO}")
        lengths = np.fromfile(f, dtype=np.int32, count=n_seq)
        pointers = np.fromfile(f, dtype=np.int64, count=n_seq)
        doc_idx = np.fromfile(f, dtype=np.int64, count=n_doc)
    if len(lengths) != n_seq or len(doc_idx) != n_doc:
        raise ValueError(f"{path}: truncated .idx file{_REDO}")
    return CODE_DTYPES[code], lengths, pointers, doc_idx


def check_dataset(prefix):
    """Refuse, by name, a dataset whose .idx is damaged or whose .bin is shorter than the .idx
    says (megatron-core would fail later with 'offset must be non-negative' or read garbage)."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: does not exist; check --data-path (a prefix, without .bin/.idx)")
    dtype, lengths, pointers, _ = read_index(idx_path)
    itemsize = np.dtype(dtype).itemsize
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(bin_path)
    if actual < expected:
        raise ValueError(f"{bin_path}: {actual} bytes, but {idx_path} describes {expected} (truncated or partly "
                         f"copied); copy it again or rerun tools/preprocess_data.py")
    if actual > expected:  # training would read documents at the wrong offsets, silently
        raise ValueError(f"{bin_path}: {actual} bytes, but {idx_path} describes {expected}: the .idx was made for "
                         f"another .bin; copy the pair together or rerun tools/preprocess_data.py")
    if len(lengths) == 0:
        raise ValueError(f"{prefix}: the dataset has no documents; rerun tools/preprocess_data.py on the right input")
    # the sequences lie back to back from byte 0, as every writer lays them out
    ends = np.cumsum(lengths.astype(np.int64)) * itemsize
    if pointers[0] != 0 or not np.array_equal(pointers[1:], ends[:-1]):
        bad = 0 if pointers[0] != 0 else int(np.flatnonzero(pointers[1:] != ends[:-1])[0]) + 1
        raise ValueError(f"{idx_path}: sequence {bad} starts at byte {int(pointers[bad])} of {bin_path}, but the "
                         f"sequences before it end at {int(ends[bad - 1]) if bad else 0}: the index is damaged; "
                         f"rerun tools/preprocess_data.py")


def find_prefixes(directory):
    """Dataset prefixes (with both .bin and .idx) in a directory, in sorted order as Megatron's
    merge_datasets.py takes them."""
    names = os.listdir(directory)
    stems = {n[:-4] for n in names if n.endswith(".idx")}
    missing = sorted(s for s in stems if s + ".bin" not in names)
    if missing:
        raise FileNotFoundError(f"{directory}: .idx without .bin for: {', '.join(missing)}; copy the .bin files too")
    return [os.path.join(directory, s) for s in sorted(stems)]


def _read_ids(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def superseded_masks(prefixes):
    """For datasets in order (slices of PubMed in file order): per dataset, which documents to
    keep, i.e. those whose id reappears in no later dataset and is not in a later dataset's
    `{prefix}.deleted` list - the rule tools/pubmed_to_jsonl.py applies within one run."""
    later = set()
    masks = []
    for p in reversed(prefixes):
        ids = _read_ids(p + ".ids")
        keep = np.fromiter((i not in later for i in ids), dtype=bool, count=len(ids))
        # Within one dataset ids are already unique (pubmed_to_jsonl deduplicated the slice).
        later.update(ids)
        if os.path.exists(p + ".deleted"):
            later.update(_read_ids(p + ".deleted"))
        masks.append(keep)
    return masks[::-1]


def merge_datasets(prefixes, output_prefix, write_ids=None, drop_superseded=False):
    """Concatenate datasets in the given order into `output_prefix` (ids merged when present)."""
    if not prefixes:
        raise ValueError("nothing to merge")
    if write_ids is None:
        write_ids = all(os.path.exists(p + ".ids") for p in prefixes)
    if drop_superseded:
        missing = [p + ".ids" for p in prefixes if not os.path.exists(p + ".ids")]
        if missing:
            raise FileNotFoundError("--drop-superseded needs document ids; missing: " + ", ".join(missing))
        masks = superseded_masks(prefixes)
    else:
        masks = [None] * len(prefixes)
    dtype = read_index(prefixes[0] + ".idx")[0]
    with IndexedDatasetWriter(output_prefix, dtype, write_ids=write_ids) as w:
        for p, keep in zip(prefixes, masks):
            w.add_dataset(p, keep)
    w.dropped = sum(int((~m).sum()) for m in masks if m is not None)
    return w
