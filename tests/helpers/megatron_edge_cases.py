"""Inputs whose Megatron-LM preprocess_data.py outputs are pinned in tests/data/megatron_lm/.

`python tests/helpers/megatron_edge_cases.py OUT_DIR` writes the JSONL files; the digests were
made by tests/helpers/pin_megatron_lm.sh with Megatron-LM core_v0.16.1 itself. Deterministic:
no randomness beyond a fixed-seed generator of its own, no dependence on this package.
"""
import json
import os
import random
import sys


def edge_records():
    rng = random.Random(7)
    words = ["ACGT" * 30, "gene", "IL-6", "p<0.05", "10.1000/xyz", "μg/kg", "β-blockers", "(n=12)"]
    return [
        {"id": "plain", "text": "Aspirin reduces fever."},
        {"id": "empty", "text": ""},
        {"id": "special", "text": "The <|endoftext|> token appears in this abstract.<|endoftext|>"},
        {"id": "list", "text": ["First sentence.", "", "Second sentence with μ-opioid receptors.", "   "]},
        {"id": "empty-list", "text": []},
        {"id": "list-of-empty", "text": ["", ""]},
        {"id": "unicode", "text": "Ünïcödé: 中文摘要, emoji 🧬🦠, Greek αβγ, NBSP\u00a0x, line\u2028sep, "
                                  "tab\there,\r\nCRLF, combining e\u0301, RTL שלום, \x1c\x1f ctl."},
        {"id": "spaces", "text": "   "},
        {"id": "long", "text": "Very long: " + " ".join(rng.choice(words) for _ in range(20000))},
        {"id": "one-word", "text": "x" * 50000},
        {"id": "last", "text": "End."},
    ]


def sentence_records():
    rng = random.Random(11)
    starts = ["Patients", "We", "The study", "Dr. Smith et al.", "In vivo", "Results", "Mice"]
    middles = ["received 5 mg i.v. daily", "showed a significant effect (p < 0.01)", "were followed for 12 mo.",
               "had elevated IL-6 levels", "et al. reported similar findings", "were enrolled in the trial"]
    out = []
    for i in range(60):
        paras = []
        for _ in range(rng.randint(1, 3)):
            paras.append("  ".join(f"{rng.choice(starts)} {rng.choice(middles)}." for _ in range(rng.randint(1, 5))))
        text = "\n\n".join(paras)
        if i % 9 == 0:
            text = "<|endoftext|> " + text + "\n"
        out.append({"id": f"s{i}", "text": text})
    out.append({"id": "empty", "text": ""})
    return out


def write(records, path):
    with open(path, "w", encoding="utf-8") as f:
        for n, r in enumerate(records):
            f.write(json.dumps(r, ensure_ascii=n % 2 == 0) + "\n")  # both JSON spellings of non-ASCII
    return path


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    write(edge_records(), os.path.join(out_dir, "edge.jsonl"))
    write(sentence_records(), os.path.join(out_dir, "sentences.jsonl"))
    # line ends other than \n: a lone \r (old Mac files) and a mix of \r, \r\n and \n
    with open(os.path.join(out_dir, "edge.jsonl"), "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    with open(os.path.join(out_dir, "cr.jsonl"), "wb") as f:
        f.write(b"".join(line + b"\r" for line in lines))
    with open(os.path.join(out_dir, "mixed.jsonl"), "wb") as f:
        f.write(b"".join(line + (b"\r", b"\r\n", b"\n")[n % 3] for n, line in enumerate(lines)))


if __name__ == "__main__":
    main(sys.argv[1])
