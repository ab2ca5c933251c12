"""tools/dedup.py: exact duplicates (after normalisation) and near duplicates above the Jaccard
threshold removed, distinct documents kept byte for byte, abstract / PMC full text pairs
resolved by --prefer."""
import copy
import json

import pytest

from conftest import read_jsonl, run_tool, write_jsonl

from megatron_biomed.data import synthetic


def corpus(tmp_path):
    docs = list(synthetic.pubmed_like_documents(300, seed=5))
    exact = copy.deepcopy(docs[10])
    exact["id"], exact["text"] = "PMID:90000001", exact["text"].upper().replace(".", " . ")
    near = copy.deepcopy(docs[20])
    words = near["text"].split()
    words[5], words[-3] = "changed", "altered"  # two words of ~150: Jaccard of 5-word shingles ~0.9
    near["id"], near["text"] = "PMID:90000002", " ".join(words)
    far = copy.deepcopy(docs[30])
    words = far["text"].split()
    far["id"], far["text"] = "PMID:90000003", " ".join(w if i % 3 else "x" for i, w in enumerate(words))
    docs += [exact, near, far]
    return write_jsonl(tmp_path / "docs.jsonl", docs), docs


@pytest.mark.parametrize("workers", [1, 2])
def test_exact_and_near_duplicates_removed_distinct_kept(tmp_path, workers):
    path, docs = corpus(tmp_path)
    r = run_tool("dedup", "--input", path, "--output", tmp_path / "out.jsonl", "--report", tmp_path / "r.json",
                 "--workers", workers, "--no-progress", check=0)
    assert r.stdout.startswith("303 documents: 1 exact duplicates, 1 near duplicates (Jaccard >= 0.8), 0 abstracts")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["removed"] == [
        {"id": "PMID:90000001", "reason": "exact duplicate", "duplicate_of": docs[10]["id"]},
        {"id": "PMID:90000002", "reason": "near duplicate", "duplicate_of": docs[20]["id"]}]
    lines = path.read_text().splitlines(keepends=True)
    assert (tmp_path / "out.jsonl").read_text() == "".join(lines[:300] + lines[302:])  # the rest, byte for byte
    # above the near duplicate's similarity it is kept
    run_tool("dedup", "--input", path, "--output", tmp_path / "strict.jsonl", "--threshold", 0.97, "--no-progress",
             check=0)
    assert "PMID:90000002" in {d["id"] for d in read_jsonl(tmp_path / "strict.jsonl")}


@pytest.mark.parametrize("prefer, dropped", [("fulltext", ["PMID:4242"]), ("abstract", ["PMC9"]), ("both", [])])
def test_abstract_and_full_text_of_one_article(tmp_path, prefer, dropped):
    docs = list(synthetic.pubmed_like_documents(5, seed=6))
    docs.append({"id": "PMID:4242", "source": "pubmed_abstract", "title": "A trial", "text": "The abstract of it.",
                 "year": 2020, "journal": "J"})
    docs.append({"id": "PMC9", "source": "pmc_fulltext", "title": "A trial", "text": "The whole article, long.",
                 "year": 2020, "journal": "J", "pmid": 4242})
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    r = run_tool("dedup", "--input", path, "--output", tmp_path / "out.jsonl", "--prefer", prefer, "--no-progress",
                 "--report", tmp_path / "r.json", check=0)
    kept = [d["id"] for d in read_jsonl(tmp_path / "out.jsonl")]
    assert kept == [d["id"] for d in docs if d["id"] not in dropped]
    assert f"{len(dropped)} " in r.stdout and f"(--prefer {prefer})" in r.stdout
    removed = json.loads((tmp_path / "r.json").read_text())["removed"]
    assert [x["id"] for x in removed] == dropped


def test_bad_input_is_one_line(tmp_path):
    path, _ = corpus(tmp_path)
    lines = path.read_text().splitlines()
    lines[4] = "{not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    r = run_tool("dedup", "--input", bad, "--output", tmp_path / "out.jsonl", "--no-progress")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:5: not a JSON object")
    assert not (tmp_path / "out.jsonl").exists()
    r = run_tool("dedup", "--input", path, "--output", tmp_path / "out.jsonl", "--threshold", 1.5)
    assert r.returncode == 2 and "--threshold 1.5" in r.stderr
