"""Readers for the biomedical QA benchmarks, in the files their authors publish (the user points
at local copies; nothing is downloaded).

Every reader returns a list of `Example`s. Multiple-choice tasks (MedMCQA, MedQA, MMLU) fill
`options`; classification tasks (PubMedQA yes/no/maybe, BioASQ yes/no) fill `context` and use
`labels` as the class names. A malformed record raises TaskFormatError naming file and line.
"""
import csv
import json
import os
from dataclasses import dataclass, field

from megatron_biomed.utils import iter_json_objects
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


def read_medmcqa(path):
    """MedMCQA train.json/dev.json: JSON lines with question, opa..opd, cop (1-4), subject_name."""
    out = []
    for line_no, r in iter_json_objects(path, TaskFormatError):
        _need(r, ("question", "opa", "opb", "opc", "opd"), path, line_no)
        cop = r.get("cop")
        if not isinstance(cop, int) or not 1 <= cop <= 4:
            raise TaskFormatError(f"{path}:{line_no}: 'cop' should be 1-4, found {cop!r}")
        out.append(Example(id=str(r.get("id", line_no)), question=r["question"], label=cop - 1,
                           options=[r[k] for k in ("opa", "opb", "opc", "opd")],
                           subject=str(r.get("subject_name") or "")))
    return out


def read_medqa(path):
    """MedQA-USMLE: JSON lines with question, options {A..E or A..D}, answer_idx."""
    out = []
    for line_no, r in iter_json_objects(path, TaskFormatError):
        _need(r, ("question", "answer_idx"), path, line_no)
        _need(r, ("options",), path, line_no, dict)
        letters = sorted(r["options"])
        if letters not in (list("ABCD"), list("ABCDE")) or not all(isinstance(v, str) for v in r["options"].values()):
            raise TaskFormatError(f"{path}:{line_no}: 'options' should map A..D or A..E to text, found {letters}")
        if r["answer_idx"] not in letters:
            raise TaskFormatError(f"{path}:{line_no}: 'answer_idx' {r['answer_idx']!r} is not one of {letters}")
        out.append(Example(id=str(r.get("id", line_no)), question=r["question"],
                           label=letters.index(r["answer_idx"]), options=[r["options"][k] for k in letters],
                           subject=str(r.get("meta_info") or "")))
    return out


PUBMEDQA_LABELS = ("yes", "no", "maybe")


def _pmid_list(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        value = json.loads(text)
        return [str(x) for x in value]  # a JSON list, or the keys of test_ground_truth.json
    except ValueError:
        return [line.strip() for line in text.splitlines() if line.strip()]


def read_pubmedqa(path, split_file=None, split="test"):
    """PubMedQA ori_pqal.json (PMID -> QUESTION, CONTEXTS, LABELS, final_decision). With
    `split_file` (the official test PMIDs, one per line or JSON), `split` "test" keeps those and
    "train" the others."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise TaskFormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise TaskFormatError(f"{path}: expected an object keyed by PMID")
    keep = None
    if split_file:
        pmids = set(_pmid_list(split_file))
        unknown = sorted(pmids - set(data))
        if unknown:
            raise TaskFormatError(f"{split_file}: PMID {unknown[0]} is not in {path}")
        keep = pmids if split == "test" else set(data) - pmids
    out = []
    for pmid, r in data.items():
        if keep is not None and pmid not in keep:
            continue
        where = f"{path}: record {pmid}"
        if not isinstance(r, dict) or not isinstance(r.get("QUESTION"), str):
            raise TaskFormatError(f"{where}: missing 'QUESTION'")
        if not isinstance(r.get("CONTEXTS"), list) or not all(isinstance(c, str) for c in r["CONTEXTS"]):
            raise TaskFormatError(f"{where}: 'CONTEXTS' should be a list of strings")
        if r.get("final_decision") not in PUBMEDQA_LABELS:
            raise TaskFormatError(f"{where}: 'final_decision' should be yes/no/maybe, found {r.get('final_decision')!r}")
        out.append(Example(id=pmid, question=r["QUESTION"], context="\n".join(r["CONTEXTS"]),
                           label=PUBMEDQA_LABELS.index(r["final_decision"]), labels=PUBMEDQA_LABELS))
    return out


BIOASQ_LABELS = ("yes", "no")


def read_bioasq(path):
    """BioASQ: {"questions": [{body, snippets[{text}], exact_answer, type}]}; the yes/no ones."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise TaskFormatError(f"{path}: not JSON ({e})") from None
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
        out.append(Example(id=str(q.get("id", i)), question=q["body"], context=" ".join(s["text"] for s in snippets),
                           label=BIOASQ_LABELS.index(answer), labels=BIOASQ_LABELS))
    return out


MMLU_MEDICAL = ("medical_genetics", "anatomy", "clinical_knowledge", "college_medicine", "college_biology",
                "professional_medicine")


def read_mmlu(path, subject=None):
    """MMLU headerless CSV rows: question, A, B, C, D, answer letter. The subject defaults to
    the file name without its split suffix (medical_genetics_test.csv -> medical_genetics)."""
    if subject is None:
        name = os.path.basename(path).rsplit(".", 1)[0]
        for suffix in ("_test", "_dev", "_val"):
            name = name.removesuffix(suffix)
        subject = name
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6:
                raise TaskFormatError(f"{path}:{line_no}: expected 6 columns (question, A, B, C, D, answer), "
                                      f"found {len(row)}")
            if row[5].strip() not in "ABCD" or len(row[5].strip()) != 1:
                raise TaskFormatError(f"{path}:{line_no}: answer should be A-D, found {row[5]!r}")
            out.append(Example(id=f"{subject}-{line_no}", question=row[0], options=row[1:5],
                               label="ABCD".index(row[5].strip()), subject=subject))
    return out


TASKS = {"medmcqa": read_medmcqa, "medqa": read_medqa, "pubmedqa": read_pubmedqa, "bioasq": read_bioasq,
         "mmlu": read_mmlu}


def read_task(task, path, split_file=None, split="test", **kw):
    """The examples of `path`; `split_file` and `split` select PubMedQA's official test set or
    the rest (the other tasks ship their splits as separate files)."""
    if task not in TASKS:
        raise TaskFormatError(f"unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task}: no such file {path}")
    if task == "pubmedqa":
        kw.update(split_file=split_file, split=split)
    return TASKS[task](path, **kw)
