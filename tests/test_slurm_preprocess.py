"""slurm/preprocess_pubmed.sbatch: syntax, settings, and the inputs its real-cluster test
(tests/test_slurm.py) submits."""
import os
import random
import shutil
import subprocess
import sys

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


def test_slice_stage_drops_contaminated_documents(tmp_path, trained_tokenizer):
    """EVAL_FILES set: the slice's documents that contain a MedMCQA question (planted in an
    abstract) or are a PubMedQA article (by PMID) are not in its dataset, and its report says
    why. The stage runs as a Slurm array task would (no cluster needed for the script's logic)."""
    import json
    from conftest import read_jsonl, write_jsonl
    rng = random.Random(3)
    question = ("Which of the following drugs is the first-line treatment of uncomplicated hypertension in "
                "elderly patients with diabetes and chronic kidney disease")
    arts = [synthetic.medline_article_xml(rng, 1000 + i) for i in range(20)]
    arts[3] = arts[3].replace("</AbstractText>", f" {question.upper()}.</AbstractText>", 1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "pubmed25n0001.xml").write_text(synthetic.medline_file_xml(arts))
    mc = synthetic.medmcqa_like(10, 1)
    mc[2]["question"] = question
    medmcqa = write_jsonl(tmp_path / "dev.json", mc)
    pubmedqa = tmp_path / "ori_pqal.json"
    pubmedqa.write_text(json.dumps({"1010": {"QUESTION": "Q?", "CONTEXTS": ["c"], "final_decision": "yes"}}))
    out = tmp_path / "out"
    env = dict(os.environ, INPUT_DIR=str(inputs), OUTPUT_DIR=str(out), TOKENIZER_DIR=str(trained_tokenizer),
               STAGE="slice", SLURM_ARRAY_TASK_ID="0", NUM_SLICES="1", WORKERS="1", PYTHON=sys.executable,
               REPO_DIR=ROOT, EVAL_FILES=f"medmcqa={medmcqa} pubmedqa={pubmedqa}", LANGUAGES="eng")
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    slices = out / "slices"
    ids = (slices / "slice_0000_text_document.ids").read_text().split()
    everything = [d["id"] for d in read_jsonl(slices / "slice_0000.jsonl")]
    assert len(everything) == 20 and ids == [i for i in everything if i not in ("PMID:1003", "PMID:1010")]
    report = json.loads((slices / "slice_0000.contamination.json").read_text())
    assert report["sets"]["medmcqa:dev.json"]["contaminated_items"][0]["ngram_docs"] == ["PMID:1003"]
    assert report["sets"]["pubmedqa:ori_pqal.json"]["contaminated_items"][0]["pmid_docs"] == ["PMID:1010"]
