"""Our slurm/ jobs across nodes, on a real Slurm cluster on this machine whose three nodes are
network namespaces with their own addresses and hostnames (slurm/local_cluster.sh --nodes 3):
gloo between ranks on different nodes goes through their own interfaces and a bridge, as
between machines. Pretraining (both launchers), preemption and requeue, a stopped rank and a lost
node, the preprocessing array job, fine-tuning and the preflight job. CPU-sized: the tiny model,
gloo, 2 tasks per node."""
import filecmp
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_tool, write_jsonl
from test_pretrain import scalars
from test_slurm_preprocess import make_inputs

CLUSTER = os.path.join(ROOT, "slurm", "local_cluster.sh")
PRETRAIN = os.path.join(ROOT, "slurm", "pretrain_biomedlm.sbatch")
NETWORK = os.path.join(ROOT, "slurm", "network.sh")
ITERS = 16
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    r = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"no Slurm cluster possible here: {r.stderr.strip()}")
    d = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    ports = dict(SLURMCTLD_PORT=str(port), SLURMD_PORT=str(_free_port()))
    r = subprocess.run(["bash", CLUSTER, "start", str(d), "--nodes", "3"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, **ports))
    if r.returncode == 4:  # no CAP_NET_ADMIN (an unprivileged container): one line saying so
        assert r.stderr.count("\n") == 1 and "CAP_NET_ADMIN" in r.stderr, r.stderr
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nodes node[1-3] idle" in r.stdout
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    r = subprocess.run(["bash", CLUSTER, "status", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and len(re.findall(r"^node\d \d+\.\d+\.\d+\.\d+ idle", r.stdout, re.M)) == 3, r.stdout
    yield dict(env=env, dir=d, ns_prefix=f"mbslurm{port}n")
    r = subprocess.run(["bash", CLUSTER, "stop", str(d)], capture_output=True, text=True, timeout=120)
    assert "stopped" in r.stdout
    # nothing left behind: daemons, namespaces, links
    assert f"mbslurm{port}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mbs{port}br" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    r = subprocess.run(["bash", CLUSTER, "status", str(d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not running" in r.stdout


def sbatch(env, *args):
    r = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_info(env, jid):
    r = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def wait_for(env, jid, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, jid)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    tail = open(log).read()[-4000:] if log and os.path.exists(log) else ""
    raise AssertionError(f"job {jid} not in {states} after {timeout} s: {job_info(env, jid)}\n{tail}")


def wait_for_log(env, jid, log, pattern, timeout=240):
    deadline = time.time() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        m = re.search(pattern, text, re.M)
        if m:
            return m
        assert time.time() < deadline and job_info(env, jid).get("JobState") in ("PENDING", "RUNNING"), \
            f"{pattern!r} not in the log:\n{text[-4000:]}"
        time.sleep(0.3)


def pretrain_job(cluster, ds, out, launcher="srun", extra=""):
    """A 2-node pretraining job: TP=2 inside each node, DP=2 across the two."""
    env = dict(cluster["env"], DATA_PATH=ds["prefix"], VOCAB_FILE=ds["vocab"], CONFIG="examples/configs/tiny.yaml",
               GPUS_PER_NODE="0", TP="2", PP="1", OUTPUT_ROOT=str(out / "runs"), RUN_NAME="tiny",
               PYTHON=sys.executable, OMP_NUM_THREADS="1", LAUNCHER=launcher, TASK_EXIT_WAIT="5",
               EXTRA_ARGS=f"--train-iters {ITERS} --save-interval 4 --seq-length 32 --global-batch-size 8 "
                          f"--micro-batch-size 2 --eval-iters 0 --log-interval 1 --lr-warmup-iters 2 "
                          f"--distributed-timeout-seconds-after-init 10 {extra}")
    shape = ["--ntasks-per-node=2", "--cpus-per-task=1"] if launcher == "srun" else \
        ["--ntasks-per-node=1", "--cpus-per-task=2"]
    log = out / "job.out"
    return sbatch(env, "--nodes=2", *shape, f"--output={log}", PRETRAIN), log


def losses(out):
    return scalars(out / "runs" / "tiny" / "tensorboard", "train/loss")


@pytest.fixture(scope="module")
def uninterrupted(cluster, dataset, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("uninterrupted")
    jid, log = pretrain_job(cluster, dataset, out)
    info = wait_for(cluster["env"], jid, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] in ("node[1-2]", "node[1,3]", "node[2-3]"), text[-4000:]
    # the network was chosen and checked on both nodes before any rank started
    assert len(re.findall(r"^network: node\d: eth0 10\.\d+\.\d+\.1\d$", text, re.M)) == 2, text[:2000]
    assert "network: gloo on eth0, NCCL on eth0" in text
    # ranks on both nodes, and the slowest rank's host named in the log
    assert re.search(r"step time per rank \(ms\): min [\d.]+ \| median [\d.]+ \| max [\d.]+ \(rank \d on node\d\)", text)
    ckpt = out / "runs" / "tiny" / "checkpoints" / f"iter_{ITERS:07d}"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]  # every rank's shard
    values = losses(out)
    assert sorted(values) == list(range(1, ITERS + 1))
    return values


@pytest.mark.parametrize("launcher,interrupt,signal_name", [
    ("srun", ["scancel", "--signal=USR1"], "SIGUSR1"),  # Slurm's warning before the time limit; preemption
    ("torchrun", ["scontrol", "requeue"], "SIGTERM"),  # an admin or a preemption policy requeues it
], ids=["srun-usr1", "torchrun-outside-requeue"])
def test_preemption_across_two_nodes_resumes_with_the_uninterrupted_losses(cluster, dataset, uninterrupted, tmp_path,
                                                                           launcher, interrupt, signal_name):
    """USR1: every rank saves and exits 75, the script requeues the job. An outside `scontrol
    requeue`: Slurm sends SIGTERM (torchrun passes it on), every rank saves, Slurm requeues. Either
    way the requeued run resumes from that save with every loss of the uninterrupted run."""
    jid, log = pretrain_job(cluster, dataset, tmp_path, launcher=launcher)
    wait_for_log(cluster["env"], jid, log, r"iteration\s+6/")
    subprocess.run([*interrupt, jid], env=cluster["env"], check=True)
    info = wait_for(cluster["env"], jid, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    stopped = int(re.search(rf"received {signal_name}: stopping at iteration (\d+)", text).group(1))
    assert re.search(rf"loaded checkpoint \S+iter_{stopped:07d}", text)
    if signal_name == "SIGUSR1":
        assert f"requeueing job {jid}" in text
    assert losses(tmp_path) == uninterrupted  # every iteration, bit for bit


def _rank_pid(ns, rank):
    """The PID of the training process of global rank `rank` inside network namespace `ns`."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"megatron_biomed.pretrain_gpt" in cmdline and f"SLURM_PROCID={rank}".encode() in environ:
            return int(pid)
    return None


def test_a_stopped_rank_then_a_lost_node_are_survived(cluster, dataset, uninterrupted, tmp_path):
    """A rank stopped without dying (SIGSTOP) is caught by the collective timeout and the job is
    requeued; then one of the job's nodes dies (its slurmd and every process on it killed, as a
    crash would): the log names it, the job is requeued onto the other nodes and resumes from the
    last checkpoint. The losses are those of the uninterrupted run, every checkpoint verifies."""
    import signal
    from megatron_biomed.checkpoint import manifest
    env = cluster["env"]
    jid, log = pretrain_job(cluster, dataset, tmp_path)
    wait_for_log(env, jid, log, r"iteration\s+6/")
    nodes = subprocess.run(["scontrol", "show", "hostnames", job_info(env, jid)["NodeList"]], env=env,
                           capture_output=True, text=True).stdout.split()
    second = int(nodes[1][len("node"):])
    pid = _rank_pid(cluster["ns_prefix"] + str(second), 3)  # rank 3: the second node's second task
    assert pid, "no rank 3 found"
    os.kill(pid, signal.SIGSTOP)
    m = wait_for_log(env, jid, log, r"a collective failed after iteration (\d+) \((.*)\): no word from rank\(s\) "
                                    r"(.*); (.*)$", timeout=120)
    assert m.group(3) == f"3 ({nodes[1]})" and m.group(4) == "every node's slurmd answers: a rank stopped or hung", \
        m.group(0)
    resume = int(re.search(r"requeueing job \d+: it resumes from iteration (\d+)", log.read_text()).group(1))
    # restarted: wait for it to train past its checkpoint, then crash the node that is not the batch host
    m = wait_for_log(env, jid, log, rf"loaded checkpoint \S+iter_{resume:07d}[\s\S]*iteration\s+{resume + 3}/")
    nodes = subprocess.run(["scontrol", "show", "hostnames", job_info(env, jid)["NodeList"]], env=env,
                           capture_output=True, text=True).stdout.split()
    lost = nodes[1]
    r = subprocess.run(["bash", CLUSTER, "kill-node", lost[len("node"):], str(cluster["dir"])], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"{lost} killed", r.stdout + r.stderr
    try:
        m = wait_for_log(env, jid, log, rf"no word from rank\(s\) 2 \({lost}\), 3 \({lost}\); lost node\(s\): {lost} "
                                        r"\(slurmd does not answer\)$", timeout=120)
        resume2 = int(re.findall(r"it resumes from iteration (\d+)", log.read_text())[-1])
        info = wait_for(env, jid, log=log, timeout=300)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", text[-5000:]
        assert lost not in subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], env=env,
                                          capture_output=True, text=True).stdout  # ran on the other nodes
        assert re.search(rf"loaded checkpoint \S+iter_{resume2:07d}", text)
        assert f"training iterations {resume2 + 1}..{ITERS}" in text  # nothing after the checkpoint trained twice
    finally:
        subprocess.run(["bash", CLUSTER, "start-node", lost[len("node"):], str(cluster["dir"])], capture_output=True,
                       timeout=60)
    assert losses(tmp_path) == uninterrupted
    ckpt_root = tmp_path / "runs" / "tiny" / "checkpoints"
    for d in sorted(ckpt_root.glob("iter_*")):
        assert manifest.verify(str(d)) == [], d
    # the node comes back to service for the tests that follow
    deadline = time.time() + 60
    while "down" in subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, "the restarted node did not return to service"
        time.sleep(1)


def test_preprocess_array_job_spread_over_nodes_equals_a_local_run(cluster, trained_tokenizer, tmp_path):
    make_inputs(tmp_path / "xml")
    env = dict(cluster["env"], INPUT_DIR=str(tmp_path / "xml"), OUTPUT_DIR=str(tmp_path / "out"),
               TOKENIZER_DIR=str(trained_tokenizer), PYTHON=sys.executable, WORKERS="1", LANGUAGES="",
               NUM_SLICES="3", CPUS_PER_TASK="2", MEM="500M", EXTRA_SBATCH_ARGS=f"--output={tmp_path}/%x-%A_%a.out")
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "preprocess_pubmed.sbatch"), "submit"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    array_id, merge_id = re.search(r"slices as job (\d+), merge as job (\d+)", r.stdout).groups()
    info = wait_for(cluster["env"], merge_id, timeout=400)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    hosts = {job_info(cluster["env"], f"{array_id}_{t}")["BatchHost"] for t in range(3)}
    assert len(hosts) == 3, hosts  # 2 CPUs a slice: one slice per node
    run_tool("pubmed_to_jsonl", tmp_path / "xml", "--output", tmp_path / "all.jsonl", "--no-progress", check=0)
    run_tool("preprocess_data", "--input", tmp_path / "all.jsonl", "--output-prefix", tmp_path / "local",
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", trained_tokenizer,
             "--append-eod", "--no-progress", check=0)
    for ext in (".bin", ".idx", ".ids"):
        assert filecmp.cmp(tmp_path / f"local_text_document{ext}",
                           tmp_path / "out" / f"pubmed_text_document{ext}", shallow=False), ext


def test_finetune_across_two_nodes_equals_one_process(cluster, trained_tokenizer, tmp_path):
    """slurm/finetune.sbatch with NODES=2 (data parallel across the nodes) for a 2-point grid, and
    a patient_qa point beside it; the lr 3e-4 point's losses and dev scores equal one process's (lr
    3e-4: see test_finetune's note on Adam and round-off; the 2-node run equals a 2-process run on
    one host bit for bit)."""
    from megatron_biomed.data import synthetic
    from test_convert import random_hf_gpt2
    random_hf_gpt2(tmp_path / "hf", vocab=1000, tokenizer=trained_tokenizer)
    train = write_jsonl(tmp_path / "train.json", synthetic.medmcqa_like(32, 1))
    dev = write_jsonl(tmp_path / "dev.json", synthetic.medmcqa_like(16, 2))
    env = dict(cluster["env"], LOAD=str(tmp_path / "hf"), TASK="medmcqa", TRAIN_DATA=str(train), VALID_DATA=str(dev),
               LRS="3e-4 3e-3", EPOCHS_LIST="1", TP="1", GPUS_PER_NODE="0", MAX_LENGTH="64", NODES="2",
               GLOBAL_BATCH_SIZE="16", OUTPUT_ROOT=str(tmp_path / "runs"), PYTHON=sys.executable,
               CPUS_PER_TASK="1", EXTRA_SBATCH_ARGS=f"--output={tmp_path}/%x-%A_%a.out", OMP_NUM_THREADS="1",
               CPU_TASKS_PER_NODE="1", TASK_EXIT_WAIT="5",
               EXTRA_ARGS="--hidden-dropout 0 --attention-dropout 0")  # dropout masks depend on the layout
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "finetune.sbatch"), "submit"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jid = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    jobs = [f"{jid}_{task}" for task in ("0", "1")]
    qa = write_jsonl(tmp_path / "qa.jsonl", synthetic.patient_qa_like(32, 1))
    env.update(TASK="patient_qa", TRAIN_DATA=str(qa), VALID_DATA=str(qa), LRS="1e-3", MAX_NEW_TOKENS="8", EXTRA_ARGS="",
               NODES="1", PROMPT_TEMPLATE="Q: {question}\\nA:")
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "finetune.sbatch"), "submit"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs.append(re.search(r"Submitted batch job (\d+)", r.stdout).group(1) + "_0")
    # meanwhile, the same lr 3e-4 point in one process here
    one = subprocess.run([sys.executable, "-m", "megatron_biomed.finetune.trainer", "--load", tmp_path / "hf",
                          "--task", "medmcqa", "--train-data", train, "--valid-data", dev, "--lr", "3e-4",
                          "--epochs", "1", "--warmup-ratio", "0.5", "--max-length", "64", "--global-batch-size", "16",
                          "--hidden-dropout", "0", "--attention-dropout", "0", "--save", tmp_path / "one"],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr[-3000:]
    for job in jobs:
        info = wait_for(cluster["env"], job, timeout=400)
        logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
        assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert job_info(cluster["env"], jobs[0])["NumNodes"] == "2"
    point = tmp_path / "runs" / "medmcqa" / "lr3e-4_ep1"
    two = json.loads((point / "metrics.json").read_text())
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert [h["train_loss"] for h in two["history"][1:]] == pytest.approx(
        [h["train_loss"] for h in ref["history"][1:]], abs=1e-5)
    assert two["valid"]["accuracy"] == ref["valid"]["accuracy"] and two["valid"]["n"] == 16
    a, b = ([json.loads(x)["probs"] for x in (d / "valid_predictions.jsonl").read_text().splitlines()]
            for d in (tmp_path / "one", point))
    assert len(a) == len(b) == 16 and max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb)) < 1e-5
    assert json.loads((tmp_path / "runs" / "medmcqa" / "lr3e-3_ep1" / "metrics.json").read_text())["best_epoch"] == 1
    run = tmp_path / "runs" / "patient_qa" / "lr1e-3_ep1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and 0 <= metrics["valid"]["rougeL"] <= 1
    first = json.loads((run / "valid_generations.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Q: ") and first["prompt"].endswith("\nA:")  # the template reached the tool


def test_preflight_reports_bandwidth_and_a_filesystem_that_is_not_shared(cluster, tmp_path):
    env = dict(cluster["env"], NODES="2", GPUS_PER_NODE="0", CPU_TASKS_PER_NODE="2", CPUS_PER_TASK="1", MEM="500M",
               PYTHON=sys.executable, OUTPUT_ROOT=str(tmp_path / "shared"), SIZE_MB="1", TASK_EXIT_WAIT="5",
               EXTRA_SBATCH_ARGS=f"--output={tmp_path}/preflight-%j.out")

    def submit(**extra):
        r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "preflight.sbatch"), "submit"], cwd=ROOT,
                           env=dict(env, **extra), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        jid = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
        return wait_for(cluster["env"], jid, timeout=180), (tmp_path / f"preflight-{jid}.out").read_text()

    info, text = submit()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "preflight: 4 rank(s) on 2 node(s), gloo on CPUs, interface eth0" in text, text[-3000:]
    a, b = re.search(r"^  (node\d) <-> (node\d)\s+1 \+ 1\s+[\d.]+ GB/s", text, re.M).groups()
    for node in (a, b):
        assert re.search(rf"^  {node}\s+2\s+[\d.]+ GB/s$", text, re.M), text
    assert re.search(r"^  all nodes\s+4\s+[\d.]+ GB/s$", text, re.M)
    assert re.search(rf"^slowest link: {a} <-> {b} at [\d.]+ GB/s$", text, re.M)
    assert "shared filesystem: ok" in text and text.rstrip().endswith("preflight: ok")
    assert os.listdir(tmp_path / "shared") == []  # its files are removed
    # a node that does not see the shared directory (a tmpfs mounted over it on node2 only)
    slurmd = subprocess.run(["ip", "netns", "pids", cluster["ns_prefix"] + "2"], capture_output=True,
                            text=True).stdout.split()
    private = tmp_path / "private"
    private.mkdir()
    target = next(p for p in slurmd if b"slurmd" in open(f"/proc/{p}/cmdline", "rb").read())
    subprocess.run(["nsenter", f"--target={target}", "--mount", "mount", "--bind", str(private),
                    str(tmp_path / "shared")], check=True)
    try:
        info, text = submit(EXTRA_SBATCH_ARGS=f"--output={tmp_path}/preflight-%j.out --nodelist=node[1-2]")
    finally:
        subprocess.run(["nsenter", f"--target={target}", "--mount", "umount", str(tmp_path / "shared")], check=True)
    assert info["JobState"] == "FAILED", text[-3000:]
    assert re.search(rf"^error: --shared-dir {tmp_path}/shared: node2 cannot read the file node1 wrote in "
                     rf"{tmp_path}/shared; checkpoints, data caches and logs need one filesystem", text, re.M), text
    assert text.rstrip().endswith("preflight: FAILED") or "preflight: FAILED" in text


def _in_node(cluster, node, hosts_text, command, tmp_path):
    """Run `command` (bash) inside node `node`'s network namespace, under its hostname, with
    `hosts_text` as its /etc/hosts: a node as a misconfigured cluster would have it."""
    hosts = tmp_path / f"hosts{node}"
    hosts.write_text(hosts_text)
    return subprocess.run(["nsenter", f"--net=/run/netns/{cluster['ns_prefix']}{node}", "unshare", "--mount", "--uts",
                           "bash", "-c", f"mount --bind {hosts} /etc/hosts && hostname node{node} && cd {ROOT} && "
                           f"{command}"], capture_output=True, text=True, timeout=60)


def test_network_interface_is_chosen_and_a_loopback_hostname_named(cluster, tmp_path):
    subnet = re.search(r"NodeAddr=(\d+\.\d+\.\d+)\.11", (cluster["dir"] / "slurm.conf").read_text()).group(1)
    # Debian's default: the node's own name on 127.0.1.1; the other nodes by their addresses
    loopback = f"127.0.0.1 localhost\n127.0.1.1 node1\n{subnet}.12 node2\n"
    r = _in_node(cluster, 1, loopback, f"source {NETWORK}; choose_interface node1 node1 node2", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "eth0", r.stdout + r.stderr  # by the route to node2
    r = _in_node(cluster, 1, loopback, f"bash {NETWORK} check eth0 node1", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == (
        f"network: node1: hostname node1 resolves to 127.0.1.1 here, not to a network address: gloo and NCCL are "
        f"told to use eth0 ({subnet}.11) instead; to fix it at the source, map node1 to {subnet}.11 in /etc/hosts")
    # no other node resolvable either: nothing to route by, one line naming the fix
    r = _in_node(cluster, 1, "127.0.0.1 localhost\n127.0.1.1 node1\n", f"source {NETWORK}; choose_interface node1 "
                 "node1 node2", tmp_path)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: NETWORK_INTERFACE: no route from node1 to another node of the job (node1 "
                               "node1 node2) could be found") and "set NETWORK_INTERFACE" in r.stderr
    # the master's name on loopback, seen from another node; an interface the node lacks
    r = _in_node(cluster, 2, "127.0.0.1 localhost node1\n", f"bash {NETWORK} check eth0 node1", tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == ("error: node2: the master's name node1 resolves to 127.0.0.1 "
                                                      "(loopback) on this node; map node1 to its network address in "
                                                      "/etc/hosts"), r.stderr
    r = _in_node(cluster, 2, f"{subnet}.11 node1\n", f"bash {NETWORK} check ib0 node1", tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == ("error: node2: network interface ib0 has no IPv4 address on "
                                                      "this node (its interfaces: eth0); set NETWORK_INTERFACE to one "
                                                      "every node has"), r.stderr
    # NETWORK_INTERFACE wins over the route
    r = _in_node(cluster, 1, loopback, f"NETWORK_INTERFACE=ib0 bash -c 'source {NETWORK}; choose_interface node1'",
                 tmp_path)
    assert r.stdout.strip() == "ib0"


def test_submit_refuses_a_request_no_node_can_hold(cluster, dataset, tmp_path):  # noqa: F811
    """On the local cluster (2 CPUs a node, no GPU), each script's `submit` with its GPU-node
    defaults stops with one line naming the variable to change, and submits nothing."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    slurm = cluster["env"]
    common = dict(slurm, PYTHON=sys.executable, OUTPUT_ROOT=str(tmp_path / "runs"))
    cases = [
        ("pretrain_biomedlm.sbatch", dict(DATA_PATH=dataset["prefix"], VOCAB_FILE=dataset["vocab"]),
         "error: GPUS_PER_NODE=8: the nodes of partition debug have at most 0 GPU(s); set GPUS_PER_NODE=0"),
        ("pretrain_biomedlm.sbatch", dict(DATA_PATH=dataset["prefix"], VOCAB_FILE=dataset["vocab"], GPUS_PER_NODE="0"),
         "error: CPUS_PER_TASK=8 x 2 task(s) per node needs 16 CPUs"),
        ("pretrain_biomedlm.sbatch", dict(DATA_PATH=dataset["prefix"], VOCAB_FILE=dataset["vocab"], GPUS_PER_NODE="0",
                                          CPUS_PER_TASK="1", NODES="4"),
         "error: NODES=4: partition debug has 3 node(s); set NODES=3 or fewer"),
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
        ("preflight.sbatch", dict(NODES="5", GPUS_PER_NODE="0", CPUS_PER_TASK="1"),
         "error: NODES=5: partition debug has 3 node(s); set NODES=3 or fewer"),
    ]
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout
    for script, env, needle in cases:
        r = subprocess.run(["bash", os.path.join(ROOT, "slurm", script), "submit"], cwd=ROOT,
                           env=dict(common, **env), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, (script, r.stdout, r.stderr)
        assert r.stderr.startswith(needle), (script, r.stderr)
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True).stdout
    assert after == before  # nothing was submitted


def test_cluster_refuses_a_bad_node_number(cluster):
    r = subprocess.run(["bash", CLUSTER, "kill-node", "7", str(cluster["dir"])], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "local_cluster.sh: kill-node 7: give a node number, 1 to 3"
    r = subprocess.run(["bash", CLUSTER, "start", "--nodes", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "local_cluster.sh: --nodes x: give a number of nodes, 1 or more"
    assert glob.glob(str(cluster["dir"] / "slurm.conf"))


def test_without_cap_net_admin_it_says_so_in_one_line(tmp_path):
    """In an unprivileged container `start --nodes 2` cannot make namespaces: one line, exit 4,
    nothing started (the cluster fixture then skips with that line)."""
    import shutil
    if shutil.which("capsh") is None or os.geteuid() != 0:
        pytest.skip("needs root and capsh (libcap2-bin) to drop CAP_NET_ADMIN")
    r = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"no Slurm cluster possible here: {r.stderr.strip()}")
    env = dict(os.environ, SLURMCTLD_PORT=str(_free_port()), SLURMD_PORT=str(_free_port()))
    r = subprocess.run(["capsh", "--drop=cap_net_admin", "--", "-c",
                        f"bash {CLUSTER} start {tmp_path / 'c'} --nodes 2"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 4 and r.stdout == "" and r.stderr.count("\n") == 1, r.stdout + r.stderr
    assert r.stderr.startswith("local_cluster.sh: --nodes 2: needs CAP_NET_ADMIN to create network namespaces and a bridge (ip link "
                               "add: Operation not permitted); run it as root on a machine or VM"), r.stderr
    assert not (tmp_path / "c" / "pids").exists() and not (tmp_path / "c" / "slurm.conf").exists()
