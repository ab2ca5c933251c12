import json
import os
import random
import subprocess
import sys

from conftest import ROOT, run_tool, write_jsonl
from megatron_biomed.data import synthetic


def test_files_load_in_transformers_and_eod_is_last(trained_tokenizer):
    from transformers import GPT2TokenizerFast

    from megatron_biomed.data.tokenizer import load_tokenizer
    names = sorted(os.listdir(trained_tokenizer))
    for n in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "sentence_splitter.json"):
        assert n in names
    fast = GPT2TokenizerFast.from_pretrained(trained_tokenizer)
    assert len(fast) == 1000
    assert fast.eos_token == "<|endoftext|>" and fast.eos_token_id == 999
    assert fast.convert_ids_to_tokens(999) == "<|endoftext|>"
    # vocab.json + merges.txt (what GPT2BPETokenizer reads) encode exactly as tokenizer.json.
    from_files = load_tokenizer("GPT2BPETokenizer", str(trained_tokenizer / "vocab.json"),
                                str(trained_tokenizer / "merges.txt"))
    text = "Treatment with PD-L1 (10 mg/kg i.v.) reduced NF-κB signaling in mice (p < 0.05).<|endoftext|>"
    assert fast.encode(text) == from_files.encode(text).ids
    assert fast.encode(text)[-1] == 999
    # No prefix space: a leading word is not encoded as if preceded by a space.
    assert not fast.convert_ids_to_tokens(fast.encode("Sepsis"))[0].startswith("Ġ")


def test_round_trips_any_text(trained_tokenizer):
    from transformers import GPT2TokenizerFast
    fast = GPT2TokenizerFast.from_pretrained(trained_tokenizer)
    rng = random.Random(0)
    alphabet = "abcXYZ 0123\n\t  .,;:-()[]αβγκ°±µ–—‘’“”€中文🧬\u00a0\u200b\r"
    samples = ["", " leading space", "trailing space ", "a\n\nb", "\x00\x01 control",
               "Café naïve façade", "🧬🧪 DNA"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    for s in samples:
        assert fast.decode(fast.encode(s)) == s


def test_sentence_splitter_is_json_and_learns_abbreviations(trained_tokenizer, tmp_path):
    data = json.loads((trained_tokenizer / "sentence_splitter.json").read_text())
    assert {"i.v", "al", "approx"} <= set(data["abbrev_types"])
    # Runs with no nltk data anywhere (nothing is downloaded or loaded from nltk_data).
    code = ("from megatron_biomed.data.sentences import load_splitter; import sys, json; "
            "s = load_splitter(sys.argv[1]); print(json.dumps(s.split(sys.argv[2])))")
    text = ("As reported by Smith et al. in 2001, the dose was 5 mg i.v. daily. "
            "Follow-up was approx. 12 months. Mortality fell.\nRESULTS: It worked.")
    env = dict(os.environ, NLTK_DATA=str(tmp_path / "none"), HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code, str(trained_tokenizer / "sentence_splitter.json"), text],
                       capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert json.loads(r.stdout) == [
        "As reported by Smith et al. in 2001, the dose was 5 mg i.v. daily.",
        "Follow-up was approx. 12 months.", "Mortality fell.", "RESULTS: It worked."]


def test_keep_newlines_reassembles_text(trained_tokenizer):
    from megatron_biomed.data.sentences import load_splitter
    s = load_splitter(trained_tokenizer / "sentence_splitter.json")
    text = "Title line\nFirst one. Second one.  \n\nThird one."
    parts = s.split(text, keep_newlines=True)
    assert "".join(parts) == text and len(parts) == 4


def test_bad_input_named(tmp_path):
    good = list(synthetic.pubmed_like_documents(3))
    p = write_jsonl(tmp_path / "docs.jsonl", good)
    with open(p, "a") as f:
        f.write('{"id": "x", "text": \n')
    r = run_tool("train_tokenizer", "--input", p, "--output-dir", tmp_path / "tok", "--no-progress", check=1)
    assert f"{p}:4: malformed JSON" in r.stderr
    assert not (tmp_path / "tok").exists()
    r = run_tool("train_tokenizer", "--input", p, "--json-keys", "abstract", "--output-dir", tmp_path / "tok",
                 "--no-progress", check=1)
    assert f"{p}:1: record has no string field 'abstract'" in r.stderr
