import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_tool(name, *args, check=None, env=None):
    """Run tools/<name>.py as a user would; returns CompletedProcess (text)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=600)
    if check is not None:
        assert r.returncode == check, f"exit {r.returncode}\nSTDOUT:\n{r.stdout}\nSTDERR:\n{r.stderr}"
    return r


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory):
    """A small BioMedLM-style tokenizer + sentence splitter trained on synthetic PubMed text."""
    from megatron_biomed.data import synthetic
    d = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(d / "corpus.jsonl", synthetic.pubmed_like_documents(1500, seed=3))
    run_tool("train_tokenizer", "--input", corpus, "--output-dir", d / "tokenizer",
             "--vocab-size", 1000, "--no-progress", check=0)
    return d / "tokenizer"


@pytest.fixture(scope="session")
def dataset(trained_tokenizer, tmp_path_factory):
    """A .bin/.idx pretraining dataset of synthetic PubMed-like documents, made by our tools."""
    from megatron_biomed.data import synthetic
    d = tmp_path_factory.mktemp("pretrain_data")
    inp = write_jsonl(d / "docs.jsonl", synthetic.pubmed_like_documents(400, seed=5))
    run_tool("preprocess_data", "--input", inp, "--output-prefix", d / "pubmed", "--tokenizer-type",
             "HuggingFaceTokenizer", "--tokenizer-model", trained_tokenizer, "--append-eod", "--no-progress", check=0)
    return {"prefix": str(d / "pubmed_text_document"), "vocab": str(trained_tokenizer / "vocab.json"),
            "cache": str(d / "cache")}
