"""pretrain_gpt end to end on CPU: real processes (launched as srun would: RANK/WORLD_SIZE per
process), gloo, a tiny model on .bin/.idx data made by our own tools."""
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT


def base_args(ds, tmp_path, iters=8, **kw):
    args = {"model": "tiny", "vocab-file": ds["vocab"], "data-path": ds["prefix"], "data-cache-path": ds["cache"],
            "seq-length": 32, "micro-batch-size": 2, "global-batch-size": 8, "train-iters": iters, "lr": 3e-3,
            "min-lr": 3e-4, "lr-warmup-iters": 2, "log-interval": 1, "eval-iters": 0, "hidden-dropout": 0.0,
            "attention-dropout": 0.0, "tensorboard-dir": tmp_path / "tb", "seed": 1234, "split": "90,8,2"}
    args.update(kw)
    out = []
    for k, v in args.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None and v is not False:
            out += [f"--{k}", str(v)]
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, args, env=None):
    """One process per rank, with the variables srun/torchrun would set."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        e = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_biomed.pretrain_gpt", *args], cwd=ROOT,
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def finish(procs, timeout=300):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
        outs.append(out)
    return [p.returncode for p in procs], outs


def train(nproc, args, expect=0, env=None):
    codes, outs = finish(launch(nproc, args, env))
    assert codes == [expect] * nproc, f"exit codes {codes}\n" + outs[0][-5000:] + "\n--- rank 1:\n" + outs[-1][-3000:]
    return outs[0]


def scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = {}
    for run in sorted(glob.glob(os.path.join(tb_dir, "events.*"))):
        ea = EventAccumulator(run)
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            values.update({e.step: e.value for e in ea.Scalars(tag)})
    return values


def checkpoint_tensors(path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = path + ".pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("layout", [{"tensor-model-parallel-size": 2}, {"pipeline-model-parallel-size": 2}],
                         ids=["tp2", "pp2"])
def test_loss_falls_and_tensorboard_has_scalars(dataset, tmp_path, layout):
    args = base_args(dataset, tmp_path, iters=30, **layout, **{"eval-interval": 10, "eval-iters": 2,
                                                               "peak-tflops": 0.05, "log-interval": 5})
    out = train(2, args)
    loss = scalars(tmp_path / "tb", "train/loss")
    assert sorted(loss) == list(range(1, 31))
    first, last = sum(loss[i] for i in (1, 2, 3)) / 3, sum(loss[i] for i in (28, 29, 30)) / 3
    assert last < first - 1.0, (first, last)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device", "train/mfu",
                "train/peak_mem_gib", "validation/loss", "validation/ppl", "test/loss"):
        assert scalars(tmp_path / "tb", tag), f"no {tag} in TensorBoard"
    valid = scalars(tmp_path / "tb", "validation/loss")
    assert sorted(valid) == [10, 20, 30] and valid[30] < valid[10]
    assert "validation loss at iteration 30" in out and "MFU: " in out and "tokens/s: " in out
    line = next(x for x in out.splitlines() if "step time per rank (ms):" in x)  # a slow rank is named
    assert re.search(r"min [\d.]+ \| median [\d.]+ \| max [\d.]+ \(rank [01] on \S+\)$", line), line
    assert scalars(tmp_path / "tb", "train/step_ms_max_rank")


def test_kill_during_save_then_resume_is_exact(dataset, tmp_path):
    """tp=2 with dropout on (per-rank RNG streams must be restored). Save at 4; kill -9 inside
    the save at 8; resume from 4: iterations 5..10 equal an uninterrupted run bit for bit."""
    common = {"tensor-model-parallel-size": 2, "hidden-dropout": 0.1, "attention-dropout": 0.1,
              "save-interval": 4}
    ref = tmp_path / "ref"
    train(2, base_args(dataset, ref, iters=10, save=ref / "ckpt", **common))
    run = tmp_path / "run"
    args = base_args(dataset, run, iters=10, save=run / "ckpt", load=run / "ckpt", **common)
    procs = launch(2, args, env={"MEGATRON_BIOMED_TEST_PAUSE_IN_SAVE": "8"})
    deadline = time.time() + 240
    seen = ""
    while "paused inside the save of iteration 8" not in seen:
        line = procs[0].stdout.readline()
        assert line or procs[0].poll() is None, seen[-3000:]
        seen += line
        assert time.time() < deadline, seen[-3000:]
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    ckpt = run / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (ckpt / "iter_0000008.tmp" / ".metadata").exists()  # shards were written ...
    assert not (ckpt / "iter_0000008").exists()  # ... but the checkpoint was never made complete
    out = train(2, args)
    assert "loaded checkpoint" in out and "iter_0000004" in out
    ref_loss, loss = scalars(ref / "tb", "train/loss"), scalars(run / "tb", "train/loss")
    assert all(ref_loss[i] == loss[i] for i in range(5, 11)), (ref_loss, loss)
    a = checkpoint_tensors(str(ref / "ckpt" / "iter_0000010"))
    b = checkpoint_tensors(str(ckpt / "iter_0000010"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not glob.glob(str(ckpt / "*.tmp"))  # the killed save's leftovers are gone


@pytest.mark.slow
def test_tp2_checkpoint_resumes_as_pp2_dp2(dataset, tmp_path):
    """DCP reshards: a tp=2 checkpoint continues under pp=2 x dp=2 with the same losses. The
    vocabulary padding differs between the layouts (multiple of 96 x TP), so the embedding and
    its optimizer states change shape on the way."""
    extra = {"make-vocab-size-divisible-by": 96, "save-interval": 4}
    ref = tmp_path / "ref"
    train(2, base_args(dataset, ref, iters=8, save=ref / "ckpt", **{"tensor-model-parallel-size": 2}, **extra))
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    # start from the tp=2 checkpoint of iteration 4
    import shutil
    shutil.copytree(ref / "ckpt" / "iter_0000004", run / "ckpt" / "iter_0000004")
    (run / "ckpt" / "latest_checkpointed_iteration.txt").write_text("4\n")
    out = train(4, base_args(dataset, run, iters=8, load=run / "ckpt", **{"pipeline-model-parallel-size": 2}, **extra))
    assert "resharded to" in out
    ref_loss, loss = scalars(ref / "tb", "train/loss"), scalars(run / "tb", "train/loss")
    assert sorted(loss) == [5, 6, 7, 8]
    for i in range(5, 9):
        assert abs(ref_loss[i] - loss[i]) < 1e-5, (i, ref_loss[i], loss[i])


def test_signal_saves_and_exits_resumable(dataset, tmp_path):
    """SIGUSR1 to one rank only: both finish the step, save, and exit 75; a rerun resumes."""
    ckpt = tmp_path / "ckpt"
    args = base_args(dataset, tmp_path, iters=10_000, save=ckpt, load=ckpt)
    procs = launch(2, args)
    seen = ""
    while " iteration        3/" not in seen:
        line = procs[0].stdout.readline()
        assert line, seen[-3000:]
        seen += line
    procs[1].send_signal(signal.SIGUSR1)
    codes, outs = finish(procs)
    assert codes == [75, 75], outs[0][-3000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 3 and "received a signal (on another rank): stopping at iteration" in outs[0]
    out = train(2, base_args(dataset, tmp_path, iters=saved + 2, save=ckpt, load=ckpt))
    assert f"iter_{saved:07d}" in out and f"training iterations {saved + 1}..{saved + 2}" in out


def test_nan_loss_stops_naming_the_iteration(dataset, tmp_path):
    out = train(1, base_args(dataset, tmp_path, iters=6, lr=1e6, **{"clip-grad": 0, "lr-warmup-iters": 0}), expect=1)
    assert "error: loss is nan at iteration 2; stopping; no checkpoint was saved" in out


def test_token_ids_beyond_the_vocabulary_fail_at_start(dataset, tmp_path):
    out = train(1, base_args(dataset, tmp_path, **{"vocab-file": None, "vocab-size": 500}), expect=1)
    assert "error: --data-path " + dataset["prefix"] in out
    assert "out of range for the model's vocabulary of 500" in out
    assert "iteration" not in out.split("error:")[0].split("building")[-1]


def test_split_without_documents_is_refused(dataset, tmp_path):
    # megatron-core itself would loop forever building an empty split
    out = train(1, base_args(dataset, tmp_path, split="969,30,1", **{"eval-iters": 2}), expect=2)  # a bad setting
    assert "error: --split 969,30,1 gives the test split none of the 400 sequences" in out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(dataset, tmp_path, precision):
    """fp16: autocast with loss scaling. bf16: bf16 parameters with fp32 main weights, here with
    --compile too; a resume from the checkpoint of iteration 6 (fp32 main weights in, bf16 copies
    made from them) continues with the very same losses."""
    extra = {precision: True}
    if precision == "fp16":
        extra["initial-loss-scale"] = 2 ** 12
    else:
        extra.update({"compile": True, "save-interval": 6})
    out = train(1, base_args(dataset, tmp_path, iters=12, save=tmp_path / "ckpt", **extra))
    loss = scalars(tmp_path / "tb", "train/loss")
    assert loss[12] < loss[1] - 0.3, loss
    if precision == "bf16":
        assert "warning: --compile" not in out
        import shutil
        run = tmp_path / "run"
        shutil.copytree(tmp_path / "ckpt" / "iter_0000006", run / "ckpt" / "iter_0000006")
        (run / "ckpt" / "latest_checkpointed_iteration.txt").write_text("6\n")
        train(1, base_args(dataset, run, iters=12, save=run / "ckpt", load=run / "ckpt", **extra))
        resumed = scalars(run / "tb", "train/loss")
        assert [resumed[i] for i in range(7, 13)] == [loss[i] for i in range(7, 13)]


def test_yaml_config_and_flag_overrides(tmp_path, trained_tokenizer):
    vocab = trained_tokenizer / "vocab.json"
    from megatron_biomed.training.arguments import ConfigError, parse_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\nnum_layers: 2\nlr: 1.0e-3\ntrain-iters: 5\ndata-path: [a, b]\nbf16: true\n")
    args = parse_args(["--config", str(cfg), "--lr", "2e-3"])
    assert (args.model, args.num_layers, args.lr, args.train_iters, args.data_path, args.bf16) == \
        ("tiny", 2, 2e-3, 5, ["a", "b"], True)
    assert args.lr_decay_iters is None  # --train-iters, derived by the schedule (training/schedule.py)
    cfg.write_text("model: tiny\nnum-layer: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown setting 'num-layer'"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="give one of --train-iters and --train-samples"):
        parse_args(["--lr", "1", "--data-path", "x"])
    args = parse_args(["--config", os.path.join(ROOT, "examples", "configs", "tiny.yaml"), "--data-path", "x"])
    assert (args.model, args.train_iters, args.global_batch_size) == ("tiny", 200, 8)
    args = parse_args(["--config", os.path.join(ROOT, "examples", "configs", "biomedlm-2.7b.yaml"),
                       "--vocab-file", str(vocab)])
    assert (args.model, args.global_batch_size, args.lr, args.seq_length, args.bf16) == \
        ("biomedlm-2.7b", 1024, 1.6e-4, 1024, True)
    assert round(args.train_iters * 1024 * 1024 / 1e9) == 300  # 300B tokens


def test_bad_layout_is_one_clear_line(dataset, tmp_path):
    out = train(2, base_args(dataset, tmp_path, **{"tensor-model-parallel-size": 3}), expect=2)
    assert "error: world size 2 is not divisible by --tensor-model-parallel-size 3" in out


def test_loss_scaler():  # the learning-rate schedules: tests/test_megatron_lm_flags.py, against megatron-core
    from megatron_biomed.training.optimizer import LossScaler
    s = LossScaler(initial=1024, window=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024  # hysteresis: the first overflow is tolerated
    s.update(True)
    assert s.scale == 512
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024


def test_unused_empty_split_is_skipped(dataset, tmp_path):
    """--split 949,50,1 on 400 documents leaves the test split empty; with --eval-iters 0 nothing
    is asked of it, and training runs (megatron-core alone would loop forever building it)."""
    out = train(1, base_args(dataset, tmp_path, iters=2, split="949,50,1"))
    assert "iteration        2/" in out


def test_compile_falls_back_with_a_warning_where_inductor_cannot_run(dataset, tmp_path):
    env = {"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = train(1, base_args(dataset, tmp_path, iters=2, compile=True), env=env)
    assert ("warning: --compile: torch.compile cannot run here (InductorError: InvalidCxxCompiler: No working "
            "C++ compiler found") in out
    assert "training without it" in out and "iteration        2/       2" in out
