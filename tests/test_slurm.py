"""Our slurm/ scripts submitted to a real one-host Slurm cluster (slurmctld + slurmd + munge on
localhost, slurm/local_cluster.sh), with CPU-sized settings: gloo, the tiny model, 2 tasks."""
import filecmp
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_tool
from test_pretrain import scalars
from test_slurm_preprocess import make_inputs

CLUSTER = os.path.join(ROOT, "slurm", "local_cluster.sh")
PRETRAIN = os.path.join(ROOT, "slurm", "pretrain_biomedlm.sbatch")
SCRIPTS = [os.path.join(ROOT, "slurm", f) for f in ("pretrain_biomedlm.sbatch", "convert_checkpoint.sbatch",
                                                     "preprocess_pubmed.sbatch", "finetune.sbatch")] + [
    os.path.join(ROOT, "slurm", "check_request.sh"), CLUSTER, os.path.join(ROOT, "examples", "finetune_medmcqa.sh"), os.path.join(ROOT, "examples", "demo.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_pass_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    r = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"no Slurm cluster possible here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    d = tmp_path_factory.mktemp("slurm")
    ports = dict(SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()))  # beside any other cluster
    r = subprocess.run(["bash", CLUSTER, "start", str(d)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **ports))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"export SLURM_CONF={d}/slurm.conf" in r.stdout
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    r = subprocess.run(["bash", CLUSTER, "status", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "idle" in r.stdout, r.stdout + r.stderr
    yield env
    r = subprocess.run(["bash", CLUSTER, "stop", str(d)], capture_output=True, text=True, timeout=60)
    assert "stopped" in r.stdout
    r = subprocess.run(["bash", CLUSTER, "status", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not running" in r.stdout


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sbatch(env, *args):
    r = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_info(env, jid):
    r = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def wait_for(env, jid, states, timeout=300, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, jid)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    tail = open(log).read()[-4000:] if log and os.path.exists(log) else ""
    raise AssertionError(f"job {jid} not in {states} after {timeout} s: {job_info(env, jid)}\n{tail}")


def pretrain_env(slurm, ds, tmp_path, iters, extra=""):
    return dict(slurm, DATA_PATH=ds["prefix"], VOCAB_FILE=ds["vocab"], CONFIG="examples/configs/tiny.yaml",
                GPUS_PER_NODE="0", TP="2", PP="1", OUTPUT_ROOT=str(tmp_path / "runs"), RUN_NAME="tiny",
                PYTHON=sys.executable, OMP_NUM_THREADS="1",
                EXTRA_ARGS=f"--train-iters {iters} --seq-length 32 --global-batch-size 8 --micro-batch-size 2 "
                           f"--eval-iters 0 --log-interval 1 --lr-warmup-iters 2 {extra}")


SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_usr1_saves_requeues_and_resumes(slurm, dataset, tmp_path, launcher):  # noqa: F811
    """scancel --signal=USR1 (what Slurm sends before the time limit or on preemption): the
    trainer saves and exits 75, the script requeues the job, and the requeued run resumes from
    the checkpoint and finishes; the loss curve continues instead of starting over."""
    log = tmp_path / "job.out"
    iters = 20
    env = dict(pretrain_env(slurm, dataset, tmp_path, iters, "--save-interval 1000"), LAUNCHER=launcher)
    shape = SBATCH_CPU if launcher == "srun" else ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2"]
    jid = sbatch(env, *shape, f"--output={log}", PRETRAIN)
    deadline = time.time() + 240
    while not (log.exists() and re.search(r"iteration\s+5/", log.read_text())):
        assert time.time() < deadline and job_info(slurm, jid).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()[-4000:] if log.exists() else job_info(slurm, jid)
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", jid], env=slurm, check=True)
    # the requeued job may start again after the cluster's cred_expire (10 s; see cluster.sh)
    info = wait_for(slurm, jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-5000:]
    stopped = int(re.search(r"received SIGUSR1: stopping at iteration (\d+)", text).group(1))
    assert 5 <= stopped < iters
    assert f"requeueing job {jid}" in text and "(restart 1)" in text
    assert re.search(rf"loaded checkpoint \S+iter_{stopped:07d}", text)
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    loss = scalars(tmp_path / "runs" / "tiny" / "tensorboard", "train/loss")
    assert sorted(loss) == list(range(1, iters + 1))  # every iteration once, none repeated or lost
    assert f"training iterations {stopped + 1}..{iters}" in text  # the requeued run went on from there
    assert loss[stopped + 1] < loss[1] - 0.5  # with the trained weights, not from scratch
    assert abs(loss[stopped + 1] - loss[stopped]) < 0.5


@pytest.mark.slow
def test_preprocess_array_job_and_merge_equal_local_run(slurm, trained_tokenizer, tmp_path):
    make_inputs(tmp_path / "xml")
    env = dict(slurm, INPUT_DIR=str(tmp_path / "xml"), OUTPUT_DIR=str(tmp_path / "out"),
               TOKENIZER_DIR=str(trained_tokenizer), PYTHON=sys.executable, WORKERS="1", LANGUAGES="",
               NUM_SLICES="3", CPUS_PER_TASK="1", MEM="500M", EXTRA_SBATCH_ARGS=f"--output={tmp_path}/%x-%A_%a.out")
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "preprocess_pubmed.sbatch"), "submit"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _, merge_id = re.search(r"slices as job (\d+), merge as job (\d+)", r.stdout).groups()
    info = wait_for(slurm, merge_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    run_tool("pubmed_to_jsonl", tmp_path / "xml", "--output", tmp_path / "all.jsonl", "--no-progress", check=0)
    run_tool("preprocess_data", "--input", tmp_path / "all.jsonl", "--output-prefix", tmp_path / "local",
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", trained_tokenizer,
             "--append-eod", "--no-progress", check=0)
    for ext in (".bin", ".idx", ".ids"):
        assert filecmp.cmp(tmp_path / f"local_text_document{ext}",
                           tmp_path / "out" / f"pubmed_text_document{ext}", shallow=False), ext


@pytest.mark.slow
def test_finetune_grid_array_job(slurm, trained_tokenizer, tmp_path):
    """slurm/finetune.sbatch: a 2-point (lr) grid as an array job, and a patient_qa run beside it."""
    from megatron_biomed.data import synthetic
    from test_convert import random_hf_gpt2
    from conftest import write_jsonl
    random_hf_gpt2(tmp_path / "hf", vocab=1000, tokenizer=trained_tokenizer)
    train = write_jsonl(tmp_path / "train.json", synthetic.medmcqa_like(32, 1))
    dev = write_jsonl(tmp_path / "dev.json", synthetic.medmcqa_like(16, 2))
    env = dict(slurm, LOAD=str(tmp_path / "hf"), TASK="medmcqa", TRAIN_DATA=str(train), VALID_DATA=str(dev),
               LRS="1e-3 3e-3", EPOCHS_LIST="1", TP="1", GPUS_PER_NODE="0", MAX_LENGTH="64",
               GLOBAL_BATCH_SIZE="16", OUTPUT_ROOT=str(tmp_path / "runs"), PYTHON=sys.executable,
               CPUS_PER_TASK="1", EXTRA_SBATCH_ARGS=f"--output={tmp_path}/%x-%A_%a.out", OMP_NUM_THREADS="1",
               CPU_TASKS_PER_NODE="1")  # one process per grid point, so the two run side by side
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "finetune.sbatch"), "submit"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    jobs = [f"{jid}_{task}" for task in ("0", "1")]
    qa = write_jsonl(tmp_path / "qa.jsonl", synthetic.patient_qa_like(32, 1))
    env.update(TASK="patient_qa", TRAIN_DATA=str(qa), VALID_DATA=str(qa), LRS="1e-3", MAX_NEW_TOKENS="8",
               PROMPT_TEMPLATE="Q: {question}\\nA:")
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "finetune.sbatch"), "submit"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs.append(re.search(r"Submitted batch job (\d+)", r.stdout).group(1) + "_0")
    for job in jobs:
        info = wait_for(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
        logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
        assert info["JobState"] == "COMPLETED", logs[-4000:]
    for lr in ("1e-3", "3e-3"):
        metrics = json.loads((tmp_path / "runs" / "medmcqa" / f"lr{lr}_ep1" / "metrics.json").read_text())
        assert metrics["best_epoch"] == 1 and metrics["valid"]["n"] == 16
    run = tmp_path / "runs" / "patient_qa" / "lr1e-3_ep1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and 0 <= metrics["valid"]["rougeL"] <= 1
    first = json.loads((run / "valid_generations.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Q: ") and first["prompt"].endswith("\nA:")  # the template reached the tool
    assert (run / "best" / "latest_checkpointed_iteration.txt").read_text() == "1\n"


def test_pretrain_script_stops_requeueing_when_runs_make_no_progress(tmp_path):
    """The script's requeue logic, run with stand-ins for srun/scontrol (no cluster needed): runs
    that keep failing without a newer checkpoint stop after MAX_STALLED_RESTARTS, with a message
    naming the log; a run that saves a newer checkpoint resets the count and requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else '
                                      f'echo "$*" >> {tmp_path}/scontrol.log; fi\n')
    ckpt = tmp_path / "runs" / "biomedlm" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("25\n")
    trainer = tmp_path / "trainer.sh"  # stands in for python -m megatron_biomed.pretrain_gpt
    trainer.write_text(f'#!/bin/bash\nif [ -f {tmp_path}/progress ]; then echo 30 > {ckpt}/latest_checkpointed_'
                       'iteration.txt; exit 75; fi\necho "error: the same crash at iteration 27"; exit 1\n')
    for f in (bin_dir / "srun", bin_dir / "scontrol", trainer):
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(trainer), DATA_PATH="d",
               VOCAB_FILE="v", GPUS_PER_NODE="0", OUTPUT_ROOT=str(tmp_path / "runs"), SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NAME="biomedlm-pretrain", MAX_STALLED_RESTARTS="3")

    def run():
        return subprocess.run(["bash", PRETRAIN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    for attempt in (1, 2):
        r = run()
        assert r.returncode == 1 and "not requeueing" not in r.stdout, r.stdout + r.stderr
        assert (ckpt / "stalled_restarts.txt").read_text().split() == ["25", str(attempt)]
        # a fresh run (no stalled_restarts.txt yet) prints no shell noise
        assert "No such file" not in r.stderr and "integer expression" not in r.stderr, r.stderr
    r = run()
    assert r.returncode == 1
    assert ("not requeueing: 3 runs in a row ended without a checkpoint newer than iteration 25. Look at the end "
            "of logs/biomedlm-pretrain-77.out") in r.stdout
    r = run()  # a requeue by Slurm itself (node failure) is refused at the start too
    assert r.returncode == 1 and "not requeueing: 3 runs in a row" in r.stdout
    assert "error: the same crash" not in r.stdout  # the trainer did not even start
    (ckpt / "stalled_restarts.txt").unlink()
    (tmp_path / "progress").write_text("")
    r = run()
    assert r.returncode == 0 and "requeueing job 77" in r.stdout, r.stdout + r.stderr
    assert "No such file" not in r.stderr and "integer expression" not in r.stderr, r.stderr
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 77"
    assert not (ckpt / "stalled_restarts.txt").exists()
    # torchrun's rendezvous port already taken on the first host: one line naming MASTER_PORT
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env.update(LAUNCHER="torchrun", MASTER_PORT=str(port))
        r = run()
    assert r.returncode == 1 and r.stderr.strip() == (
        f"pretrain_biomedlm: MASTER_PORT {port}: already in use on localhost (another job on this node?); "
        f"set MASTER_PORT to a free port and submit again"), r.stderr


def test_submit_refuses_a_request_no_node_can_hold(slurm, dataset, tmp_path):  # noqa: F811
    """On the one-host cluster (2 CPUs, no GPU), each script's `submit` with its GPU-node
    defaults stops with one line naming the variable to change, and submits nothing."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    common = dict(slurm, PYTHON=sys.executable, OUTPUT_ROOT=str(tmp_path / "runs"))
    cases = [
        ("pretrain_biomedlm.sbatch", dict(DATA_PATH=dataset["prefix"], VOCAB_FILE=dataset["vocab"]),
         "error: GPUS_PER_NODE=8: the nodes of partition debug have at most 0 GPU(s); set GPUS_PER_NODE=0"),
        ("pretrain_biomedlm.sbatch", dict(DATA_PATH=dataset["prefix"], VOCAB_FILE=dataset["vocab"], GPUS_PER_NODE="0"),
         "error: CPUS_PER_TASK=8 x 2 task(s) per node needs 16 CPUs"),
        ("pretrain_biomedlm.sbatch", dict(DATA_PATH=dataset["prefix"], VOCAB_FILE=dataset["vocab"], GPUS_PER_NODE="0",
                                          CPUS_PER_TASK="1", NODES="4"),
         "error: NODES=4: partition debug has 1 node(s); set NODES=1 or fewer"),
        ("preprocess_pubmed.sbatch", dict(INPUT_DIR=str(tmp_path), OUTPUT_DIR=str(tmp_path / "o"),
                                          TOKENIZER_DIR=str(tok)), "error: CPUS_PER_TASK=16 x 1 task(s)"),
        ("preprocess_pubmed.sbatch", dict(INPUT_DIR=str(tmp_path), OUTPUT_DIR=str(tmp_path / "o"),
                                          TOKENIZER_DIR=str(tok), CPUS_PER_TASK="1", MEM="4T"),
         "error: MEM=4T: the largest node of partition debug has"),
        ("convert_checkpoint.sbatch", dict(LOAD=str(tmp_path), SAVE=str(tmp_path / "out"), CPUS_PER_TASK="64"),
         "error: CPUS_PER_TASK=64 x 1 task(s)"),
        ("finetune.sbatch", dict(LOAD=str(tmp_path), TRAIN_DATA="t", VALID_DATA="v"),
         "error: GPUS_PER_NODE=8"),
        ("finetune.sbatch", dict(LOAD=str(tmp_path), TRAIN_DATA="t", VALID_DATA="v", GPUS_PER_NODE="0",
                                 EXTRA_SBATCH_ARGS="--partition=nosuch"),
         "error: EXTRA_SBATCH_ARGS: partition nosuch has no nodes"),
    ]
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout
    for script, env, needle in cases:
        r = subprocess.run(["bash", os.path.join(ROOT, "slurm", script), "submit"], cwd=ROOT,
                           env=dict(common, **env), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, (script, r.stdout, r.stderr)
        assert r.stderr.startswith(needle), (script, r.stderr)
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout
    assert after == before  # nothing was submitted


def readme_blocks(path):
    """The ```bash blocks of a Markdown file, in order."""
    return re.findall(r"^```bash\n(.*?)^```", open(path, encoding="utf-8").read(), re.S | re.M)


@pytest.mark.slow
def test_slurm_readme_walkthrough_runs_as_written(tmp_path):
    """Every bash block of slurm/README.md, in order, in one shell: the one-host cluster its own
    block starts (on free ports, state in tmp), the CPU settings, the bundled sample and the
    tiny model; after each block, wait until the queue is empty. Then check each step's output,
    and that the logs are where the README says."""
    r = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"no Slurm cluster possible here: {r.stderr.strip()}")
    blocks = readme_blocks(os.path.join(ROOT, "slurm", "README.md"))
    assert len(blocks) >= 9
    assert blocks[0].startswith("make install")  # run by `make test` already: a no-op here
    wait = ('_wait_queue() { command -v squeue >/dev/null && [ -n "${SLURM_CONF:-}" ] || return 0\n'
            '  for _ in $(seq 900); do [ -z "$(squeue -h 2>/dev/null)" ] && return 0; sleep 1; done\n'
            '  echo "jobs still queued after 900 s" >&2; squeue >&2; return 1; }\n')
    script = "set -euo pipefail\n" + wait + "".join(
        f"echo '### block {i}'\n{b}\n_wait_queue\n" for i, b in enumerate(blocks))
    (tmp_path / "walkthrough.sh").write_text(script)
    data, runs = tmp_path / "tryout", tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "VIRTUAL_ENV"))}
    env.update(DATA=str(data), RUNS=str(runs), LOCAL_CLUSTER_DIR=str(tmp_path / "cluster"),
               SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(["bash", str(tmp_path / "walkthrough.sh")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=1500)
    finally:
        subprocess.run(["bash", CLUSTER, "stop", str(tmp_path / "cluster")], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + "\n--- stderr:\n" + r.stderr[-4000:]
    assert f"### block {len(blocks) - 1}" in r.stdout
    assert (data / "tokenizer" / "tokenizer.json").exists()
    assert (data / "pubmed_megatron" / "pubmed_text_document.bin").stat().st_size > 0
    ckpt = runs / "biomedlm" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000040"]  # --keep-last-checkpoints 1
    job = re.search(r"pretraining is job (\d+)", r.stdout).group(1)
    assert re.search(r"iteration\s+40/\s+40", open(os.path.join(ROOT, "logs", f"biomedlm-pretrain-{job}.out")).read())
    assert (data / "release" / "biomedlm-hf" / "config.json").exists()
    metrics = json.loads((runs / "finetune" / "medmcqa" / "lr1e-3_ep2" / "metrics.json").read_text())
    assert metrics["best_epoch"] in (1, 2) and 0 <= metrics["valid"]["accuracy"] <= 1
    assert re.search(r"\| medmcqa \| 64 \| 0 \| [0-9.]+ \|", r.stdout)
    merges = sorted(glob.glob(os.path.join(ROOT, "logs", "preprocess-pubmed-*.out")), key=os.path.getmtime)
    assert not [m for m in merges if m.endswith("_4294967294.out")]
