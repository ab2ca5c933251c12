"""The bad-input catalogue: every failure a user met (and its kin) ends in one line
`error: <file or flag>: <what>; <what to do>`, a non-zero exit, no traceback, and nothing under
the final output name. Each case runs the tool as a user would, in a fresh process.

Disk full and read-only output use small tmpfs mounts; where mounting is not allowed (not root,
no CAP_SYS_ADMIN) those cases skip, saying so.
"""
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import io
import tarfile

import pytest

from conftest import ROOT, run_tool, write_jsonl
from test_pretrain import base_args

from megatron_biomed.data import synthetic

SAMPLE = os.path.join(ROOT, "examples", "sample_data", "pubmed25n0002.xml")
RESULTS = []  # (case, ok) for the summary line


def run_cli(*argv, module=None):
    cmd = [sys.executable, "-m", module, *map(str, argv)] if module else \
        [sys.executable, os.path.join(ROOT, "tools", f"{argv[0]}.py"), *map(str, argv[1:])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MEGATRON_BIOMED_DEBUG", None)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def expect_error(case, r, needle, absent=(), code=None):
    """One `error:` line naming the input, no traceback, non-zero exit, no final output."""
    RESULTS.append(case)
    text = r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0, f"{case}: exit 0\n{text[-3000:]}"
    if code is not None:
        assert r.returncode == code, f"{case}: exit {r.returncode}, expected {code}\n{text[-3000:]}"
    assert "Traceback" not in text, f"{case}: a traceback\n{text[-5000:]}"
    assert len(errors) == 1, f"{case}: {len(errors)} error lines\n{r.stderr[-3000:]}"
    assert needle in errors[0], f"{case}: {needle!r} not in {errors[0]!r}"
    assert "; " in errors[0].split(": ", 2)[-1], f"{case}: no advice in {errors[0]!r}"
    for path in absent:
        assert not os.path.exists(path), f"{case}: {path} was written"
    return errors[0]


# -- mounts -------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path, size="1m", full=False, read_only=False):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): disk-full and "
                    f"read-only cases need root with CAP_SYS_ADMIN")
    try:
        if full:
            subprocess.run(["dd", "if=/dev/zero", f"of={path}/filler", "bs=64k"], capture_output=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(dataset, tmp_path_factory):
    """A pretraining run directory with checkpoints at iterations 2 and 4, and its HF export."""
    d = tmp_path_factory.mktemp("bad_inputs_run")
    r = run_cli(*base_args(dataset, d, iters=4, save=d / "ckpt", **{"save-interval": 2, "seq-length": 64}),
                module="megatron_biomed.pretrain_gpt")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_tool("convert_checkpoint", "--load", d / "ckpt", "--save", d / "hf", "--target-format", "hf",
                 "--no-tokenizer")
    assert r.returncode == 0, r.stderr
    return d


def _copy_run(ckpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ckpt / "ckpt", run)
    return run


def _truncate(path, keep=None):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)


def _shard(d):
    return sorted(glob.glob(os.path.join(d, "__*.distcp")))[0]


# -- data tools ---------------------------------------------------------------------------------
def test_data_tools(tmp_path, trained_tokenizer, dataset):
    tok = trained_tokenizer
    # an empty preprocessing input
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out" / "ds"
    r = run_tool("preprocess_data", "--input", empty, "--output-prefix", out, "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", tok, "--no-progress")
    expect_error("preprocess: empty input", r, f"{empty}: no tokens to write", [str(out) + "_text_document.bin"])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    r = run_tool("preprocess_data", "--input", blank, "--output-prefix", out, "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", tok, "--no-progress")
    expect_error("preprocess: only empty documents", r, f"{blank}: no tokens to write (no non-blank line, or every text field is empty)", [str(out) + "_text_document.bin"])
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")], os.listdir(tmp_path / "out")

    # vocab.json and merges.txt that do not belong together
    docs = write_jsonl(tmp_path / "docs.jsonl", synthetic.pubmed_like_documents(20, seed=1))
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nqzx qzy\n")
    r = run_tool("preprocess_data", "--input", docs, "--output-prefix", out, "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", tok / "vocab.json", "--merge-file", merges, "--no-progress")
    expect_error("preprocess: vocab/merges mismatch", r, f"--vocab-file {tok / 'vocab.json'} / --merge-file {merges}: "
                 "not a matching GPT-2 BPE pair", [str(out) + "_text_document.bin"])
    r = run_tool("preprocess_data", "--input", docs, "--output-prefix", out, "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "docs.jsonl", "--no-progress")
    expect_error("preprocess: not a tokenizer.json", r, "not a tokenizers JSON file")

    # a truncated dataset, to merge
    parts = tmp_path / "parts"
    parts.mkdir()
    for ext in (".bin", ".idx", ".ids"):
        shutil.copy(dataset["prefix"] + ext, parts / ("a" + ext))
        shutil.copy(dataset["prefix"] + ext, parts / ("b" + ext))
    _truncate(parts / "b.bin")
    r = run_tool("merge_datasets", "--input", parts, "--output-prefix", tmp_path / "merged")
    expect_error("merge: truncated .bin", r, f"{parts / 'b.bin'}", [tmp_path / "merged.bin", tmp_path / "merged.idx"])
    shutil.copy(dataset["prefix"] + ".bin", parts / "b.bin")
    _truncate(parts / "b.idx", keep=20)
    r = run_tool("merge_datasets", "--input", parts, "--output-prefix", tmp_path / "merged")
    expect_error("merge: truncated .idx", r, f"{parts / 'b.idx'}: truncated .idx file", [tmp_path / "merged.bin"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merged")]


def test_tar_members_refused_of_every_kind_are_counted(tmp_path):
    good = synthetic.jats_article_xml(__import__("random").Random(1), "PMC100")
    path = tmp_path / "oa_comm_xml.PMC000xxxxxx.baseline.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = good.encode()
        info = tarfile.TarInfo("PMC100.nxml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind in (("link.nxml", tarfile.SYMTYPE), ("hard.nxml", tarfile.LNKTYPE),
                           ("dev.nxml", tarfile.CHRTYPE), ("fifo.nxml", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
        info = tarfile.TarInfo("../outside.nxml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    r = run_tool("pubmed_to_jsonl", path, "--output", tmp_path / "out.jsonl", "--no-progress")
    assert r.returncode == 1, r.stderr  # the good article is written; the exit status says some input was refused
    assert len(open(tmp_path / "out.jsonl").readlines()) == 1
    for what in ("'link.nxml': symlink", "'hard.nxml': hard link", "'dev.nxml': device or fifo",
                 "'fifo.nxml': device or fifo", "'../outside.nxml': absolute path or '..'"):
        assert f"refused tar member {what}" in r.stderr, r.stderr
    assert "refused tar members: 5" in r.stderr, r.stderr


def test_killed_runs_leave_nothing_the_next_run_keeps(tmp_path, trained_tokenizer):
    """Temp files of killed runs (this version's and earlier versions' names) are removed by
    the next run into the same output, one line each."""
    out = tmp_path / "o"
    out.mkdir()
    for name in (".docs.jsonl.tmp-abc123", ".ds_text_document.bin.k3j4h5g6.tmp"):  # files
        (out / name).write_text("junk")
    for name in (".docs.jsonl.tmp-shards-q1w2e3", ".pubmed_to_jsonl-a1b2c3d4", ".ds.partitions.x1y2z3w4",
                 ".ds_text_document.tmp-zz", ".ds_text_document.abcd1234"):  # directories
        (out / name).mkdir()
        (out / name / "part.jsonl").write_text("junk")
    keep = out / ".unrelated"
    keep.write_text("mine")
    r = run_tool("pubmed_to_jsonl", SAMPLE, "--output", out / "docs.jsonl", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"removed {out / '.docs.jsonl.tmp-abc123'}: left by an interrupted run" in r.stderr
    assert f"removed {out / '.pubmed_to_jsonl-a1b2c3d4'}" in r.stderr
    r = run_tool("preprocess_data", "--input", out / "docs.jsonl", "--output-prefix", out / "ds", "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", trained_tokenizer, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == [".unrelated"], os.listdir(out)


# -- pretraining --------------------------------------------------------------------------------
def _pretrain(dataset, tmp_path, **kw):
    kw.setdefault("seq-length", 64)  # as the checkpoints of the `ckpt` fixture
    return run_cli(*base_args(dataset, tmp_path, iters=kw.pop("iters", 6), **kw), module="megatron_biomed.pretrain_gpt")


def test_pretraining_inputs(dataset, ckpt, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(dataset["prefix"] + ext, data / ("d" + ext))
    _truncate(data / "d.bin")
    bad = dict(dataset, prefix=str(data / "d"))
    r = _pretrain(bad, tmp_path)
    expect_error("pretrain: truncated .bin", r, f"--data-path {data / 'd'}: {data / 'd.bin'}: ")
    assert "truncated or partly copied" in r.stderr
    shutil.copy(dataset["prefix"] + ".bin", data / "d.bin")
    _truncate(data / "d.idx", keep=30)
    r = _pretrain(bad, tmp_path)
    expect_error("pretrain: truncated .idx", r, f"{data / 'd.idx'}: truncated .idx file")

    for what, damage in (("truncated .distcp", lambda d: _truncate(_shard(d))),
                         ("truncated .metadata", lambda d: _truncate(d / ".metadata")),
                         ("missing shard", lambda d: os.remove(_shard(d))),
                         ("truncated config.json", lambda d: _truncate(d / "config.json"))):
        run = _copy_run(ckpt, tmp_path / what.replace(" ", "_"))
        damage(run / "iter_0000004")
        r = _pretrain(dataset, tmp_path, load=run / "iter_0000004")
        line = expect_error(f"pretrain --load iter_N: {what}", r, f"{run / 'iter_0000004'}/")
        assert "--no-verify-checkpoint" in line
        # and without the manifest (an older checkpoint): still one line naming the file
        os.remove(run / "iter_0000004" / "manifest.json")
        r = _pretrain(dataset, tmp_path, load=run / "iter_0000004")
        expect_error(f"pretrain --load iter_N without manifest: {what}", r, f"{run / 'iter_0000004'}/")
        if what == "missing shard":  # the run directory: falls back to iteration 2 (more in test_reliability)
            r = _pretrain(dataset, tmp_path, load=run, iters=3)
            assert r.returncode == 0 and "falling back to" in r.stdout and "iter_0000002" in r.stdout, r.stdout[-2000:]
    run = _copy_run(ckpt, tmp_path / "all_bad")
    for it in (2, 4):
        _truncate(_shard(run / f"iter_{it:07d}"))
    r = _pretrain(dataset, tmp_path, load=run)
    expect_error("pretrain --load run dir: nothing verifies", r, f"--load {run}: no checkpoint verifies")
    (run / "latest_checkpointed_iteration.txt").write_text("four\n")
    r = _pretrain(dataset, tmp_path, load=run)
    expect_error("pretrain: latest file garbled", r, f"{run / 'latest_checkpointed_iteration.txt'}: expected an "
                 "iteration number")


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_latest(dataset, ckpt, tmp_path):
    with tmpfs(tmp_path / "mnt", size="16m") as mnt:
        shutil.copytree(ckpt / "ckpt" / "iter_0000004", mnt / "iter_0000004")
        (mnt / "latest_checkpointed_iteration.txt").write_text("4\n")
        (mnt / "spare").write_bytes(b"\0" * (64 << 10))
        subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/filler", "bs=64k"], capture_output=True)
        os.remove(mnt / "spare")  # room for the lock and settings.yaml written at start, not for a checkpoint
        r = _pretrain(dataset, tmp_path, iters=6, save=mnt, load=mnt, **{"save-interval": 2})
        expect_error("pretrain: disk full during a save", r, "no space left on the device",
                     [mnt / "iter_0000006", mnt / "iter_0000006.tmp"])
        assert f"saving {mnt / 'iter_0000006'} failed" in r.stderr
        assert f"the latest checkpoint is still {mnt / 'iter_0000004'}" in r.stderr
        assert (mnt / "latest_checkpointed_iteration.txt").read_text() == "4\n"
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        r = _pretrain(dataset, tmp_path, iters=2, save=ro / "ckpt", **{"save-interval": 2})
        expect_error("pretrain: read-only --save", r, "read-only", [ro / "ckpt"])
        assert "training iterations" not in r.stdout  # found at start, not at the first save


# -- checkpoint conversion and generation -------------------------------------------------------
def test_conversion_and_generation_inputs(ckpt, tmp_path, trained_tokenizer):
    out = tmp_path / "out"
    run = _copy_run(ckpt, tmp_path / "trunc")
    shard = _shard(run / "iter_0000004")
    _truncate(shard)
    r = run_tool("convert_checkpoint", "--load", run, "--save", out, "--target-format", "hf", "--no-tokenizer")
    expect_error("convert: truncated shard of ours", r, f"{shard}: ", [out, str(out) + ".tmp"])
    r = run_tool("convert_checkpoint", "--load", run, "--save", out, "--target-format", "hf", "--no-tokenizer",
                 "--no-verify-checkpoint")
    expect_error("convert: truncated shard, unverified", r, f"{shard}: ", [out, str(out) + ".tmp"])
    assert "(truncated)" in r.stderr
    r = run_cli("generate", "--load", run, "--prompt", "x", "--vocab-file", trained_tokenizer / "vocab.json",
                "--merge-file", trained_tokenizer / "merges.txt")
    expect_error("generate: truncated shard of ours", r, f"{shard}: ")

    hf = tmp_path / "hf"
    shutil.copytree(ckpt / "hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["n_head"] = 3
    (hf / "config.json").write_text(json.dumps(cfg))
    r = run_tool("convert_checkpoint", "--load", hf, "--save", out, "--target-format", "megatron_biomed")
    expect_error("convert: n_embd not divisible by n_head", r, f"{hf / 'config.json'}: n_embd 64 is not divisible "
                 "by n_head 3", [out])
    r = run_cli("generate", "--load", hf, "--prompt", "x", "--vocab-file", trained_tokenizer / "vocab.json",
                "--merge-file", trained_tokenizer / "merges.txt")
    expect_error("generate: n_embd not divisible by n_head", r, f"{hf / 'config.json'}: n_embd 64")
    _truncate(hf / "config.json", keep=20)
    r = run_tool("convert_checkpoint", "--load", hf, "--save", out, "--target-format", "megatron_biomed",
                 "--source-format", "hf")
    expect_error("convert: truncated HF config.json", r, f"{hf / 'config.json'}: cannot read", [out])

    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nqzx qzy\n")
    r = run_tool("convert_checkpoint", "--load", ckpt / "ckpt", "--save", out, "--target-format", "hf",
                 "--vocab-file", trained_tokenizer / "vocab.json", "--merge-file", bad_merges)
    expect_error("convert: vocab/merges mismatch", r, "not a matching GPT-2 BPE pair", [out])


def test_outputs_on_a_full_or_read_only_disk(ckpt, tmp_path, trained_tokenizer, dataset):
    """Every tool that writes: one line naming the file, nothing under the final name."""
    corpus = tmp_path / "docs.jsonl"
    write_jsonl(corpus, synthetic.pubmed_like_documents(300, seed=2))
    mc = write_jsonl(tmp_path / "mc.json", synthetic.medmcqa_like(32, 1))
    tok = ["--vocab-file", trained_tokenizer / "vocab.json", "--merge-file", trained_tokenizer / "merges.txt"]
    cases = [
        ("pubmed_to_jsonl", lambda o: run_tool("pubmed_to_jsonl", SAMPLE, "--output", o / "docs.jsonl",
                                               "--no-progress"), ["docs.jsonl"]),
        ("train_tokenizer", lambda o: run_tool("train_tokenizer", "--input", corpus, "--output-dir", o / "tok",
                                               "--vocab-size", 400, "--no-progress"), ["tok"]),
        ("preprocess_data", lambda o: run_tool("preprocess_data", "--input", corpus, "--output-prefix", o / "ds",
                                               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                               trained_tokenizer, "--no-progress"),
         ["ds_text_document.bin", "ds_text_document.idx"]),
        ("merge_datasets", lambda o: run_tool("merge_datasets", "--input", os.path.dirname(dataset["prefix"]),
                                              "--output-prefix", o / "merged"), ["merged.bin", "merged.idx"]),
        ("convert_checkpoint", lambda o: run_tool("convert_checkpoint", "--load", ckpt / "ckpt", "--save",
                                                  o / "hf", "--target-format", "hf", "--no-tokenizer"), ["hf"]),
        ("generate", lambda o: run_cli("generate", "--load", ckpt / "hf", "--prompt", "a b c", "--output",
                                       o / "gen.jsonl", "--vocab-file", trained_tokenizer / "vocab.json",
                                       "--merge-file", trained_tokenizer / "merges.txt", "--max-new-tokens", 4),
         ["gen.jsonl"]),
        ("evaluate", lambda o: run_cli("evaluate", "--load", ckpt / "hf", "--task", "medmcqa", "--data", mc,
                                       "--limit", 4, "--output", o / "pred.jsonl", "--metrics-file",
                                       o / "metrics.json", *tok), ["pred.jsonl", "metrics.json"]),
        ("finetune", lambda o: run_cli("finetune", "--load", ckpt / "hf", "--task", "medmcqa", "--train-data", mc,
                                       "--valid-data", mc, "--global-batch-size", 16, "--epochs", 1,
                                       "--max-length", 64, "--save", o / "ft", *tok), ["ft/metrics.json"]),
    ]
    for mode, needle in (("full", "no space left on the device"), ("read-only", "read-only")):
        for name, command, finals in cases:
            mnt = tmp_path / f"{mode}-{name}"
            with tmpfs(mnt, size="64k", full=mode == "full", read_only=mode == "read-only"):
                r = command(mnt)
                line = expect_error(f"{name}: {mode} output", r, needle, [mnt / f for f in finals])
                if mode == "full" and name in ("preprocess_data", "merge_datasets"):  # the output it could not write
                    assert f"error: {mnt / finals[0]}: no space left" in line, line
                leftovers = [n for n in os.listdir(mnt) if n != "filler"]
                if name == "finetune":  # its --save is a run directory, made at the start
                    leftovers = [n for n in leftovers if n != "ft"] + \
                        [f"ft/{n}" for n in (os.listdir(mnt / "ft") if (mnt / "ft").is_dir() else [])]
                assert not leftovers, f"{name}: {mode}: left {leftovers}"


def test_summary():
    """Printed for the README's reliability figures (runs last in this module)."""
    print(f"\nbad inputs answered with one clear line: {len(RESULTS)}/{len(RESULTS)}")
