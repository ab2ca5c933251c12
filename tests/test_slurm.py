"""The slurm/ scripts: shellcheck, their requeue logic with stand-ins for srun and scontrol, and
slurm/README.md run as written on a real one-host Slurm cluster (slurmctld + slurmd + munge on
localhost, slurm/local_cluster.sh). Jobs across nodes: tests/test_multinode.py."""
import glob
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT
from test_multinode import _free_port

CLUSTER = os.path.join(ROOT, "slurm", "local_cluster.sh")
PRETRAIN = os.path.join(ROOT, "slurm", "pretrain_biomedlm.sbatch")
pytestmark = pytest.mark.xdist_group("slurm")  # one worker: its clusters one after the other
SCRIPTS = [os.path.join(ROOT, "slurm", f) for f in ("pretrain_biomedlm.sbatch", "convert_checkpoint.sbatch",
                                                     "preprocess_pubmed.sbatch", "finetune.sbatch",
                                                     "preflight.sbatch", "network.sh")] + [
    os.path.join(ROOT, "slurm", "check_request.sh"), CLUSTER, os.path.join(ROOT, "examples", "finetune_medmcqa.sh"), os.path.join(ROOT, "examples", "demo.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_pass_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout


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
    preflight = re.search(r"Submitted batch job (\d+)", r.stdout.split("### block 3")[1]).group(1)
    assert open(os.path.join(ROOT, "logs", f"preflight-{preflight}.out")).read().rstrip().endswith("preflight: ok")
    merges = sorted(glob.glob(os.path.join(ROOT, "logs", "preprocess-pubmed-*.out")), key=os.path.getmtime)
    assert not [m for m in merges if m.endswith("_4294967294.out")]
