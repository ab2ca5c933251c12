"""A blind review sheet for clinicians: questions, reference answers and several models'
answers side by side, model names hidden and their order shuffled per question, with rating
fields; as one self-contained HTML page and as a CSV of the same rows.

    python tools/review_sheet.py --answers base=before.jsonl --answers tuned=after.jsonl \\
        --output review.html          # + review.csv and review_key.csv

Answer files are JSON lines: what tools/generate.py writes (`completion`) or fine-tuning's
valid_generations.jsonl (`generated`). Rows are matched by their `id` field (or by line number
when a file has none); the question and the reference come from --questions or else from the
first answer file. The key that maps each "Answer A/B/..." back to its model goes to a separate
file, for whoever unblinds the grades.
"""
import argparse
import csv
import html
import io
import os
import random

from megatron_biomed.errors import UsageError, UserError, add_debug_flag, entry_point
from megatron_biomed.utils import atomic_output, iter_json_objects

ANSWER_KEYS = ("completion", "generated", "answer")
QUESTION_KEYS = ("question", "prompt")
REFERENCE_KEYS = ("reference", "answer", "output", "completion")
RATING = ("1 = wrong or unsafe", "2 = poor", "3 = acceptable", "4 = good", "5 = as good as a clinician's")


class ReviewInputError(UserError, ValueError):
    pass


def _field(record, keys, where, what, flag):
    for k in keys:
        if isinstance(record.get(k), str):
            return record[k]
    raise ReviewInputError(f"{where}: no {what} (looked for {', '.join(keys)}); name its field with {flag}")


def _rows(path):
    """{id: (line number, record)}: ids from the `id` field, or the line number."""
    out = {}
    for line_no, record in iter_json_objects(path, ReviewInputError):
        key = str(record["id"]) if "id" in record else str(line_no)
        if key in out:
            raise ReviewInputError(f"{path}:{line_no}: id {key!r} appears twice (first on line {out[key][0]})")
        out[key] = (line_no, record)
    if not out:
        raise ReviewInputError(f"{path}: no records")
    return out


def build_items(questions_path, answers, question_key=None, reference_key=None, answer_key=None):
    """[{id, question, reference, answers: [(model, text)]}] in the questions' order."""
    sources = {name: _rows(path) for name, path in answers}
    qpath = questions_path or answers[0][1]
    questions = _rows(qpath) if questions_path else sources[answers[0][0]]
    items = []
    for qid, (line_no, record) in questions.items():
        where = f"{qpath}:{line_no}"
        question = _field(record, (question_key,) if question_key else QUESTION_KEYS, where, "question",
                          "--question-key")
        keys = (reference_key,) if reference_key else REFERENCE_KEYS
        if not questions_path and not reference_key:  # that file's own answer field is not its reference
            keys = tuple(k for k in keys if k != (answer_key or _answer_field(record)))
        reference = next((record[k] for k in keys if isinstance(record.get(k), str)), "")
        got = []
        for name, path in answers:
            if qid not in sources[name]:
                raise ReviewInputError(f"{path}: no answer for id {qid!r} ({where}); give every model's answers to "
                                       f"the same questions")
            a_line, a_record = sources[name][qid]
            got.append((name, _field(a_record, (answer_key,) if answer_key else ANSWER_KEYS, f"{path}:{a_line}",
                                     "answer", "--answer-key").strip()))
        items.append({"id": qid, "question": question, "reference": reference.strip(), "answers": got})
    return items


def _answer_field(record):
    return next((k for k in ANSWER_KEYS if isinstance(record.get(k), str)), None)


def blind(items, seed):
    """Each item's answers shuffled (its own order per question) and labelled A, B, ...;
    returns (blinded items, key rows)."""
    rng = random.Random(seed)
    out, key = [], []
    for item in items:
        answers = list(item["answers"])
        rng.shuffle(answers)
        labelled = []
        for i, (model, text) in enumerate(answers):
            label = chr(ord("A") + i)
            labelled.append((label, text))
            key.append({"id": item["id"], "label": label, "model": model})
        out.append(dict(item, answers=labelled))
    return out, key


CSV_FIELDS = ("id", "question", "reference", "label", "answer", "rating_1_to_5", "harmful_yes_no", "comment")


def to_csv(blinded):
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for item in blinded:
        for label, text in item["answers"]:
            w.writerow({"id": item["id"], "question": item["question"], "reference": item["reference"],
                        "label": label, "answer": text, "rating_1_to_5": "", "harmful_yes_no": "", "comment": ""})
    return buf.getvalue()


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
.item{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1.5em 0}
.answers{display:flex;gap:1em;flex-wrap:wrap}.answer{flex:1 1 300px;border:1px solid #ddd;border-radius:4px;padding:.8em}
.text{white-space:pre-wrap;margin:.5em 0 1em}.ref{background:#f5f5f5;padding:.6em;white-space:pre-wrap}
textarea{width:100%;height:4em}fieldset{border:none;padding:0;margin:.3em 0}"""

_SCRIPT = """function exportRatings(){
 const rows=[["id","label","rating_1_to_5","harmful_yes_no","comment"]];
 document.querySelectorAll(".answer").forEach(a=>{
  const r=a.querySelector("input[type=radio]:checked"),h=a.querySelector("input[type=checkbox]");
  rows.push([a.dataset.id,a.dataset.label,r?r.value:"",h.checked?"yes":"no",a.querySelector("textarea").value]);});
 const csv=rows.map(r=>r.map(c=>'"'+String(c).replace(/"/g,'""')+'"').join(",")).join("\\n")+"\\n";
 const link=document.createElement("a");link.href=URL.createObjectURL(new Blob([csv],{type:"text/csv"}));
 link.download="ratings.csv";link.click();}"""


def to_html(blinded, title, show_reference=True):
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>{e(title)}</h1>",
             "<p>Each question has several answers, labelled A, B, ... in an order drawn anew for every question; "
             "which system wrote which is not shown. Rate each answer on its own, then press "
             "<button type=\"button\" onclick=\"exportRatings()\">Download ratings (CSV)</button> "
             "and send the file back.</p>"]
    for n, item in enumerate(blinded, 1):
        qid = e(item["id"])
        parts.append(f"<section class=\"item\" id=\"q{n}\"><h2>Question {n}</h2>"
                     f"<div class=\"text\">{e(item['question'])}</div>")
        if show_reference and item["reference"]:
            parts.append(f"<details><summary>Reference answer</summary><div class=\"ref\">{e(item['reference'])}"
                         f"</div></details>")
        parts.append("<div class=\"answers\">")
        for label, text in item["answers"]:
            name = f"q{n}{label}"
            radios = "".join(f"<label title=\"{e(t)}\"><input type=\"radio\" name=\"{name}\" value=\"{v}\"> {v}</label> "
                             for v, t in enumerate(RATING, 1))
            parts.append(f"<div class=\"answer\" data-id=\"{qid}\" data-label=\"{label}\"><h3>Answer {label}</h3>"
                         f"<div class=\"text\">{e(text)}</div>"
                         f"<fieldset><legend>Rating (1 = wrong or unsafe, 5 = as good as a clinician's)</legend>"
                         f"{radios}</fieldset>"
                         f"<label><input type=\"checkbox\" name=\"{name}-harm\"> could cause harm</label>"
                         f"<p><textarea name=\"{name}-comment\" placeholder=\"comment\"></textarea></p></div>")
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def build_parser():
    p = argparse.ArgumentParser(description="Blind side-by-side review sheet (HTML + CSV) of several models' "
                                            "answers to the same questions, for clinicians to grade.")
    p.add_argument("--answers", action="append", required=True, metavar="NAME=FILE",
                   help="a model's answers (JSON lines from tools/generate.py or valid_generations.jsonl); repeat "
                        "for each model; NAME goes only into the key file")
    p.add_argument("--questions", default=None, help="JSON lines with the questions and reference answers "
                                                     "(default: the first --answers file)")
    p.add_argument("--question-key", default=None, help=f"question field (default: first of {', '.join(QUESTION_KEYS)})")
    p.add_argument("--reference-key", default=None, help="reference answer field (default: reference, answer, output)")
    p.add_argument("--answer-key", default=None, help=f"answer field (default: first of {', '.join(ANSWER_KEYS)})")
    p.add_argument("--output", required=True, help="the HTML sheet; the CSV and the key go beside it "
                                                   "(<name>.csv, <name>_key.csv)")
    p.add_argument("--title", default="Answers to patient questions: blind review")
    p.add_argument("--no-reference", action="store_true", help="do not show the reference answers")
    p.add_argument("--seed", type=int, default=1234, help="the shuffle of each question's answers")
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    answers = []
    for spec in args.answers:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--answers {spec!r}: give NAME=FILE, e.g. --answers tuned=generations.jsonl")
        if name in dict(answers):
            raise UsageError(f"--answers {spec!r}: the name {name!r} is used twice")
        answers.append((name, path))
    items = build_items(args.questions, answers, args.question_key, args.reference_key, args.answer_key)
    blinded, key = blind(items, args.seed)
    stem = os.path.splitext(args.output)[0]
    with atomic_output(args.output, "w", encoding="utf-8") as f:
        f.write(to_html(blinded, args.title, not args.no_reference))
    with atomic_output(stem + ".csv", "w", encoding="utf-8") as f:
        f.write(to_csv(blinded))
    with atomic_output(stem + "_key.csv", "w", encoding="utf-8") as f:
        w = csv.DictWriter(f, ("id", "label", "model"), lineterminator="\n")
        w.writeheader()
        w.writerows(key)
    print(f"review sheet: {len(items)} questions x {len(answers)} answers -> {args.output}, {stem}.csv "
          f"(blind); {stem}_key.csv unblinds the labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
