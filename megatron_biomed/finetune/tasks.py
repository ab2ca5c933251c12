"""Readers for the biomedical QA benchmarks, in the files their authors publish and in the
layouts the Hugging Face hub exports (the user points at local copies; nothing is downloaded).
A label is never shifted on a guess: where a file does not show its numbering, the reader
refuses and names the flag that settles it.

Every reader returns a list of `Example`s. Multiple-choice tasks (MedMCQA, MedQA, MMLU) fill
`options`; classification tasks (PubMedQA yes/no/maybe, BioASQ yes/no) fill `context` and use
`labels` as the class names. A malformed record raises TaskFormatError naming file and line.
"""
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field

from megatron_biomed.utils import iter_json_objects, read_text
from megatron_biomed.errors import UserError


class TaskFormatError(UserError, ValueError):
    pass


@dataclass
class Example:
    id: str
    question: str
    label: int                       # index into options (multiple choice) or labels (classification)
    options: list = field(default_factory=list)
    context: str = ""
    labels: tuple = ()               # class names, classification tasks only
    subject: str = ""
    pmids: tuple = ()                # the PubMed articles the item is built from (PubMedQA, BioASQ)

    @property
    def is_multiple_choice(self):
        return bool(self.options)

    @property
    def num_choices(self):
        return len(self.options) if self.options else len(self.labels)


def _need(record, keys, path, line_no, types=str):
    for k in keys:
        if k not in record:
            raise TaskFormatError(f"{path}:{line_no}: missing field {k!r}")
        if types is not None and not isinstance(record[k], types):
            raise TaskFormatError(f"{path}:{line_no}: field {k!r} should be {getattr(types, '__name__', types)}")


def _read_json_or_lines(path):
    """("json", value) for a file holding one JSON value, or ("lines", [(line_no, object), ...])
    for JSON lines (what the Hugging Face hub's `to_json` writes). A byte-order mark is skipped."""
    text = read_text(path, TaskFormatError)
    try:
        return "json", json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # anything else is broken JSON, not JSON lines
            first = text.lstrip()[:1]
            if first != "{" or "\n" not in text.strip():
                raise TaskFormatError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
    return "lines", list(iter_json_objects(path, TaskFormatError))


def _label_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


MEDMCQA_COP_BASES = (0, 1)


def add_cop_base_argument(parser):
    """--cop-base, for the tools that read MedMCQA (evaluate.py, finetune.py)."""
    parser.add_argument("--cop-base", type=int, choices=MEDMCQA_COP_BASES, default=None,
                        help="MedMCQA: options in 'cop' are numbered from 1 (the original release, 1-4) or "
                             "0 (Hugging Face hub exports, 0-3); read from the file, needed only when it "
                             "shows neither a 0 nor a 4")


def read_medmcqa(path, cop_base=None):
    """MedMCQA as released (train.json/dev.json: JSON lines, `cop` 1-4) or exported from the
    Hugging Face hub (`cop` 0-3). The numbering is read from the file: a 0 means 0-3, a 4 means
    1-4; a file with neither (only 1-3) is refused unless `cop_base` (--cop-base) says which,
    since guessing would shift every label by one."""
    rows = []
    for line_no, r in iter_json_objects(path, TaskFormatError):
        _need(r, ("question", "opa", "opb", "opc", "opd"), path, line_no)
        cop = r.get("cop")
        if not _label_int(cop) or not -1 <= cop <= 4:
            raise TaskFormatError(f"{path}:{line_no}: 'cop' should be an option number (1-4, or 0-3 in hub "
                                  f"exports), found {cop!r}")
        if cop == -1:
            raise TaskFormatError(f"{path}:{line_no}: 'cop' is -1, an unlabelled question (the hub's test split "
                                  f"has no answers); evaluate on the validation split")
        rows.append((line_no, r))
    where = {r["cop"]: n for n, r in reversed(rows)}  # the first line of each value
    if cop_base is None:
        if 0 in where and 4 in where:
            raise TaskFormatError(f"{path}: 'cop' is 0 on line {where[0]} and 4 on line {where[4]}: numbered both "
                                  f"from 0 and from 1 (two layouts mixed?)")
        if 0 in where:
            cop_base = 0
        elif 4 in where:
            cop_base = 1
        elif rows:
            raise TaskFormatError(f"{path}: every 'cop' is 1-3, so the file does not show whether options are "
                                  f"numbered 1-4 (MedMCQA's release) or 0-3 (Hugging Face hub exports); pass "
                                  f"--cop-base 1 or --cop-base 0")
    elif cop_base not in MEDMCQA_COP_BASES:
        raise TaskFormatError(f"--cop-base {cop_base}: should be 0 or 1")
    out = []
    for line_no, r in rows:
        label = r["cop"] - cop_base
        if not 0 <= label <= 3:
            raise TaskFormatError(f"{path}:{line_no}: 'cop' {r['cop']} is out of range for --cop-base {cop_base} "
                                  f"({cop_base}-{cop_base + 3})")
        out.append(Example(id=str(r.get("id", line_no)), question=r["question"], label=label,
                           options=[r[k] for k in ("opa", "opb", "opc", "opd")],
                           subject=str(r.get("subject_name") or "")))
    return out


def _medqa_example(r, path, line_no):
    where = f"{path}:{line_no}"
    if "sent1" in r or "ending0" in r:  # GBaker/MedQA-USMLE-4-options-hf (lm-eval's medqa_4options)
        _need(r, ("sent1", "ending0", "ending1", "ending2", "ending3"), path, line_no)
        if not _label_int(r.get("label")) or not 0 <= r["label"] <= 3:
            raise TaskFormatError(f"{where}: 'label' should be 0-3, found {r.get('label')!r}")
        return Example(id=str(r.get("id", line_no)), question=r["sent1"], label=r["label"],
                       options=[r[f"ending{i}"] for i in range(4)])
    if "choices" in r:  # BigBio's med_qa_*_bigbio_qa: choices + the answer's text
        choices, answer = r["choices"], r.get("answer")
        answer = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) not in (4, 5):
            raise TaskFormatError(f"{where}: 'choices' should be a list of 4 or 5 strings")
        if not isinstance(r.get("question"), str) or choices.count(answer) != 1:
            raise TaskFormatError(f"{where}: 'answer' {answer!r} should be exactly one of 'choices'")
        return Example(id=str(r.get("id", line_no)), question=r["question"], label=choices.index(answer),
                       options=choices)
    _need(r, ("question", "answer_idx"), path, line_no)
    options = r.get("options")
    if isinstance(options, list):  # BigBio's med_qa_*_source: [{"key": "A", "value": ...}, ...]
        if not all(isinstance(o, dict) and isinstance(o.get("key"), str) for o in options):
            raise TaskFormatError(f"{where}: 'options' should map A..D or A..E to text")
        options = {o["key"]: o.get("value") for o in options}
    if not isinstance(options, dict):
        raise TaskFormatError(f"{where}: missing field 'options' (or 'sent1'/'ending0'-'ending3', or 'choices')")
    letters = sorted(options)
    if letters not in (list("ABCD"), list("ABCDE")) or not all(isinstance(v, str) for v in options.values()):
        raise TaskFormatError(f"{where}: 'options' should map A..D or A..E to text, found {letters}")
    if r["answer_idx"] not in letters:
        raise TaskFormatError(f"{where}: 'answer_idx' {r['answer_idx']!r} is not one of {letters}")
    answer = r.get("answer")
    if isinstance(answer, str) and answer.strip() != options[r["answer_idx"]].strip():
        raise TaskFormatError(f"{where}: 'answer' {answer!r} is not option {r['answer_idx']} "
                              f"({options[r['answer_idx']]!r}); the record contradicts itself")
    return Example(id=str(r.get("id", line_no)), question=r["question"], label=letters.index(r["answer_idx"]),
                   options=[options[k] for k in letters], subject=str(r.get("meta_info") or ""))


def read_medqa(path):
    """MedQA-USMLE in the layouts it is downloaded in, all JSON lines: the original release
    (question, options {A..D or A..E}, answer_idx; `answer` checked against it when present),
    GBaker/MedQA-USMLE-4-options-hf from the hub (sent1, ending0-3, label 0-3), and BigBio's
    source (options as [{key, value}]) and QA (choices + answer text) schemas."""
    return [_medqa_example(r, path, n) for n, r in iter_json_objects(path, TaskFormatError)]


PUBMEDQA_LABELS = ("yes", "no", "maybe")


def _pmid_list(path):
    text = read_text(path, TaskFormatError)
    try:
        value = json.loads(text)
        return [str(x) for x in value]  # a JSON list, or the keys of test_ground_truth.json
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]


def _pubmedqa_record(r, where, default_id):
    """(id, question, contexts, decision) of one record in any of the published layouts."""
    if not isinstance(r, dict):
        raise TaskFormatError(f"{where}: expected a JSON object")
    question = r.get("QUESTION", r.get("question"))
    contexts = r.get("CONTEXTS", r.get("context"))
    if isinstance(contexts, dict):  # qiaojin/PubMedQA on the hub: context {contexts, labels, meshes}
        contexts = contexts.get("contexts")
    if isinstance(contexts, str):   # BigBio's QA schema: one string
        contexts = [contexts]
    decision = r.get("final_decision", r.get("answer"))
    if isinstance(decision, list) and len(decision) == 1:
        decision = decision[0]
    if not isinstance(question, str):
        raise TaskFormatError(f"{where}: missing 'QUESTION' (or 'question')")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise TaskFormatError(f"{where}: 'CONTEXTS' (or 'context') should be a list of strings")
    if decision not in PUBMEDQA_LABELS:
        raise TaskFormatError(f"{where}: 'final_decision' should be yes/no/maybe, found {decision!r}")
    pmid = next((r[k] for k in ("pubid", "PUBMED_ID", "pmid", "document_id", "id") if r.get(k) is not None), default_id)
    return str(pmid), question, contexts, decision


def read_pubmedqa(path, split_file=None, split="test"):
    """PubMedQA as released (ori_pqal.json: one object keyed by PMID) or as the Hugging Face hub
    exports it (JSON lines: qiaojin/PubMedQA pqa_labeled, BigBio's source and QA schemas). With
    `split_file` (the official test PMIDs, one per line or JSON), `split` "test" keeps those and
    "train" the others."""
    kind, data = _read_json_or_lines(path)
    if kind == "json" and isinstance(data, dict) and not {"QUESTION", "question"} & set(data):
        records = [(f"{path}: record {pmid}", r, pmid) for pmid, r in data.items()]
    elif kind == "json" and isinstance(data, (dict, list)):
        data = data if isinstance(data, list) else [data]
        records = [(f"{path}: record {i}", r, str(i)) for i, r in enumerate(data)]
    elif kind == "lines":
        records = [(f"{path}:{n}", r, str(n)) for n, r in data]
    else:
        raise TaskFormatError(f"{path}: expected an object keyed by PMID (ori_pqal.json) or JSON lines (hub export)")
    parsed = [_pubmedqa_record(r, where, default) for where, r, default in records]
    keep = None
    if split_file:
        pmids, ids = set(_pmid_list(split_file)), {p[0] for p in parsed}
        unknown = sorted(pmids - ids)
        if unknown:
            raise TaskFormatError(f"{split_file}: PMID {unknown[0]} is not in {path}")
        keep = pmids if split == "test" else ids - pmids
    return [Example(id=pmid, question=q, context="\n".join(ctx), label=PUBMEDQA_LABELS.index(d),
                    labels=PUBMEDQA_LABELS, pmids=(pmid,) if pmid.isdigit() else ())
            for pmid, q, ctx, d in parsed if keep is None or pmid in keep]


BIOASQ_LABELS = ("yes", "no")
_PUBMED_URL = re.compile(r"pubmed/(\d+)\s*$")  # BioASQ cites http://www.ncbi.nlm.nih.gov/pubmed/<PMID>


def read_bioasq(path):
    """BioASQ: {"questions": [{body, snippets[{text}], exact_answer, type}]}; the yes/no ones."""
    kind, data = _read_json_or_lines(path)
    if kind == "lines":
        raise TaskFormatError(f"{path}: JSON lines, but a BioASQ file is one JSON object {{\"questions\": [...]}} "
                              f"(the training*b.json of the release)")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise TaskFormatError(f"{path}: expected {{\"questions\": [...]}}")
    out = []
    for i, q in enumerate(data["questions"]):
        where = f"{path}: questions[{i}]"
        if not isinstance(q, dict) or not isinstance(q.get("body"), str):
            raise TaskFormatError(f"{where}: missing 'body'")
        if q.get("type", "yesno") != "yesno":
            continue
        answer = q.get("exact_answer")
        answer = answer.strip().lower() if isinstance(answer, str) else answer
        if answer not in BIOASQ_LABELS:
            raise TaskFormatError(f"{where}: 'exact_answer' should be yes or no, found {q.get('exact_answer')!r}")
        snippets = q.get("snippets", [])
        if not isinstance(snippets, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                                     for s in snippets):
            raise TaskFormatError(f"{where}: 'snippets' should be a list of {{\"text\": ...}}")
        urls = [u for u in q.get("documents", []) if isinstance(u, str)] + \
            [s["document"] for s in snippets if isinstance(s.get("document"), str)]
        pmids = tuple(dict.fromkeys(m.group(1) for u in urls if (m := _PUBMED_URL.search(u))))
        out.append(Example(id=str(q.get("id", i)), question=q["body"], context=" ".join(s["text"] for s in snippets),
                           label=BIOASQ_LABELS.index(answer), labels=BIOASQ_LABELS, pmids=pmids))
    return out


MMLU_MEDICAL = ("medical_genetics", "anatomy", "clinical_knowledge", "college_medicine", "college_biology",
                "professional_medicine")


MMLU_HEADER = ("question", "a", "b", "c", "d", "answer")


def read_mmlu(path, subject=None):
    """MMLU as released (headerless CSV rows: question, A, B, C, D, answer letter), the same CSV
    with a header row, or the Hugging Face hub's cais/mmlu exported as JSON lines (question,
    subject, choices [4], answer 0-3). The subject defaults to the record's, else the file name
    without its split suffix (medical_genetics_test.csv -> medical_genetics)."""
    if subject is None:
        name = os.path.basename(path).rsplit(".", 1)[0]
        for suffix in ("_test", "_dev", "_val"):
            name = name.removesuffix(suffix)
        subject = name
    text = read_text(path, TaskFormatError)
    if text.lstrip().startswith("{"):
        return _read_mmlu_lines(path, subject)
    out = []
    for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if not row:
            continue
        if line_no == 1 and len(row) == 6 and tuple(c.strip().lower() for c in row) == MMLU_HEADER:
            continue
        if len(row) != 6:
            raise TaskFormatError(f"{path}:{line_no}: expected 6 columns (question, A, B, C, D, answer), "
                                  f"found {len(row)}")
        if row[5].strip() not in "ABCD" or len(row[5].strip()) != 1:
            raise TaskFormatError(f"{path}:{line_no}: answer should be A-D, found {row[5]!r}")
        out.append(Example(id=f"{subject}-{line_no}", question=row[0], options=row[1:5],
                           label="ABCD".index(row[5].strip()), subject=subject))
    return out


def _read_mmlu_lines(path, subject):
    out = []
    for line_no, r in iter_json_objects(path, TaskFormatError):
        _need(r, ("question",), path, line_no)
        choices, answer = r.get("choices"), r.get("answer")
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise TaskFormatError(f"{path}:{line_no}: 'choices' should be a list of 4 strings")
        if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in "ABCD":
            label = "ABCD".index(answer.strip())
        elif _label_int(answer) and 0 <= answer <= 3:
            label = answer  # the hub's ClassLabel: 0-3 for A-D
        else:
            raise TaskFormatError(f"{path}:{line_no}: 'answer' should be 0-3 or A-D, found {answer!r}")
        subj = str(r.get("subject") or subject)
        out.append(Example(id=f"{subj}-{line_no}", question=r["question"], options=choices, label=label, subject=subj))
    return out


TASKS = {"medmcqa": read_medmcqa, "medqa": read_medqa, "pubmedqa": read_pubmedqa, "bioasq": read_bioasq,
         "mmlu": read_mmlu}


def read_task(task, path, split_file=None, split="test", cop_base=None, **kw):
    """The examples of `path`; `split_file` and `split` select PubMedQA's official test set or
    the rest (the other tasks ship their splits as separate files); `cop_base` is MedMCQA's
    --cop-base."""
    if task not in TASKS:
        raise TaskFormatError(f"unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task}: no such file {path}")
    if task == "pubmedqa":
        kw.update(split_file=split_file, split=split)
    if task == "medmcqa":
        kw.update(cop_base=cop_base)
    return TASKS[task](path, **kw)
