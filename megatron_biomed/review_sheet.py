"""A blind review sheet for clinicians: questions, reference answers and several models'
answers side by side, model names hidden and their order shuffled per question, with rating
fields; as one self-contained HTML page and as a CSV of the same rows.

    python tools/review_sheet.py --answers base=before.jsonl --answers tuned=after.jsonl \\
        --output review.html          # + review.csv and review_key.csv
    python tools/review_sheet.py summarize --key review_key.csv ratings-*.csv   # reading them back

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
import json
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


CSV_FIELDS = ("id", "question", "reference", "label", "answer", "rating_1_to_5", "harm", "comment")
# What the page exports: one row per answer; harm is "not assessed" until the reviewer says
# "no" or "yes", so an answer nobody judged never reads as harmless.
EXPORT_FIELDS = ("reviewer", "id", "label", "rating_1_to_5", "harm", "comment")
HARM = ("not assessed", "no", "yes")


def to_csv(blinded):
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for item in blinded:
        for label, text in item["answers"]:
            w.writerow({"id": item["id"], "question": item["question"], "reference": item["reference"],
                        "label": label, "answer": text, "rating_1_to_5": "", "harm": HARM[0], "comment": ""})
    return buf.getvalue()


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:0 1em 2em;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:.6em 0;z-index:1}
.item{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1.5em 0}
.answers{display:flex;gap:1em;flex-wrap:wrap}.answer{flex:1 1 300px;border:1px solid #ddd;border-radius:4px;padding:.8em}
.answer.rated{border-color:#5a5}.text{white-space:pre-wrap;margin:.5em 0 1em}
.ref{background:#f5f5f5;padding:.6em;white-space:pre-wrap}textarea{width:100%;height:4em}
fieldset{border:none;padding:0;margin:.3em 0}fieldset label{display:block}
table.meaning td{padding:.1em .6em}:focus{outline:3px solid #36c;outline-offset:1px}
#unrated a{margin-right:.5em}"""

_SCRIPT = """const FIELDS=%s;
function store(){return "megatron_biomed.review:"+document.body.dataset.sheet;}
function answers(){return Array.from(document.querySelectorAll(".answer"));}
function read(a){const r=a.querySelector("input[type=radio]:checked");
 return {rating:r?r.value:"",harm:a.querySelector("select").value,comment:a.querySelector("textarea").value};}
function save(){const all={reviewer:document.getElementById("reviewer").value,answers:{}};
 answers().forEach(a=>{all.answers[a.id]=read(a);});
 localStorage.setItem(store(),JSON.stringify(all));progress();}
function restore(){const all=JSON.parse(localStorage.getItem(store())||"null");if(!all)return;
 document.getElementById("reviewer").value=all.reviewer||"";
 answers().forEach(a=>{const v=all.answers[a.id];if(!v)return;
  if(v.rating){const r=a.querySelector("input[type=radio][value='"+v.rating+"']");if(r)r.checked=true;}
  a.querySelector("select").value=v.harm||"not assessed";a.querySelector("textarea").value=v.comment||"";});}
function progress(){const all=answers(),todo=all.filter(a=>!read(a).rating);
 all.forEach(a=>a.classList.toggle("rated",!!read(a).rating));
 document.querySelectorAll(".progress").forEach(p=>{p.textContent=(all.length-todo.length)+" of "+all.length+" answers rated";});
 const list=document.getElementById("unrated");list.textContent=todo.length?"Not rated yet: ":"Every answer is rated.";
 todo.forEach(a=>{const l=document.createElement("a");l.href="#"+a.id;l.textContent=a.dataset.title;list.appendChild(l);list.append(" ");});}
function exportRatings(){const who=document.getElementById("reviewer").value.trim();
 if(!who){alert("Please enter your name at the top first.");document.getElementById("reviewer").focus();return;}
 const rows=[FIELDS];answers().forEach(a=>{const v=read(a);rows.push([who,a.dataset.id,a.dataset.label,v.rating,v.harm,v.comment]);});
 const csv=rows.map(r=>r.map(c=>'"'+String(c).replace(/"/g,'""')+'"').join(",")).join("\\n")+"\\n";
 const link=document.createElement("a");link.href=URL.createObjectURL(new Blob([csv],{type:"text/csv"}));
 link.download="ratings-"+who.replace(/[^A-Za-z0-9_.-]+/g,"_")+".csv";document.body.appendChild(link);link.click();link.remove();}
document.addEventListener("DOMContentLoaded",()=>{restore();progress();
 document.body.addEventListener("input",save);document.body.addEventListener("change",save);});""" % json.dumps(EXPORT_FIELDS)


def _sheet_id(blinded, title):
    """Ratings are kept in the browser under this: the same sheet, opened again, finds them."""
    import hashlib
    h = hashlib.sha256(title.encode())
    for item in blinded:
        h.update(repr((item["id"], item["answers"])).encode())
    return h.hexdigest()[:16]


def _download_button(where):
    return (f"<p><button type=\"button\" id=\"download-{where}\" onclick=\"exportRatings()\">Download ratings (CSV)"
            f"</button> <span class=\"progress\"></span></p>")


def to_html(blinded, title, show_reference=True):
    e = html.escape
    meaning = "".join(f"<tr><td><b>{v}</b></td><td>{e(t.split(' = ', 1)[1])}</td></tr>" for v, t in enumerate(RATING, 1))
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
             f"<body data-sheet=\"{_sheet_id(blinded, title)}\">",
             f"<header><h1>{e(title)}</h1><p><label>Your name: <input id=\"reviewer\" autocomplete=\"name\"></label>"
             f"</p>{_download_button('top')}<p id=\"unrated\"></p></header>",
             "<p>Each question has several answers, labelled A, B, ... in an order drawn anew for every question; "
             "which system wrote which is not shown. Rate each answer on its own. Your ratings are kept in this "
             "browser as you enter them (reloading or closing the page loses nothing); when you are done, press "
             "<i>Download ratings (CSV)</i> and send the file back. Everything works from the keyboard: Tab moves "
             "between fields, the arrow keys choose a rating.</p>",
             f"<table class=\"meaning\"><caption>What the ratings mean</caption>{meaning}"
             "<tr><td><b>harm</b></td><td>could this answer cause harm if a patient acted on it? "
             "<i>not assessed</i> until you choose <i>no</i> or <i>yes</i></td></tr></table>"]
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
            radios = "".join(f"<label><input type=\"radio\" name=\"{name}\" value=\"{v}\"> {e(t)}</label>"
                             for v, t in enumerate(RATING, 1))
            harm = "".join(f"<option>{h}</option>" for h in HARM)
            parts.append(f"<div class=\"answer\" id=\"{name}\" data-id=\"{qid}\" data-label=\"{label}\" "
                         f"data-title=\"{n}{label}\"><h3>Answer {label}</h3>"
                         f"<div class=\"text\">{e(text)}</div>"
                         f"<fieldset><legend>Rating</legend>{radios}</fieldset>"
                         f"<label>Could cause harm: <select name=\"{name}-harm\">{harm}</select></label>"
                         f"<p><textarea name=\"{name}-comment\" placeholder=\"comment\" aria-label=\"comment on answer "
                         f"{label} to question {n}\"></textarea></p></div>")
        parts.append("</div></section>")
    parts.append(f"<footer>{_download_button('bottom')}</footer></body></html>\n")
    return "".join(parts)


def build_parser():
    p = argparse.ArgumentParser(description="Blind side-by-side review sheet (HTML + CSV) of several models' "
                                            "answers to the same questions, for clinicians to grade. "
                                            "`review_sheet.py summarize --help`: reading the ratings back.")
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


def summarize_parser():
    p = argparse.ArgumentParser(prog="review_sheet.py summarize",
                                description="Unblind and summarize reviewers' ratings: per model the mean rating "
                                            "with a 95%% bootstrap interval, the harm rate, pairwise win rates and "
                                            "the agreement between reviewers (Krippendorff's alpha).")
    p.add_argument("ratings", nargs="+", help="rating files the sheet downloaded (ratings-<name>.csv), one per "
                                              "reviewer, or the sheet's CSV filled in a spreadsheet")
    p.add_argument("--key", required=True, help="the _key.csv written with the sheet")
    p.add_argument("--output", default=None, help="the summary's JSON and PNG go to OUTPUT.json and OUTPUT.png "
                                                  "(default: review_summary beside the key file)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's resampling")
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["summarize"]:
        from megatron_biomed import review_summary
        args = summarize_parser().parse_args(argv[1:])
        output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.key)), "review_summary")
        review_summary.run(args.key, args.ratings, output, args.seed)
        return 0
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
