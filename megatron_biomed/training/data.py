"""Training data: megatron-core's GPTDataset / BlendedMegatronDatasetBuilder over .bin/.idx.

Rank 0 builds the index caches first and the other ranks then read them (megatron-core's
builder does this when torch.distributed is up). Batches are indexed by iteration, so the
data position after a resume is just `iteration x global batch size`, and each data-parallel
rank reads only its own rows.
"""
import hashlib
import json
import logging
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

from megatron_biomed.parallel.tensor_parallel import IGNORE_INDEX
from megatron_biomed.utils import atomic_output, progress
from megatron_biomed.errors import UserError
from megatron_biomed.training.arguments import ConfigError


# megatron-core imports its optimizer package on the way to the datasets; on a machine without
# Transformer Engine or Apex that prints four warnings about kernels we do not use.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


class DataError(UserError, ValueError):
    pass


class _TokenizerInfo:
    """What GPTDataset needs of a tokenizer. pad = -1: no real token is treated as padding
    (BioMedLM's pad id equals its EOD id, and megatron-core would mask every EOD)."""

    def __init__(self, vocab_size, eod):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, -1
        self.unique_identifiers = {"class": "megatron_biomed", "vocab_size": vocab_size, "eod": eod}


def parse_blend(data_path):
    """['prefix'] or ['0.7', 'a', '0.3', 'b'] -> (prefixes, weights or None)."""
    if len(data_path) == 1:
        return [data_path[0]], None
    if len(data_path) % 2:
        raise DataError(f"--data-path {' '.join(data_path)}: give one prefix, or weight prefix pairs")
    weights, prefixes = [], []
    for w, p in zip(data_path[::2], data_path[1::2]):
        try:
            weights.append(float(w))
        except ValueError:
            raise DataError(f"--data-path: {w!r} is not a weight (expected weight prefix pairs)") from None
        prefixes.append(p)
    return prefixes, weights


def max_token_id(prefix, cache_dir=None, show_progress=True):
    """Largest token id in `prefix`.bin, scanned once and cached by file size and mtime."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_biomed.data.indexed import check_dataset
    try:
        check_dataset(prefix)
    except ValueError as e:
        raise DataError(f"--data-path {prefix}: {e}") from None
    st = os.stat(prefix + ".bin")
    key = hashlib.sha1(f"{os.path.abspath(prefix)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    cache = os.path.join(cache_dir, f"max_token_id_{key}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)["max_token_id"]
    dtype = IndexedDataset(prefix).index.dtype
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    chunk = 1 << 26
    best = -1
    bar = progress(total=len(data), unit="tok", unit_scale=True, desc=f"checking token ids in {os.path.basename(prefix)}",
                   disable=not show_progress)
    for start in range(0, len(data), chunk):
        part = data[start:start + chunk]
        if len(part):
            best = max(best, int(part.max()))
        bar.update(len(part))
    bar.close()
    try:
        with atomic_output(cache, "w") as f:
            json.dump({"prefix": os.path.abspath(prefix), "max_token_id": best}, f)
    except OSError:
        pass  # a read-only data directory: scan again next time
    return best


def check_token_ids(prefixes, vocab_size, cache_dir=None):
    for prefix in prefixes:
        top = max_token_id(prefix, cache_dir)
        if top >= vocab_size:
            raise DataError(f"--data-path {prefix}: token id {top} is out of range for the model's vocabulary "
                            f"of {vocab_size} (--vocab-size / --vocab-file); was it tokenized with another tokenizer?")


def build_datasets(args, vocab_size, eod, global_batch_size, seq_length, train_samples=None):
    """(train, valid, test) GPTDatasets sized for the whole run, as Megatron sizes them
    (`train_samples`: the run's, when a batch-size ramp makes it other than iterations x batch)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    prefixes, weights = parse_blend(args.data_path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = None
    if rank == 0:
        try:
            check_token_ids(prefixes, vocab_size, args.data_cache_path)
        except DataError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise DataError(error)
    if rank == 0:
        print(f"building train/valid/test indices for {len(prefixes)} dataset(s), split {args.split}"
              f" (cached in {args.data_cache_path or 'a cache/ folder beside the data'})", flush=True)
        logging.getLogger("megatron.core").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(stream=sys.stdout, format="  %(message)s")
    n_evals = args.train_iters // args.eval_interval + 1
    train_samples = args.train_iters * global_batch_size if train_samples is None else train_samples
    sizes = [train_samples, n_evals * args.eval_iters * global_batch_size,
             args.eval_iters * global_batch_size]
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=seq_length, blend=(prefixes, weights), split=args.split,
        path_to_cache=args.data_cache_path, tokenizer=_TokenizerInfo(vocab_size, eod),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    for i in _check_splits(prefixes, config.split_matrix, sizes, args.split):
        config.split_matrix[i] = None  # unused and empty: megatron-core would loop on it forever
    try:
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except (AssertionError, ValueError, IndexError) as e:
        raise DataError(f"--data-path {' '.join(args.data_path)} with --split {args.split}: cannot build "
                        f"datasets of {sizes} samples: {e}") from e
    finally:
        logging.getLogger("megatron.core").setLevel(logging.WARNING)
    for name, ds, size in zip(("train", "valid", "test"), datasets, sizes):
        if size and ds is None:
            raise ConfigError(f"--split {args.split} leaves no {name} documents in --data-path "
                              f"{' '.join(args.data_path)}; give the {name} split a larger share")
    return datasets


def _check_splits(prefixes, split_matrix, sizes, split):
    """megatron-core loops forever on a split with no tokens: refuse one that is needed, by name;
    returns the indices of empty splits that are not needed (no samples asked of them)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    unused_empty = set()
    for prefix in prefixes:
        indexed = IndexedDataset(prefix)  # keep it alive: its arrays are views of its mmap
        lengths = indexed.sequence_lengths
        n = len(lengths)
        for i, (name, bounds, size) in enumerate(zip(("train", "valid", "test"), split_matrix, sizes)):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(lengths[beg:end].sum(dtype=np.int64)) == 0:
                if not size:
                    unused_empty.add(i)
                    continue
                raise ConfigError(f"--split {split} gives the {name} split none of the {n} sequences of {prefix}; "
                                f"use a larger share for it{' or --eval-iters 0' if name != 'train' else ''}")
    return sorted(unused_empty)


def get_batch(dataset, consumed, global_batch_size, dp_rank, dp_size):
    """(tokens, targets) of this data-parallel rank's rows of the global batch of samples
    consumed .. consumed + global_batch_size (Megatron's order: each iteration the next samples);
    targets are IGNORE_INDEX where the dataset's loss mask is 0."""
    per = global_batch_size // dp_size
    start = consumed + dp_rank * per
    samples = [dataset[i] for i in range(start, start + per)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    targets = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples])
    targets[mask == 0] = IGNORE_INDEX
    return tokens, targets
