"""The package as users install it: a wheel built from this tree, installed into a fresh venv,
run from a directory outside the checkout with the console commands only; and every tool
reachable three ways (console command, `python -m`, tools/ shim) from one table."""
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

from megatron_biomed.commands import COMMANDS, PREFIX

SAMPLE = os.path.join(ROOT, "examples", "sample_data")


def test_console_scripts_python_m_and_shims_agree():
    """pyproject.toml's [project.scripts] is the table in commands.py, each module has a main and
    runs under `python -m`, and each tools/*.py shim runs the same main."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {PREFIX + name: f"{module}:main" for name, (module, _, _) in COMMANDS.items()}
    shims = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tools", "*.py")))
    assert shims == sorted(shim for _, shim, _ in COMMANDS.values() if shim)
    for name, (module, shim, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), module
        if shim:
            text = open(os.path.join(ROOT, "tools", shim)).read()
            assert f"from {module} import main" in text, shim


def _fresh_venv(tmp_path):
    """A venv with nothing of this checkout in it: the dependencies are taken from the test's own
    environment (a .pth line; its editable install of this package is not activated that way)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_deps_of_the_test_environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return venv, py


@pytest.mark.slow
def test_wheel_installs_and_runs_the_pipeline_outside_the_checkout(tmp_path):
    # build from a copy of the tree, as pip would from an sdist or a clone
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", "demo_output", "logs", "runs", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel = glob.glob(str(tmp_path / "dist" / "megatron_biomed-*.whl"))[0]
    venv, py = _fresh_venv(tmp_path)
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bin_dir = venv / "bin"
    work = tmp_path / "work"  # outside the checkout: nothing of it on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MEGATRON_BIOMED_DEBUG")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", OMP_NUM_THREADS="1")

    def sh(*argv, timeout=600):
        r = subprocess.run([str(a) for a in argv], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{argv}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    # the installed package is the wheel's, whole, with its configs and its declared dependencies met
    out = sh(py, "-c", "import importlib.metadata as md, json, megatron_biomed, megatron_biomed.parallel.parallelize, "
             "megatron_biomed.training.trainer, megatron_biomed.finetune.trainer; from packaging.requirements import "
             "Requirement; reqs = [Requirement(r) for r in md.requires('megatron_biomed') if 'extra ==' not in r]; "
             "print(json.dumps({'file': megatron_biomed.__file__, 'reqs': [r.name for r in reqs], 'unmet': [str(r) "
             "for r in reqs if not r.specifier.contains(md.version(r.name), prereleases=True)]}))")
    info = json.loads(out.strip().splitlines()[-1])
    assert info["file"].startswith(str(venv)), info["file"]
    assert "tensorboard" in info["reqs"] and not info["unmet"], info
    installed = os.path.dirname(info["file"])
    assert sorted(os.listdir(os.path.join(installed, "configs"))) == ["biomedlm-2.7b.yaml", "tiny.yaml"]

    # every console command answers --help
    for name in COMMANDS:
        assert "usage:" in sh(bin_dir / (PREFIX + name), "--help"), name

    # the pipeline, with the console commands only
    sh(PREFIX + "pubmed-to-jsonl", SAMPLE, "--output", "docs.jsonl", "--languages", "eng", "--min-chars", "200",
       "--no-progress")
    sh(PREFIX + "train-tokenizer", "--input", "docs.jsonl", "--output-dir", "tok", "--vocab-size", "2000",
       "--no-progress")
    sh(PREFIX + "preprocess", "--input", "docs.jsonl", "--output-prefix", "data/pubmed", "--tokenizer-type",
       "HuggingFaceTokenizer", "--tokenizer-model", "tok", "--append-eod", "--no-progress")
    out = sh(py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
             "--no-python", PREFIX + "pretrain", "--config", "tiny", "--tensor-model-parallel-size", "2",
             "--vocab-file", "tok/vocab.json", "--data-path", "data/pubmed_text_document", "--train-iters", "20",
             "--eval-interval", "10", "--log-interval", "10", "--save", "ckpt", "--tensorboard-dir", "tb")
    assert re.search(r"iteration\s+20/\s+20", out), out[-3000:]
    assert (work / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "20\n"
    assert glob.glob(str(work / "tb" / "events.*"))
    assert (work / "ckpt" / "settings.yaml").exists()
    sh(PREFIX + "convert", "--load", "ckpt", "--save", "hf", "--target-format", "hf", "--vocab-file", "tok/vocab.json",
       "--merge-file", "tok/merges.txt")
    sh(PREFIX + "generate", "--load", "hf", "--prompt", "The patients were", "--max-new-tokens", "8", "--greedy",
       "--output", "gen.jsonl")
    completion = json.loads((work / "gen.jsonl").read_text())
    assert completion["prompt"] == "The patients were" and completion["completion"]
    # and the same tool under `python -m`, from the installed package
    assert "usage:" in sh(py, "-m", "megatron_biomed", "plan", "--help")
    assert "pretrain" in sh(py, "-m", "megatron_biomed")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_module_runs_under_python_m():
    """`python -m megatron_biomed.<module> --help` prints its usage (five printed nothing)."""
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for m, _, _ in COMMANDS.values()}
    for m, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0 and out.startswith("usage:"), f"{m}: {out[-2000:]}"
