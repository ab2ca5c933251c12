"""tools/trace_samples.py names the documents and token spans of each sample of iteration N's
global batch; the spans' tokens, read back from the .bin, are the tokens training reads."""
import json

import pytest

from conftest import run_tool
from test_pretrain import base_args


def trace(args, tmp_path, iteration):
    out = tmp_path / f"trace{iteration}.jsonl"
    run_tool("trace_samples", *args, "--iteration", iteration, "--trace-output", out, check=0)
    return [json.loads(line) for line in out.read_text().splitlines()]


def training_batch(args, step):
    """The tokens (and last labels) of global batch `step`, as the training loop reads them."""
    from megatron_biomed.arguments import model_config
    from megatron_biomed.training.arguments import parse_args
    from megatron_biomed.training.data import build_datasets, get_batch
    from megatron_biomed.training.trace_samples import one_process_group
    a = parse_args(args)
    cfg = model_config(a)
    with one_process_group():
        train, _, _ = build_datasets(a, cfg.vocab_size, a.eod_id, 8, cfg.seq_length)
    tokens, targets = get_batch(train, step * 8, 8, 0, 1)
    return tokens, targets, train


@pytest.mark.parametrize("blend", [False, True], ids=["one dataset", "blend of two"])
def test_traced_spans_are_the_tokens_training_reads(dataset, tmp_path, blend):
    data = dataset["prefix"]
    args = base_args(dataset, tmp_path, iters=20, **({"data-path": f"0.7 {data} 0.3 {data}"} if blend else {}))
    if blend:  # --data-path takes several values
        i = args.index("--data-path")
        args[i + 1:i + 2] = ["0.7", data, "0.3", data]
    ids = open(data + ".ids").read().split()
    for iteration in ((1,) if blend else (7,)):
        records = trace(args, tmp_path, iteration)
        tokens, targets, train = training_batch(args, iteration - 1)
        assert [r["row"] for r in records] == list(range(8))
        from megatron_biomed.training.trace_samples import span_tokens
        for r, row_tokens, row_targets in zip(records, tokens, targets):
            got = span_tokens(train, r)  # the .bin read through the traced spans
            assert len(got) == 33  # seq length 32 + the last label
            assert got[:-1].tolist() == row_tokens.tolist() and int(got[-1]) == int(row_targets[-1])
            assert all(p["id"] == ids[p["document"]] for p in r["parts"])
            assert r["parts"][0]["start"] >= 0 and all(p["end"] > p["start"] for p in r["parts"])
        assert records[0]["parts"][0]["id"].startswith("PMID:")


def test_bad_iteration_is_one_line(dataset, tmp_path):
    r = run_tool("trace_samples", *base_args(dataset, tmp_path, iters=5), "--iteration", 6)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --iteration 6: the run has iterations 1..5"
