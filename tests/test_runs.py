"""Runs that cannot hurt each other, and settings that say what is wrong: one run per --save (a
lock naming its holder, released when the holder dies), outputs apart from inputs, a .idx that
must describe its .bin, free ports, threads that follow the CPUs given, strict YAML types,
a --load that is not ours, --train-iters below the checkpoint, and a run's settings.yaml that
runs it again. Each case runs pretraining as a user would, in a fresh process."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT
from test_pretrain import base_args, checkpoint_tensors, scalars

from megatron_biomed.utils import cpu_budget


def start(args, env=None, log=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                   "LOCAL_RANK", "OMP_NUM_THREADS"))}
    e.pop("MEGATRON_BIOMED_DEBUG", None)
    e.update(env or {})
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "megatron_biomed.pretrain_gpt", *map(str, args)], cwd=ROOT,
                            env=e, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(args, env=None, timeout=300):
    p = start(args, env)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def one_error(out):
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    return lines[0]


def wait_for(path, needle, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = open(path).read() if os.path.exists(path) else ""
        if needle in text:
            return text
        assert proc.poll() is None, text[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not seen in {timeout} s:\n{open(path).read()[-3000:]}")


def test_one_run_per_save_directory(dataset, tmp_path):
    """A job submitted twice: the second stops at start naming the first (host, PID, Slurm job);
    a third run elsewhere on the same machine trains beside it (a free port each); once the first
    is killed -9 the directory is usable again with nothing to clean up."""
    save = tmp_path / "ckpt"
    first = start(base_args(dataset, tmp_path, iters=100000, save=save, **{"save-interval": 100000}),
                  env={"SLURM_JOB_ID": "4242"}, log=tmp_path / "first.log")
    try:
        wait_for(tmp_path / "first.log", "training iterations", first)
        # the settings are in the run directory from the start, before any checkpoint
        assert (save / "settings.yaml").exists() and not list(save.glob("iter_*"))
        code, out = run(base_args(dataset, tmp_path / "second", iters=2, save=save))
        line = one_error(out)
        assert code == 1 and line.startswith(f"error: --save {save}: in use by another training run (host "
                                             f"{socket.gethostname()}, PID {first.pid}, Slurm job 4242"), line
        assert "training iterations" not in out
        code, out = run(base_args(dataset, tmp_path / "beside", iters=2, save=tmp_path / "beside" / "ckpt"))
        assert code == 0, out[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    code, out = run(base_args(dataset, tmp_path, iters=2, save=save))
    assert code == 0 and (save / "iter_0000002").is_dir(), out[-3000:]


def test_settings_file_runs_the_same_run_again(dataset, tmp_path):
    a = tmp_path / "a"
    code, out = run(base_args(dataset, a, iters=4, save=a / "ckpt"))
    assert code == 0, out[-3000:]
    settings = a / "ckpt" / "settings.yaml"
    saved = yaml.safe_load(settings.read_text())
    assert saved["train_iters"] == 4 and saved["num_layers"] == 4 and "config" not in saved
    assert saved["lr_decay_iters"] is None  # derived from --train-iters: a rerun with more derives it again
    b = tmp_path / "b"
    code, out = run(["--config", settings, "--save", b / "ckpt", "--tensorboard-dir", b / "tb"])
    assert code == 0, out[-3000:]
    assert scalars(a / "tb", "train/loss") == scalars(b / "tb", "train/loss")
    ta = checkpoint_tensors(str(a / "ckpt" / "iter_0000004"))
    tb = checkpoint_tensors(str(b / "ckpt" / "iter_0000004"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith("model."))
    # the new run's own settings equal the first's but for where it writes
    again = yaml.safe_load((b / "ckpt" / "settings.yaml").read_text())
    assert {k: v for k, v in again.items() if k not in ("save", "tensorboard_dir")} == \
        {k: v for k, v in saved.items() if k not in ("save", "tensorboard_dir")}


def test_wrong_yaml_types_name_the_key_and_the_file(dataset, tmp_path):
    from megatron_biomed.errors import one_line
    from megatron_biomed.training.arguments import ConfigError, parse_args
    cases = [("micro-batch-size: four", "micro-batch-size: 'four' is not a whole number"),
             ("seq-length: 64.5", "seq-length: 64.5 is not a whole number"),
             ("lr: [1, 2]", "lr: [1, 2] is not a number"),
             ("bf16: 'no'", "bf16: 'no' is not true or false"),
             ("train-iters: true", "train-iters: True is not a whole number"),
             ("data-path: [[a, b]]", "data-path: ['a', 'b'] is not a single value")]
    cfg = tmp_path / "c.yaml"
    flags = ["--config", str(cfg), "--lr", "1e-3", "--train-iters", "2", "--data-path", dataset["prefix"]]
    for text, needle in cases:
        cfg.write_text(f"model: tiny\n{text}\n")
        with pytest.raises(ConfigError) as e:
            parse_args(flags)
        assert one_line(e.value).startswith(f"--config {cfg}: {needle}; "), one_line(e.value)
    # as the user sees it: one line, exit 2, nothing started
    code, out = run(flags)
    assert code == 2 and one_error(out).startswith(f"error: --config {cfg}: {needle}; ")
    # integral floats and quoted numbers are what they say
    cfg.write_text("model: tiny\nseq-length: 32.0\nlr: '3e-3'\n")
    args = parse_args(["--config", str(cfg), "--train-iters", "2", "--data-path", dataset["prefix"]])
    assert args.seq_length == 32 and isinstance(args.seq_length, int) and args.lr == 3e-3
    # a packaged config by name, from any directory
    args = parse_args(["--config", "tiny", "--data-path", dataset["prefix"]])
    assert args.model == "tiny" and args.train_iters == 200


def test_loads_that_cannot_train_are_refused_at_start(dataset, tmp_path):
    save = tmp_path / "ckpt"
    code, out = run(base_args(dataset, tmp_path, iters=4, save=save))
    assert code == 0, out[-3000:]
    # --train-iters below the checkpoint's iteration: nothing would be trained
    code, out = run(base_args(dataset, tmp_path, iters=2, save=save, load=save))
    assert code == 2 and "--train-iters 2: the checkpoint loaded" in one_error(out) and \
        "at iteration 4, so nothing would be trained" in out
    # --save inside the checkpoint it loads
    inner = save / "iter_0000004" / "more"
    code, out = run(base_args(dataset, tmp_path, iters=6, save=inner, load=save / "iter_0000004"))
    assert code == 2 and f"--save {inner}: lies inside --load" in one_error(out) and not inner.exists()
    # a Hugging Face directory as --load: say so and how to convert it (not random weights)
    hf = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "megatron_biomed.convert.cli", "--load", save, "--save", hf,
                        "--target-format", "hf", "--no-tokenizer"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    code, out = run(base_args(dataset, tmp_path, iters=2, load=hf, save=tmp_path / "new"))
    line = one_error(out)
    assert code == 2 and f"--load {hf}: is a Hugging Face model, not a checkpoint of ours" in line and \
        "megatron-biomed-convert --load" in line, line
    # a Megatron-LM run directory (its layout: latest file, iter_N/metadata.json of torch_dist)
    mlm = tmp_path / "megatron_run"
    (mlm / "iter_0000005").mkdir(parents=True)
    (mlm / "latest_checkpointed_iteration.txt").write_text("5\n")
    (mlm / "iter_0000005" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    code, out = run(base_args(dataset, tmp_path, iters=2, load=mlm, save=tmp_path / "new"))
    assert code == 2 and f"--load {mlm}: is a Megatron-LM checkpoint, not a checkpoint of ours" in one_error(out)


def test_a_bin_longer_than_its_idx_describes_is_refused(dataset, tmp_path):
    prefix = tmp_path / "ds"
    for ext in (".bin", ".idx"):
        shutil.copy(dataset["prefix"] + ext, str(prefix) + ext)
    with open(str(prefix) + ".bin", "ab") as f:
        f.write(b"\x01\x00" * 8)  # another .bin of the same vocabulary, a little longer
    code, out = run(base_args(dataset, tmp_path, iters=2, **{"data-path": prefix}))
    line = one_error(out)
    assert code == 1 and f"{prefix}.bin: " in line and "the .idx was made for another .bin" in line, line
    assert "training iterations" not in out


def test_master_port_in_use_is_one_line(dataset, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # rank 0 of two hosts the store on MASTER_PORT (a single process binds no port at all)
        env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        code, out = run(base_args(dataset, tmp_path, iters=2), env=env, timeout=120)
    line = one_error(out)
    assert code == 1 and line.startswith(f"error: MASTER_PORT {port}: already in use"), line


def test_threads_follow_the_cpus_given(dataset, tmp_path):
    code, out = run(base_args(dataset, tmp_path, iters=1), env={"SLURM_CPUS_PER_TASK": "1"})
    assert code == 0 and "1 CPU thread(s) per process" in out, out[-2000:]
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU here: the affinity case needs two")
    assert cpu_budget({}) >= 1
    r = subprocess.run([sys.executable, "-c", "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
                        "import torch; from megatron_biomed.utils import follow_cpu_budget; follow_cpu_budget(); "
                        "print(torch.get_num_threads())"], capture_output=True, text=True, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert r.stdout.strip() == "1", r.stderr
