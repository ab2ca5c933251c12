"""The README and docs/ as a user follows them: every ```bash block of the README's tour and of
each page, in order, in one shell from the repository root (the page order below: each page
starts from the outputs of those before it), on the bundled sample and CPU settings; and every
relative link resolves. Blocks that need what a test cannot have (a GPU cluster, lm-eval's
downloads, a Megatron-LM checkpoint) are ```text and say so."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# the order a reader takes them (and the order their examples build on each other)
PAGES = ["data", "model-and-parallelism", "training", "checkpoints", "evaluation", "patient-questions",
         "corpus-hygiene", "performance", "reliability", "slurm", "layout", "megatron-lm-flags"]


def bash_blocks(path):
    return re.findall(r"^```bash\n(.*?)^```", open(path, encoding="utf-8").read(), re.S | re.M)


def test_every_page_is_linked_and_every_link_resolves():
    pages = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert pages == sorted(PAGES)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(readme.splitlines()) < 150  # the front door stays short: the topics live in docs/
    for page in PAGES:
        assert f"](docs/{page}.md)" in readme, page
    for path in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", open(path, encoding="utf-8").read()):
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: {target}"


@pytest.mark.slow
def test_readme_tour_and_docs_run_as_written(tmp_path):
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        pytest.skip("the pages activate .venv: run the tests with its python (make test)")
    blocks = [("README.md", b) for b in bash_blocks(os.path.join(ROOT, "README.md"))]
    assert blocks[0][1].startswith("make install")  # run by `make test` already: a no-op here
    for page in PAGES:
        blocks += [(f"docs/{page}.md", b) for b in bash_blocks(os.path.join(ROOT, "docs", f"{page}.md"))]
    script = "set -euo pipefail\n" + "".join(f"echo '### {where} block {i}'\n{b}\n" for i, (where, b) in
                                               enumerate(blocks))
    (tmp_path / "pages.sh").write_text(script)
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "VIRTUAL_ENV", "MASTER_", "RANK",
                                                                     "WORLD_SIZE", "MEGATRON_BIOMED_DEBUG"))}
    env.update(WORK=str(work), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(tmp_path / "pages.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + "\n--- stderr:\n" + r.stderr[-4000:]
    assert f"### {blocks[-1][0]} block {len(blocks) - 1}" in r.stdout
    # what the pages say their commands produce
    assert (work / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "40\n"
    assert (work / "hf" / "config.json").exists() and (work / "checkpoints" / "settings.yaml").exists()
    assert os.path.getsize(work / "data" / "merged.bin") > 0
    assert (work / "runs" / "blend" / "latest_checkpointed_iteration.txt").read_text() == "60\n"
    assert (work / "runs" / "again" / "latest_checkpointed_iteration.txt").read_text() == "20\n"
    assert json.loads((work / "finetune" / "medmcqa" / "metrics.json").read_text())["best_epoch"] in (1, 2)
    assert "model-index" in (work / "release" / "README.md").read_text()
    assert (work / "qa" / "review.html").exists() and (work / "qa-hf" / "config.json").exists()
    assert len((work / "batch_12.jsonl").read_text().splitlines()) == 8  # tiny's global batch
    assert "fits" in r.stdout  # megatron-biomed-plan's table
