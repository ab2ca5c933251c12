"""slurm/preprocess_pubmed.sbatch: syntax, settings, and the inputs its real-cluster test
(tests/test_slurm.py) submits."""
import os
import random
import shutil
import subprocess

import pytest

from conftest import ROOT
from megatron_biomed.data import synthetic

SCRIPT = os.path.join(ROOT, "slurm", "preprocess_pubmed.sbatch")


def test_script_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", SCRIPT], capture_output=True, text=True, cwd=ROOT)
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


def test_missing_settings_fail_clearly(tmp_path):
    r = subprocess.run(["bash", SCRIPT], env=dict(os.environ, INPUT_DIR="", OUTPUT_DIR=""),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "set INPUT_DIR" in r.stderr
