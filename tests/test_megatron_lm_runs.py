"""The features behind Megatron-LM's flags, in real multi-process runs: the batch-size ramp-up
(megatron-core's sizes, resumed mid-ramp, Megatron's sample order), overlapped gradient
reduction and the distributed optimizer (equal to the plain step), asynchronous checkpoints
(equal to synchronous ones), W&B offline, the profiler; and the flag sets of Megatron-LM's own
example GPT scripts, trained through our pretrain_gpt with torchrun."""
import glob
import json
import os
import shlex
import struct
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import ROOT
from test_pretrain import base_args, checkpoint_tensors, scalars, train

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

RAMP = dict(gbs=8, mbs=1, dp=2, ramp=(2, 2, 24))


def _ramp_args(dataset, run, **kw):
    return base_args(dataset, run, iters=10, **{"micro-batch-size": RAMP["mbs"], "global-batch-size": RAMP["gbs"],
                                                 "rampup-batch-size": " ".join(map(str, RAMP["ramp"])),
                                                 "lr-warmup-iters": None, "lr-warmup-fraction": 0.1}, **kw)


def _split(args):  # base_args joins a multi-value flag into one string
    out = []
    for a in args:
        out += a.split() if a.startswith(tuple("0123456789")) and " " in a else [a]
    return out


def test_rampup_batch_size_resumes_mid_ramp_in_megatron_order(dataset, tmp_path):
    """DP=2: the global batch of each iteration is megatron-core's ramp; stopped at iteration 5
    (mid-ramp) and resumed, every loss equals the uninterrupted run's; iteration k trains on
    the samples after megatron-core's consumed count, as Megatron's sampler hands them out."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
    ref = tmp_path / "ref"
    out = train(2, _split(_ramp_args(dataset, ref)))
    assert "batch size ramp-up: global batch 2 -> 4 -> 6 -> 8 over the first 24 samples" in out
    calc = RampupBatchsizeNumMicroBatchesCalculator(RAMP["gbs"], RAMP["mbs"], RAMP["dp"], False, 0, *RAMP["ramp"])
    sizes, consumed, starts = [], 0, []
    for _ in range(10):
        calc.update(consumed, consistency_check=True)
        starts.append(consumed)
        sizes.append(calc.get_current_global_batch_size())
        consumed += sizes[-1]
    assert scalars(ref / "tb", "train/batch_size") == {k + 1: float(s) for k, s in enumerate(sizes)}
    assert f"consumed samples: {consumed:12d}" in out

    run = tmp_path / "run"
    train(2, _split(_ramp_args(dataset, run, save=run / "ckpt", **{"exit-interval": 5})))
    train(2, _split(_ramp_args(dataset, run, save=run / "ckpt", load=run / "ckpt",
                               **{"tensorboard-dir": run / "tb2"})))
    resumed = {**scalars(run / "tb", "train/loss"), **scalars(run / "tb2", "train/loss")}
    assert resumed == scalars(ref / "tb", "train/loss")
    assert json.loads((run / "ckpt" / "iter_0000005" / "config.json").read_text())["consumed_samples"] == starts[5]
    from megatron_biomed.training.arguments import parse_args  # the run's settings.yaml runs it again
    again = parse_args(["--config", str(run / "ckpt" / "settings.yaml")])
    assert again.rampup_batch_size == list(RAMP["ramp"]) and again.lr_warmup_fraction == 0.1

    # the samples of iteration 7 are those after starts[6], in order (trace_samples reads them
    # as the training loop does)
    from megatron_biomed.training.trace_samples import main as trace_samples  # the tool's main, in this process
    args = _split(_ramp_args(dataset, tmp_path / "t")) + ["--iteration", "7", "--trace-output", str(tmp_path / "t.jsonl")]
    assert trace_samples(args) == 0
    traced = [json.loads(line)["sample"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert traced == list(range(starts[6], starts[6] + sizes[6]))


STEP = {"micro-batch-size": 2, "global-batch-size": 8}  # DP=2: two micro-batches per rank and step


@pytest.fixture(scope="module")
def plain_step(dataset, tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain")
    train(2, base_args(dataset, plain, iters=6, save=plain / "ckpt", **STEP))
    return plain


@pytest.mark.parametrize("flags", [{"overlap-grad-reduce": True, "ddp-bucket-size": 3000},
                                   {"use-distributed-optimizer": True, "overlap-grad-reduce": True,
                                    "overlap-param-gather": True}],
                         ids=["overlap-grad-reduce", "distributed-optimizer"])
def test_overlapped_reduction_equals_the_plain_step(dataset, tmp_path, flags, plain_step):
    """DP=2, two micro-batches per step: every loss and every weight after 6 steps equal the
    plain (reduce after backward) run within 1e-6; under --overlap-grad-reduce the buckets are
    already reducing when backward returns."""
    common, plain = STEP, plain_step
    run = tmp_path / "run"
    out = train(2, base_args(dataset, run, iters=6, save=run / "ckpt", **common, **flags))
    if "ddp-bucket-size" in flags:
        line = next(x for x in out.splitlines() if x.startswith("--overlap-grad-reduce:"))
        overlapped, total = (int(w) for w in line.split()[1:4:2])
        assert total > 3 and overlapped == total, line
    else:
        assert "'sharding': 'optimizer'" in out
    a, b = scalars(plain / "tb", "train/loss"), scalars(run / "tb", "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for k in a:
        assert abs(a[k] - b[k]) < 1e-6, (k, a[k], b[k])
    ta = checkpoint_tensors(str(plain / "ckpt" / "iter_0000006"))
    tb = checkpoint_tensors(str(run / "ckpt" / "iter_0000006"))
    for key in (k for k in ta if k.startswith("model.")):
        assert torch.allclose(ta[key], tb[key], rtol=0, atol=1e-6), key


def test_async_save_writes_the_checkpoints_a_synchronous_save_writes(dataset, tmp_path):
    """TP=2: with --async-save every checkpoint holds the same tensors as the synchronous run's,
    the training went on while they were written, and a resume from the middle one is exact."""
    common = {"tensor-model-parallel-size": 2, "save-interval": 2}
    sync = tmp_path / "sync"
    train(2, base_args(dataset, sync, iters=6, save=sync / "ckpt", **common))
    run = tmp_path / "async"
    out = train(2, base_args(dataset, run, iters=6, save=run / "ckpt", **common, **{"async-save": True}))
    assert out.count("writing in the background") == 3 and "(in the background)" in out
    for i in (2, 4, 6):
        a = checkpoint_tensors(str(sync / "ckpt" / f"iter_{i:07d}"))
        b = checkpoint_tensors(str(run / "ckpt" / f"iter_{i:07d}"))
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    assert (run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def wandb_history(run_dir):
    """The scalars an offline W&B run logged, read from its .wandb file (W&B's LevelDB-log
    format: a 7-byte header, 32 KiB blocks, records of crc32 | length | type | protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb
    [path] = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[items["_step"]] = items
    return history


def test_wandb_offline_and_profiler(dataset, tmp_path):
    """W&B in offline mode (no network) gets the scalars TensorBoard gets; --profile writes a
    torch.profiler trace of the iterations asked for, in the TensorBoard directory."""
    args = base_args(dataset, tmp_path, iters=4, **{"wandb-project": "biomedlm-test", "wandb-exp-name": "offline",
                                                    "wandb-save-dir": tmp_path / "wb", "profile": True,
                                                    "profile-step-start": 2, "profile-step-end": 3})
    out = train(1, args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    history = wandb_history(tmp_path / "wb")
    loss = scalars(tmp_path / "tb", "train/loss")
    assert sorted(history) == sorted(loss) == [1, 2, 3, 4]
    for step, value in loss.items():
        assert history[step]["train/loss"] == pytest.approx(value, rel=1e-6)
        assert history[step]["train/lr"] == pytest.approx(scalars(tmp_path / "tb", "train/lr")[step], rel=1e-6)
    assert "profile of iterations 2..3 (rank 0) written to" in out
    [trace] = glob.glob(str(tmp_path / "tb" / "profile" / "rank0.*.pt.trace.json"))
    events = json.load(open(trace))["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)


def test_wandb_without_a_login_is_one_line(dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", WANDB_API_KEY="", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"))
    r = subprocess.run([sys.executable, "-m", "megatron_biomed.pretrain_gpt",
                        *base_args(dataset, tmp_path, iters=2, **{"wandb-project": "p",
                                                                  "wandb-save-dir": tmp_path / "wb"})],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --wandb-project p: W&B could not start:") and "WANDB_MODE=offline" in last


# -- Megatron-LM's own example GPT scripts ------------------------------------------------------
# Their flags as written (core_v0.16.1), every flag kept; only sizes shrunk to a tiny model, the
# data and paths ours, and --split made to give a small dataset its three splits.
GPT3_175B = """
    --num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048
    --attention-backend auto
    --micro-batch-size 1 --global-batch-size 1536 --rampup-batch-size 16 16 5859375 --train-iters 500000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0 --fp16
    --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
    --data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
    --log-interval 100 --save-interval 10000 --eval-interval 1000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
    --eval-iters 10 --tensorboard-dir $TENSORBOARD_LOGS_PATH
"""  # examples/gpt3/train_gpt3_175b_distributed.sh
# tests/functional_tests/test_cases/gpt/gpt3_mcore_tp1_pp1_dist_optimizer_overlap_grad_reduce_param_gather
DIST_OPTIMIZER = """
    --num-layers 12 --hidden-size 512 --num-attention-heads 8 --log-params-norm --log-num-zeros-in-grad
    --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --tensorboard-dir $TENSORBOARD_LOGS_PATH
    --micro-batch-size 4 --global-batch-size 32 --seq-length 1024 --max-position-embeddings 1024 --train-iters 50
    --timing-log-level 0 --lr-decay-iters 320000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
    --data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
    --distributed-backend nccl --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2
    --clip-grad 1.0 --lr-warmup-fraction .01 --log-interval 1 --save-interval 10000 --eval-interval 1000
    --eval-iters 10 --transformer-impl local --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather --deterministic-mode
    --no-gradient-accumulation-fusion --use-mcore-models --ckpt-format torch_dist --dist-ckpt-strictness log_all
    --data-cache-path $DATA_CACHE_PATH --bf16 --apply-query-key-layer-scaling --log-memory-to-tensorboard
"""
# tests/functional_tests/test_cases/gpt/gpt3_mcore_tp2_pp2_uninstall_te
TP2_PP2_NO_TE = """
    --num-layers 12 --hidden-size 512 --num-attention-heads 8 --log-params-norm --log-num-zeros-in-grad
    --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --tensorboard-dir $TENSORBOARD_LOGS_PATH
    --micro-batch-size 4 --global-batch-size 32 --seq-length 1024 --max-position-embeddings 1024 --train-iters 50
    --timing-log-level 0 --lr-decay-iters 320000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
    --data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
    --distributed-backend nccl --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2
    --clip-grad 1.0 --lr-warmup-fraction .01 --log-interval 1 --save-interval 10000 --eval-interval 1000
    --eval-iters 10 --transformer-impl local --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    --no-persist-layer-norm --no-masked-softmax-fusion --deterministic-mode --no-gradient-accumulation-fusion
    --use-mcore-models --ckpt-format torch_dist --dist-ckpt-strictness log_all --data-cache-path $DATA_CACHE_PATH
    --fp16 --apply-query-key-layer-scaling --log-memory-to-tensorboard
"""
TINY = {"--num-layers": "4", "--hidden-size": "64", "--num-attention-heads": "4", "--seq-length": "32",
        "--max-position-embeddings": "32", "--global-batch-size": "8", "--micro-batch-size": "1",
        "--train-iters": "6", "--lr-decay-iters": "5", "--eval-interval": "3", "--eval-iters": "2",
        "--save-interval": "3", "--split": "90,8,2", "--rampup-batch-size": ["2", "2", "8"],
        "--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2"}


def _shrunk(script, paths):
    """The script's flags in order, every one kept, values shrunk by TINY and paths filled in."""
    words = shlex.split(script)
    for name, value in paths.items():
        words = [value if w == f"${name}" else w for w in words]
    out, i = [], 0
    while i < len(words):
        flag = words[i]
        values = []
        i += 1
        while i < len(words) and not words[i].startswith("--"):
            values.append(words[i])
            i += 1
        new = TINY.get(flag)
        if new is not None and flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
            new = new if values != ["1"] else "1"
        out += [flag, *(new if isinstance(new, list) else [new] if new is not None else values)]
    return out


def _script_argv(script, dataset, tmp_path):
    vocab_dir = os.path.dirname(dataset["vocab"])
    argv = _shrunk(script, {"DATA_PATH": dataset["prefix"], "VOCAB_FILE": dataset["vocab"],
                            "MERGE_FILE": os.path.join(vocab_dir, "merges.txt"),
                            "CHECKPOINT_PATH": str(tmp_path / "ckpt"), "TENSORBOARD_LOGS_PATH": str(tmp_path / "tb"),
                            "DATA_CACHE_PATH": dataset["cache"]})
    flags = {w for w in shlex.split(script) if w.startswith("--")}
    assert flags <= set(argv)  # every flag kept
    return argv


def test_every_example_flag_set_parses(dataset, tmp_path):
    """All three flag sets parse into runs (the third trains like the first: TP2 x PP2, --fp16)."""
    from megatron_biomed.arguments import model_config
    from megatron_biomed.training.arguments import parse_args
    for script in (GPT3_175B, DIST_OPTIMIZER, TP2_PP2_NO_TE):
        a = parse_args(_script_argv(script, dataset, tmp_path))
        assert model_config(a).seq_length == 32 and a.train_iters == 6


@pytest.mark.slow
@pytest.mark.parametrize("script", [GPT3_175B, DIST_OPTIMIZER], ids=["gpt3_175b_distributed", "dist_optimizer_overlap"])
def test_megatron_lm_example_scripts_train(dataset, tmp_path, script):
    argv = _script_argv(script, dataset, tmp_path)
    tp = argv[argv.index("--tensor-model-parallel-size") + 1]
    pp = argv[argv.index("--pipeline-model-parallel-size") + 1]
    nproc = int(tp) * int(pp) * (2 if (tp, pp) == ("1", "1") else 1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        "-m", "megatron_biomed.pretrain_gpt", *argv],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "unrecognized arguments" not in r.stdout + r.stderr
    loss = scalars(tmp_path / "tb", "train/loss")
    assert sorted(loss) == list(range(1, 7))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_exit_signal_saves_and_exits_resumable(dataset, tmp_path):
    """--exit-signal-handler --exit-signal 2 (SIGINT): the run finishes its step, saves and exits
    75 (requeue), as on SIGTERM; --distributed-timeout-minutes reaches the process group."""
    import signal
    import time
    from test_pretrain import finish, launch
    args = base_args(dataset, tmp_path, iters=500, save=tmp_path / "ckpt",
                     **{"exit-signal-handler": True, "exit-signal": 2, "distributed-timeout-minutes": 3})
    procs = launch(1, args)
    out = ""
    while "iteration        3/" not in out:
        line = procs[0].stdout.readline()
        assert line, out[-3000:]
        out += line
    procs[0].send_signal(signal.SIGINT)
    t0 = time.time()
    codes, outs = finish(procs)
    out += outs[0]
    assert codes == [75], out[-3000:]
    assert "received SIGINT: stopping at iteration" in out and time.time() - t0 < 60
    assert "collectives time out after 3 min (--distributed-timeout-minutes)" in out
    latest = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= latest < 500
