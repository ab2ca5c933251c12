"""slurm/preprocess_pubmed.sbatch: its stages, run as Slurm would run them, equal a local run."""
import filecmp
import os
import random
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_tool
from megatron_biomed.data import synthetic

SCRIPT = os.path.join(ROOT, "slurm", "preprocess_pubmed.sbatch")


def test_script_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def make_inputs(d):
    """Baseline files, then update files that revise and delete records of earlier slices."""
    rng = random.Random(8)
    d.mkdir()
    for f in range(4):
        arts = [synthetic.medline_article_xml(rng, 100 * f + i) for i in range(25)]
        (d / f"pubmed25n{f + 1:04d}.xml").write_text(synthetic.medline_file_xml(arts))
    revised = [synthetic.medline_article_xml(rng, p) for p in (3, 104, 250)]
    (d / "pubmed25n0005.xml").write_text(synthetic.medline_file_xml(revised, deleted=[5, 6, 201]))
    readded = [synthetic.medline_article_xml(rng, 6)]
    (d / "pubmed25n0006.xml").write_text(synthetic.medline_file_xml(readded, deleted=[7]))


@pytest.mark.slow
def test_array_slices_then_merge_equal_local_run(trained_tokenizer, tmp_path):
    make_inputs(tmp_path / "xml")
    env = dict(os.environ, INPUT_DIR=str(tmp_path / "xml"), OUTPUT_DIR=str(tmp_path / "out"),
               TOKENIZER_DIR=str(trained_tokenizer), PYTHON=sys.executable, REPO_DIR=ROOT,
               WORKERS="1", LANGUAGES="", NUM_SLICES="3")
    for task in range(3):
        subprocess.run(["bash", SCRIPT], env=dict(env, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="3"),
                       check=True, capture_output=True)
    r = subprocess.run(["bash", SCRIPT], env=dict(env, STAGE="merge"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "superseded documents dropped" in r.stderr

    run_tool("pubmed_to_jsonl", tmp_path / "xml", "--output", tmp_path / "all.jsonl", "--no-progress", check=0)
    run_tool("preprocess_data", "--input", tmp_path / "all.jsonl", "--output-prefix", tmp_path / "local",
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", trained_tokenizer,
             "--append-eod", "--no-progress", check=0)
    for ext in (".bin", ".idx", ".ids"):
        assert filecmp.cmp(tmp_path / f"local_text_document{ext}",
                           tmp_path / "out" / f"pubmed_text_document{ext}", shallow=False), ext
    ids = (tmp_path / "local_text_document.ids").read_text().split()
    assert "PMID:5" not in ids and "PMID:201" not in ids and "PMID:7" not in ids
    # 100 baseline records, 4 deleted, PMID 6 added back, PMID 250 new.
    assert "PMID:6" in ids and "PMID:250" in ids and len(ids) == 100 - 4 + 1 + 1


def test_missing_settings_fail_clearly(tmp_path):
    r = subprocess.run(["bash", SCRIPT], env=dict(os.environ, INPUT_DIR="", OUTPUT_DIR=""),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "set INPUT_DIR" in r.stderr
