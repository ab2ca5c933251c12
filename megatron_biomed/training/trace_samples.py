"""Which documents did the model see at iteration N? (tools/trace_samples.py)

Given a pretraining run's settings (the same --config and flags: data path and blend, split,
seed, sequence length, global batch size, iterations), rebuilds megatron-core's datasets exactly
as training did (the same cached sample and shuffle indices) and lists, for every sample of the
global batch of iteration N, the documents and token spans it was cut from, with their ids from
the dataset's .ids file (PMIDs/PMCIDs). Iteration N is the N-th optimizer step, as the training
log counts them.
"""
import contextlib
import json
import os
import sys

import numpy as np

from megatron_biomed.errors import UsageError, entry_point
from megatron_biomed.utils import atomic_output


def _read_ids(prefix):
    path = prefix + ".ids"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().split()


def _leaf(dataset, index):
    """(GPTDataset, its sample index) behind sample `index` of a (possibly blended) dataset."""
    while hasattr(dataset, "dataset_index"):  # BlendedDataset
        index, dataset = int(dataset.dataset_sample_index[index]), dataset.datasets[int(dataset.dataset_index[index])]
    return dataset, index


def trace_sample(dataset, index, ids_cache):
    """{sample, dataset, parts: [{document, id, start, end}]}: the token spans (document-relative,
    end exclusive) that make up sample `index` (sequence length + 1 tokens, as GPTDataset reads
    them: the last is the final label)."""
    ds, i = _leaf(dataset, index)
    ds[0]  # noqa: B018 - megatron-core maps its index files on first access
    i = int(ds.shuffle_index[i])
    beg, beg_off = (int(x) for x in ds.sample_index[i])
    end, end_off = (int(x) for x in ds.sample_index[i + 1])
    extra = ds.config.add_extra_token_to_sequence
    indexed = ds.dataset
    prefix = indexed.path_prefix
    if prefix not in ids_cache:
        ids_cache[prefix] = (_read_ids(prefix), np.asarray(indexed.document_indices))
    ids, doc_starts = ids_cache[prefix]
    parts = []
    for k in range(beg, end + 1):
        seq = int(ds.document_index[k])
        start = beg_off if k == beg else 0
        stop = end_off + extra if k == end else int(indexed.sequence_lengths[seq])
        doc = int(np.searchsorted(doc_starts, seq, side="right") - 1)  # sentence-level datasets: its document
        parts.append({"sequence": seq, "document": doc, "id": ids[doc] if ids else None, "start": int(start),
                      "end": int(stop)})
    return {"sample": int(index), "dataset": prefix, "parts": parts}


def span_tokens(dataset, trace):
    """The tokens of a traced sample, read back from the .bin through its spans."""
    ds, _ = _leaf(dataset, trace["sample"])
    return np.concatenate([ds.dataset.get(p["sequence"], offset=p["start"], length=p["end"] - p["start"])
                           for p in trace["parts"]])


@contextlib.contextmanager
def one_process_group():
    """A process group of this process alone, when there is none."""
    import torch.distributed as dist

    from megatron_biomed.parallel.mesh import destroy
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        destroy()


def build_parser():
    from megatron_biomed.training.arguments import build_parser as pretrain_parser
    p = pretrain_parser()
    p.prog = "tools/trace_samples.py"
    p.description = ("List the documents (ids from the dataset's .ids) and token spans of every sample of the global "
                     "batch of iteration N, from the training run's own settings (give its --config and flags).")
    p.add_argument("--iteration", type=int, required=True, help="the optimizer step, as the training log counts")
    p.add_argument("--trace-output", default="-", help="JSON lines, one sample per line (default: standard output)")
    return p


@entry_point
def main(argv=None):
    from megatron_biomed.arguments import model_config, parallel_config
    from megatron_biomed.training.arguments import _yaml_defaults, finish
    from megatron_biomed.training.data import build_datasets
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    args = finish(parser.parse_args(argv))
    cfg, parallel = model_config(args), parallel_config(args)
    gbs = parallel.global_batch_size
    if gbs is None:
        raise UsageError("--global-batch-size: give the run's global batch size (with --micro-batch-size alone it "
                         "depends on the number of data-parallel ranks)")
    from megatron_biomed.training.schedule import BatchSchedule
    # a ramp's batch sizes do not depend on the data-parallel size (unless --decrease-batch-size-if-needed)
    batches = BatchSchedule(gbs, parallel.micro_batch_size, 1, args.rampup_batch_size)
    if args.train_iters is None:
        args.train_iters = batches.iterations_for(args.train_samples)
    if not 1 <= args.iteration <= args.train_iters:
        raise UsageError(f"--iteration {args.iteration}: the run has iterations 1..{args.train_iters}")
    eod = args.eod_id if args.eod_id is not None else cfg.vocab_size - 1
    with one_process_group():  # megatron-core's blended datasets ask for one
        train, _, _ = build_datasets(args, cfg.vocab_size, eod, gbs, cfg.seq_length,
                                     train_samples=batches.consumed(args.train_iters))
    start, ids_cache = batches.consumed(args.iteration - 1), {}
    out = sys.stdout if args.trace_output == "-" else None
    with (atomic_output(args.trace_output, "w", encoding="utf-8") if out is None else contextlib.nullcontext(out)) as f:
        for k in range(batches.batch_size(start)):
            record = trace_sample(train, start + k, ids_cache)
            record["row"] = k  # its row in the global batch (rank r of dp reads rows r*gbs/dp ...)
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
