"""Fine-tuning with BioMedLM's heads: a synthetic multiple-choice task in MedMCQA's format that
the model must learn, and the same run under dp=2 and tp=2 equal to one process."""
import json
import os

import pytest

from conftest import ROOT, write_jsonl
from test_pretrain import finish

from megatron_biomed.data import synthetic


def synthetic_medmcqa(path, n, seed):
    return write_jsonl(path, synthetic.medmcqa_like(n, seed))


def launch_finetune(nproc, args):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_biomed.finetune.trainer", *map(str, args)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    codes, outs = finish(procs)
    assert codes == [0] * nproc, outs[0][-4000:]
    return outs[0]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic_mc")
    return (synthetic_medmcqa(d / "train.json", 256, 1), synthetic_medmcqa(d / "dev.json", 64, 2),
            synthetic_medmcqa(d / "train_small.json", 64, 3))


def base(task_files, trained_tokenizer, save, **kw):
    args = {"task": "medmcqa", "train-data": task_files[0], "valid-data": task_files[1], "model": "tiny",
            "vocab-file": trained_tokenizer / "vocab.json", "merge-file": trained_tokenizer / "merges.txt",
            "global-batch-size": 16, "lr": 3e-3, "warmup-ratio": 0.1, "hidden-dropout": 0.0,
            "attention-dropout": 0.0, "max-length": 64, "save": save, "seed": 7}
    args.update(kw)
    out = []
    for k, v in args.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


@pytest.mark.slow
def test_learns_a_synthetic_multiple_choice_task(task_files, trained_tokenizer, tmp_path):
    out = launch_finetune(1, base(task_files, trained_tokenizer, tmp_path / "ft", epochs=14,
                                  **{"test-data": task_files[1]}))
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    before = metrics["history"][0]
    assert before["epoch"] == 0 and before["valid"]["accuracy"] < 0.45, out[-3000:]  # chance is 0.25
    assert metrics["valid"]["accuracy"] > 0.9, out[-3000:]
    assert metrics["test"]["accuracy"] == metrics["valid"]["accuracy"]  # the best epoch's weights, reloaded
    assert set(metrics["valid"]["per_subject"]) == {"Pharmacology", "Physiology"}
    rows = [json.loads(x) for x in (tmp_path / "ft" / "valid_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and all(len(r["probs"]) == 4 for r in rows)


_REFERENCE = {}


def single_process_reference(files, trained_tokenizer, tmp_path_factory):
    """The one-process run both layouts are compared with (run once)."""
    if "dir" not in _REFERENCE:
        d = tmp_path_factory.mktemp("one_process")
        launch_finetune(1, base(files, trained_tokenizer, d, epochs=1, lr=3e-4))
        _REFERENCE["dir"] = d
    return _REFERENCE["dir"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], []], ids=["tp2", "dp2"])
def test_two_processes_equal_one(task_files, trained_tokenizer, tmp_path, tmp_path_factory, layout):
    """4 steps (64 questions, batch 16) and the dev scores after them. Adam moves a weight by
    about lr whatever the size of its gradient, so round-off differences between layouts
    (1e-7) in near-zero gradients become differences of order lr: the comparison uses lr 3e-4."""
    def losses(d):
        history = json.loads((d / "metrics.json").read_text())["history"][1:]
        return [h["train_loss"] for h in history]
    small = (task_files[2], task_files[1])
    one = single_process_reference(small, trained_tokenizer, tmp_path_factory)
    launch_finetune(2, base(small, trained_tokenizer, tmp_path / "two", epochs=1, lr=3e-4) + layout)
    assert losses(one) == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    a = [json.loads(x)["probs"] for x in (one / "valid_predictions.jsonl").read_text().splitlines()]
    b = [json.loads(x)["probs"] for x in (tmp_path / "two" / "valid_predictions.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 64
    assert max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb)) < 1e-5


def test_classification_task_in_bf16(trained_tokenizer, tmp_path):
    """BioASQ yes/no as 2-way classification of context + question, under bf16 autocast."""
    import random
    rng = random.Random(0)

    def bioasq(path, n):
        qs = []
        for i in range(n):
            drug, yes = rng.choice(synthetic.MC_WORDS), rng.random() < 0.5
            qs.append({"id": f"b{i}", "type": "yesno", "body": f"Is {drug} effective?", "exact_answer":
                       "yes" if yes else "no", "snippets": [{"text": f"{drug} was {'' if yes else 'not '}effective."}]})
        path.write_text(json.dumps({"questions": qs}))
        return path
    out = launch_finetune(1, base((bioasq(tmp_path / "train.json", 32), bioasq(tmp_path / "dev.json", 16)),
                                  trained_tokenizer, tmp_path / "ft", task="bioasq", epochs=2, bf16=True))
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert "classification, 2 choices" in out
    assert set(metrics["valid"]) >= {"accuracy", "macro_f1"} and len(metrics["history"]) == 3


@pytest.mark.slow
def test_finetunes_checkpoints_in_layouts_whose_padding_differs(task_files, trained_tokenizer, tmp_path):
    """A model with a 1100-token vocabulary pads its embedding to 1152 rows in one process, 1280
    under TP=2 and 1536 under TP=4: fine-tuning resizes it as pretraining's --load does. From a
    Hugging Face directory under TP=2 and from our checkpoint under TP=4, the losses and dev
    probabilities equal one process's; a --max-length above the model's positions is clamped
    with a note."""
    import subprocess
    import sys

    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_biomed.config import GPTConfig
    assert [GPTConfig(vocab_size=1100).padded_vocab_size(tp) for tp in (1, 2, 4)] == [1152, 1280, 1536]
    import torch
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=1100, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                               bos_token_id=999, eos_token_id=999)).save_pretrained(hf)
    ours = tmp_path / "ours"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--load", str(hf),
                        "--save", str(ours), "--target-format", "megatron_biomed", "--no-tokenizer"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    small = (task_files[2], task_files[1])

    def run(nproc, load, name, *layout):
        out = launch_finetune(nproc, base(small, trained_tokenizer, tmp_path / name, epochs=1, lr=3e-4,
                                          load=load, **{"max-length": 512}) + list(layout))
        history = json.loads((tmp_path / name / "metrics.json").read_text())["history"][1:]
        probs = [json.loads(x)["probs"] for x in (tmp_path / name / "valid_predictions.jsonl").read_text().splitlines()]
        return out, [h["train_loss"] for h in history], probs

    out, loss1, probs1 = run(1, hf, "one")
    assert "note: --max-length 512 is more than the model's 64 positions: using 64" in out
    for nproc, load, name in ((2, hf, "hf_tp2"), (4, ours, "ours_tp4")):
        _, loss, probs = run(nproc, load, name, "--tensor-model-parallel-size", str(nproc))
        assert loss == pytest.approx(loss1, abs=1e-5), name
        assert max(abs(x - y) for pa, pb in zip(probs, probs1) for x, y in zip(pa, pb)) < 1e-5, name


def test_duplicate_ids_and_dev_questions_seen_in_train_are_warned_and_counted(task_files, trained_tokenizer,
                                                                              tmp_path):
    """A dev set that shares questions with train (a common slip when splitting a dataset by
    hand) and a file whose ids repeat: each is one warning naming the file, and the counts are
    in metrics.json, so that a score can be read for what it is."""
    train = json.loads("[" + ",".join(open(task_files[2]).read().split("\n")[:-1]) + "]")
    dev = json.loads("[" + ",".join(open(task_files[1]).read().split("\n")[:-1]) + "]")
    leaked = [dict(r, id=f"leak{i}", question=r["question"].upper() + " ?") for i, r in enumerate(train[:5])]
    dev = [dict(r, question=f"{r['question']} (dev item {i})") for i, r in enumerate(dev[:27])]  # unseen
    dev_path = write_jsonl(tmp_path / "dev.json", dev + leaked)
    train_path = write_jsonl(tmp_path / "train.json", train + [dict(train[0]), dict(train[1])])
    out = launch_finetune(1, base(task_files, trained_tokenizer, tmp_path / "ft", epochs=1,
                                  **{"train-data": train_path, "valid-data": dev_path}))
    assert f"warning: {train_path}: 2 record(s) repeat an id of an earlier record" in out
    assert f"warning: {dev_path}: 5 of 32 valid question(s) also occur in --train-data {train_path}" in out
    checks = json.loads((tmp_path / "ft" / "metrics.json").read_text())["data_checks"]
    assert checks == {"duplicate_ids": {"train": 2, "valid": 0}, "in_train": {"valid": 5}}


def test_a_second_run_on_the_same_save_stops_at_start(task_files, trained_tokenizer, tmp_path):
    import subprocess
    import sys
    from megatron_biomed.checkpoint import run_lock
    save = tmp_path / "ft"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megatron_biomed.checkpoint import "
                               "run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)",
                               str(save)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "megatron_biomed.finetune.trainer",
                            *base(task_files, trained_tokenizer, save, epochs=1)], cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert errors[0].startswith(f"error: --save {save}: in use by another run (host"), errors[0]
    assert f"PID {holder.pid}" in errors[0] and run_lock.LOCK_NAME in os.listdir(save)
    assert "fine-tuning on" not in r.stdout and not (save / "metrics.json").exists()
