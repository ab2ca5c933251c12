"""tools/review_sheet.py: a blind side-by-side sheet of several models' answers."""
import csv
import re

from conftest import run_tool, write_jsonl

from megatron_biomed import review_sheet as R


def answer_files(tmp_path, n=12):
    questions = [{"id": f"q{i}", "question": f"Is condition {i} <serious>?", "answer": f"Reference {i}."}
                 for i in range(n)]
    # generate.py output (input fields kept, `completion`) and fine-tuning's valid_generations.jsonl
    base = write_jsonl(tmp_path / "base.jsonl", [dict(q, completion=f" base says {i} & more") for i, q in
                                                  enumerate(questions)])
    tuned = write_jsonl(tmp_path / "tuned.jsonl", [{"id": q["id"], "prompt": "...", "reference": q["answer"],
                                                    "generated": f"<script>alert({i})</script> tuned {i}"}
                                                   for i, q in enumerate(reversed(questions))])  # other order
    return base, tuned


def test_blind_sheet_html_csv_and_key(tmp_path):
    base, tuned = answer_files(tmp_path)
    r = run_tool("review_sheet", "--answers", f"base_model={base}", "--answers", f"tuned_model={tuned}",
                 "--output", tmp_path / "review.html", check=0)
    assert "12 questions x 2 answers" in r.stdout
    page = (tmp_path / "review.html").read_text()
    rows = list(csv.DictReader(open(tmp_path / "review.csv")))
    key = {(k["id"], k["label"]): k["model"] for k in csv.DictReader(open(tmp_path / "review_key.csv"))}
    # blind: no model name in what the graders see
    for text in (page, (tmp_path / "review.csv").read_text()):
        assert "base_model" not in text and "tuned_model" not in text
    # escaped, not executable; the reference is the question file's answer, not the completion
    assert "<script>alert" not in page and "&lt;script&gt;alert(0)&lt;/script&gt;" in page
    assert "Is condition 3 &lt;serious&gt;?" in page and "Reference 3." in page
    assert len(rows) == 24 and {r["label"] for r in rows} == {"A", "B"}
    for row in rows:  # the key maps every label back to the model that wrote the answer
        model = key[(row["id"], row["label"])]
        i = row["id"][1:]
        assert row["answer"] == (f"base says {i} & more" if model == "base_model"
                                 else f"<script>alert({11 - int(i)})</script> tuned {11 - int(i)}")
        assert row["reference"] == f"Reference {i}." and row["rating_1_to_5"] == ""
    # shuffled per question, and reproducibly
    firsts = [key[(f"q{i}", "A")] for i in range(12)]
    assert len(set(firsts)) == 2
    assert R.blind(R.build_items(None, [("a", str(base)), ("b", str(tuned))]), 1234)[1] == \
        R.blind(R.build_items(None, [("a", str(base)), ("b", str(tuned))]), 1234)[1]
    assert len(re.findall(r'type="radio" name="q1A"', page)) == 5


def test_bad_inputs_are_one_line(tmp_path):
    base, tuned = answer_files(tmp_path)
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": "q0", "completion": "x"}])
    r = run_tool("review_sheet", "--answers", f"a={base}", "--answers", f"b={short}", "--output", tmp_path / "o.html")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {short}: no answer for id 'q1' ({base}:2); give every model's answers to the same questions")
    r = run_tool("review_sheet", "--answers", str(base), "--output", tmp_path / "o.html")
    assert r.returncode == 2 and "give NAME=FILE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    noanswer = write_jsonl(tmp_path / "noanswer.jsonl", [{"id": "q0", "question": "q", "text": "t"}])
    r = run_tool("review_sheet", "--answers", f"a={noanswer}", "--output", tmp_path / "o.html")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {noanswer}:1: no answer (looked for completion, generated, answer); name its field with --answer-key")
    assert not (tmp_path / "o.html").exists()
