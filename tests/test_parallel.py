"""Every (tp, pp, dp) layout of 1, 2 and 4 processes takes the same training step as one process.

Each layout runs as real processes (one per rank, gloo; the layouts of one process count one after
another in one launch); loss, gradient norm and all updated weights must equal a plain single-process
PyTorch step within 1e-5 (fp32, dropout off).
"""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from parallel_step import batch, tiny_config  # noqa: E402

from megatron_biomed.model.gpt import GPT  # noqa: E402

HELPER = os.path.join(ROOT, "tests", "helpers", "parallel_step.py")


def reference_step(global_batch=8, micro_batch=1, seq=32, heads=4):
    """Plain PyTorch: same init, mean loss over micro-batches, clip to 1.0, SGD(lr=1)."""
    config = tiny_config(num_attention_heads=heads)
    torch.manual_seed(1234)
    model = GPT(config)
    tokens, targets = batch(config, global_batch, seq)
    n_mb = global_batch // micro_batch
    total = 0.0
    for i in range(n_mb):
        sl = slice(i * micro_batch, (i + 1) * micro_batch)
        loss = F.cross_entropy(model(tokens[sl]).flatten(0, 1), targets[sl].flatten()) / n_mb
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return total, float(norm), {k: v.detach() for k, v in model.named_parameters()}


_REFERENCE = {}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(tmp_path, nproc, *args, env=None):
    """The helper as `nproc` processes with the variables torchrun sets (without torchrun's agent
    process, which costs a second per run)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, HELPER, "--out", str(tmp_path), *map(str, args)],
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE=str(nproc),
                                       LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       **(env or {})),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(nproc)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-4000:] for o in outs)
    return _results(tmp_path) if "--many" not in args else None


# (world size, flags): every tp x pp x dp in {1,2,4} with product <= 4, SP on/off, 1F1B/interleaved.
LAYOUTS = [
    (1, []),
    (2, ["--tp", 2]), (2, ["--tp", 2, "--sp"]),
    (2, ["--pp", 2]), (2, ["--pp", 2, "--vpp", 2]), (2, ["--pp", 2, "--schedule", "gpipe"]),
    (2, []),  # dp=2
    (4, ["--tp", 4]), (4, ["--tp", 4, "--sp"]),
    (4, ["--pp", 4]), (4, ["--pp", 4, "--vpp", 1]),
    (4, []),  # dp=4
    (4, ["--tp", 2, "--pp", 2]), (4, ["--tp", 2, "--pp", 2, "--sp", "--vpp", 2]),
    (4, ["--tp", 2]), (4, ["--tp", 2, "--sp"]),  # tp=2, dp=2
    (4, ["--pp", 2]), (4, ["--pp", 2, "--vpp", 2]),  # pp=2, dp=2
    # sharded data parallelism (FSDP2), alone and with tp/pp
    (2, ["--sharding", "full"]), (2, ["--sharding", "optimizer"]),
    (4, ["--tp", 2, "--sharding", "full"]), (4, ["--pp", 2, "--sharding", "full"]),
]


def layout_id(layout):
    n, flags = layout
    return f"n{n}" + "".join(str(f) for f in flags).replace("--", "_")


PARAMS = [pytest.param(x, id=layout_id(x), marks=[pytest.mark.slow] if x[0] == 4 else [])
          for x in LAYOUTS]


def _results(directory):
    results = [torch.load(f, weights_only=True) for f in sorted(glob.glob(str(directory / "pp*.pt")))]
    state = {}
    for res in results:
        state.update(res["state"])
    return results[0]["loss"].item(), results[0]["grad_norm"].item(), state, results


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """get(layouts, nproc, flags): the results of one layout, run with every layout of `layouts`
    of that process count in one launch (one process start instead of one per layout)."""
    done = {}

    def get(layouts, nproc, flags):
        key = (id(layouts), nproc)
        if key not in done:
            group = [f for n, f in layouts if n == nproc]
            out = tmp_path_factory.mktemp(f"n{nproc}")
            run_layout(out, nproc, "--many", json.dumps(group))
            done[key] = {tuple(map(str, f)): _results(out / str(i)) for i, f in enumerate(group)}
        return done[key][tuple(map(str, flags))]
    return get


@pytest.mark.parametrize("layout", PARAMS)
def test_layout_equals_single_process(tmp_path, layout, request):
    nproc, flags = layout
    if "ref" not in _REFERENCE:
        _REFERENCE["ref"] = reference_step()
    ref_loss, ref_norm, ref_state = _REFERENCE["ref"]
    if nproc > 1:
        loss, norm, state, results = request.getfixturevalue("launched")(LAYOUTS, nproc, flags)
    else:
        loss, norm, state, results = run_layout(tmp_path, nproc, *flags)
    assert abs(loss - ref_loss) < 1e-5
    assert abs(norm - ref_norm) < 1e-5 * max(1.0, ref_norm)
    tied_head = state.pop("lm_head.weight", None)
    assert sorted(state) == sorted(ref_state)
    for name, ref in ref_state.items():
        torch.testing.assert_close(state[name], ref, atol=1e-5, rtol=0, msg=name)
    if tied_head is not None:  # pipeline: the last stage's copy of the embedding stays equal
        torch.testing.assert_close(tied_head, ref_state["wte.weight"], atol=1e-5, rtol=0)


# The fast path on the same matrix: --compile (regional torch.compile) gives the eager numbers;
# bf16 parameters with fp32 main weights stay within bf16 round-off of the fp32 step, and data
# parallelism adds nothing to that (gradients are accumulated and reduced in fp32).
FAST_PATH = [
    (1, ["--compile"]), (2, ["--tp", 2, "--sp", "--compile"]),
    (2, ["--bf16"]), (2, ["--tp", 2, "--sp", "--bf16"]), (2, ["--pp", 2, "--vpp", 2, "--bf16", "--compile"]),
    (2, ["--sharding", "full", "--bf16", "--compile"]), (2, ["--sharding", "optimizer", "--bf16"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param(x, id=layout_id(x)) for x in FAST_PATH])
def test_fast_path_equals_single_process(tmp_path, layout, launched):
    nproc, flags = layout
    if "ref" not in _REFERENCE:
        _REFERENCE["ref"] = reference_step()
    ref_loss, ref_norm, ref_state = _REFERENCE["ref"]
    loss, norm, state, _ = launched(FAST_PATH, nproc, flags) if nproc > 1 else run_layout(tmp_path, nproc, *flags)
    if flags == ["--tp", 2, "--sp", "--compile"]:
        # again, compiled graphs now in the cache: AOTAutograd's cache once gave wrong gradients here
        (tmp_path / "warm").mkdir()
        assert run_layout(tmp_path / "warm", nproc, *flags)[:2] == (loss, norm)
    state.pop("lm_head.weight", None)
    bf16 = "--bf16" in flags
    assert abs(loss - ref_loss) < (2e-4 if bf16 else 1e-5)
    assert abs(norm - ref_norm) < (5e-3 if bf16 else 1e-5) * max(1.0, ref_norm)
    for name, ref in ref_state.items():
        assert state[name].dtype == torch.float32, name  # the main weights, not the bf16 copies
        torch.testing.assert_close(state[name], ref, atol=2e-3 if bf16 else 1e-5, rtol=0, msg=name)
    if bf16 and nproc == 2 and flags == ["--bf16"]:  # dp=2 equals one bf16 process
        (tmp_path / "one").mkdir()
        _, one_norm, one_state, _ = run_layout(tmp_path / "one", 1, "--bf16")
        assert abs(norm - one_norm) < 1e-5
        for name, w in one_state.items():
            torch.testing.assert_close(state.get(name, w), w, atol=1e-6, rtol=0, msg=name)
