"""Biomedical QA task readers (files in each benchmark's published format) and zero-shot scoring."""
import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

from megatron_biomed.finetune import tasks as T
from megatron_biomed.finetune import zero_shot as Z


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MEDMCQA = [{"id": "q1", "question": "Which vitamin deficiency causes scurvy?", "opa": "Vitamin A",
            "opb": "Vitamin B12", "opc": "Vitamin C", "opd": "Vitamin D", "cop": 3, "choice_type": "single",
            "exp": "", "subject_name": "Biochemistry", "topic_name": None},
           {"id": "q2", "question": "The most common site of carcinoid tumour is", "opa": "Appendix",
            "opb": "Ileum", "opc": "Rectum", "opd": "Stomach", "cop": 1, "subject_name": "Pathology"}]


@pytest.fixture
def files(tmp_path):
    f = {"medmcqa": write_lines(tmp_path / "dev.json", MEDMCQA),
         "medqa": write_lines(tmp_path / "test.jsonl", [
             {"question": "A 23-year-old woman presents with fever. Which is the best next step?",
              "answer": "Blood cultures", "options": {"A": "Blood cultures", "B": "CT scan", "C": "Discharge",
                                                      "D": "Biopsy", "E": "MRI"},
              "meta_info": "step1", "answer_idx": "A"}]),
         "mmlu": tmp_path / "medical_genetics_test.csv"}
    f["mmlu"].write_text('"Which disorder is X-linked recessive?",Haemophilia A,Huntington disease,'
                         'Marfan syndrome,Achondroplasia,A\n"How many chromosomes, in total, does a human cell have?"'
                         ',23,46,44,48,B\n')
    f["pubmedqa"] = tmp_path / "ori_pqal.json"
    f["pubmedqa"].write_text(json.dumps({
        "21645374": {"QUESTION": "Do mitochondria play a role in remodelling lace plant leaves?",
                     "CONTEXTS": ["Programmed cell death (PCD) is...", "The following..."],
                     "LABELS": ["BACKGROUND", "RESULTS"], "final_decision": "yes"},
        "16418930": {"QUESTION": "Is aspirin harmful?", "CONTEXTS": ["We studied..."], "LABELS": ["METHODS"],
                     "final_decision": "maybe"},
        "10808977": {"QUESTION": "Does X cause Y?", "CONTEXTS": ["No."], "LABELS": ["RESULTS"],
                     "final_decision": "no"}}))
    f["pubmedqa_test"] = tmp_path / "test_ground_truth.json"
    f["pubmedqa_test"].write_text(json.dumps({"21645374": "yes", "10808977": "no"}))
    f["bioasq"] = tmp_path / "training11b.json"
    f["bioasq"].write_text(json.dumps({"questions": [
        {"id": "55031181e9bde69634000014", "type": "yesno", "body": "Is Hirschsprung disease a mendelian disorder?",
         "snippets": [{"text": "Hirschsprung disease is multifactorial."}, {"text": "RET is the major gene."}],
         "exact_answer": "no"},
        {"id": "x2", "type": "factoid", "body": "Which gene?", "snippets": [], "exact_answer": [["RET"]]},
        {"id": "x3", "type": "yesno", "body": "Is RET involved?", "snippets": [{"text": "yes"}],
         "exact_answer": "yes"}]}))
    return f


def test_readers_parse_the_published_formats(files):
    mc = T.read_task("medmcqa", str(files["medmcqa"]))
    assert [e.label for e in mc] == [2, 0] and mc[0].options[2] == "Vitamin C" and mc[0].subject == "Biochemistry"
    qa = T.read_task("medqa", str(files["medqa"]))
    assert qa[0].label == 0 and len(qa[0].options) == 5
    mm = T.read_task("mmlu", str(files["mmlu"]))
    assert [e.label for e in mm] == [0, 1] and mm[1].question.startswith("How many chromosomes, in total")
    assert mm[0].subject == "medical_genetics"
    test = T.read_task("pubmedqa", str(files["pubmedqa"]), split_file=str(files["pubmedqa_test"]))
    assert sorted((e.id, e.label) for e in test) == [("10808977", 1), ("21645374", 0)]
    train = T.read_task("pubmedqa", str(files["pubmedqa"]), split_file=str(files["pubmedqa_test"]), split="train")
    assert [(e.id, T.PUBMEDQA_LABELS[e.label]) for e in train] == [("16418930", "maybe")]
    assert test[0].context.startswith("Programmed cell death") or test[1].context.startswith("Programmed")
    bio = T.read_task("bioasq", str(files["bioasq"]))
    assert [(e.id, e.label) for e in bio] == [("55031181e9bde69634000014", 1), ("x3", 0)]  # factoid skipped
    assert "multifactorial. RET" in bio[0].context


@pytest.mark.parametrize("task,content,needle", [
    ("medmcqa", '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}\n{"question": "q"}\n',
     ":2: missing field 'opa'"),
    ("medmcqa", '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 5}\n',
     ":1: 'cop' should be 1-4, found 5"),
    ("medmcqa", '{"question": "q",\n', ":1: not JSON"),
    ("medqa", '{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}\n',
     ":1: 'options' should map A..D or A..E"),
    ("medqa", '{"question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "E"}\n',
     ":1: 'answer_idx' 'E' is not one of"),
    ("mmlu", "q,a,b,c,d,A\nq,a,b,c,d\n", ":2: expected 6 columns"),
    ("mmlu", "q,a,b,c,d,F\n", ":1: answer should be A-D"),
    ("pubmedqa", '{"1": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}}',
     "record 1: 'final_decision' should be yes/no/maybe"),
    ("bioasq", '{"questions": [{"type": "yesno", "body": "b", "snippets": [], "exact_answer": "maybe"}]}',
     "questions[0]: 'exact_answer' should be yes or no"),
])
def test_bad_records_name_file_and_line(tmp_path, task, content, needle):
    path = tmp_path / ("data.csv" if task == "mmlu" else "data.json")
    path.write_text(content)
    with pytest.raises(T.TaskFormatError, match=None) as e:
        T.read_task(task, str(path))
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(T.TaskFormatError, match="unknown task 'medmcq'; known: bioasq, medmcqa, medqa, mmlu, pubmedqa"):
        T.read_task("medmcq", str(tmp_path / "x"))


def test_scores_equal_hand_computed_softmax_over_option_loglikelihoods(files, trained_tokenizer):
    from tokenizers import Tokenizer

    from megatron_biomed.config import preset
    from megatron_biomed.model.gpt import GPT
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(trained_tokenizer / "tokenizer.json"))
    model = GPT(preset("tiny", vocab_size=tok.get_vocab_size(), init_method_std=0.2)).eval()
    example = T.read_task("medmcqa", str(files["medmcqa"]))[0]
    lls, norms = Z.score_example(model, tok, example)
    by_hand = []
    for option in example.options:
        ctx = tok.encode("Question: " + example.question + "\nAnswer:").ids
        full = tok.encode("Question: " + example.question + "\nAnswer: " + option).ids
        assert full[:len(ctx)] == ctx
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0, :, :tok.get_vocab_size()], -1)
        by_hand.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
    assert lls == pytest.approx(by_hand, abs=1e-5)
    assert norms == pytest.approx([ll / len((" " + o).encode()) for ll, o in zip(by_hand, example.options)])
    predictions, results = Z.evaluate(model, tok, [example])
    probs = torch.tensor(by_hand).softmax(0)
    assert predictions[0]["probs"] == pytest.approx(probs.tolist(), abs=1e-6)
    assert predictions[0]["pred"] == int(probs.argmax())


def test_evaluate_tool_writes_predictions_and_metrics(files, tmp_path, trained_tokenizer):
    from megatron_biomed.finetune.evaluate_cli import main
    from test_convert import random_hf_gpt2
    random_hf_gpt2(tmp_path / "hf", vocab=1000, tokenizer=trained_tokenizer)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--load", str(tmp_path / "hf"), "--task", "medmcqa", "--data", str(files["medmcqa"]),
                     "--num-fewshot", "1", "--output", str(tmp_path / "pred.jsonl"),
                     "--metrics-file", str(tmp_path / "metrics.json")])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2"] and all(len(r["probs"]) == 4 for r in rows)
    acc = sum(r["pred"] == r["label"] for r in rows) / 2
    assert metrics["acc"]["accuracy"] == acc and set(metrics["acc"]["per_subject"]) == {"Biochemistry", "Pathology"}
    assert "| medmcqa | 2 | 1 |" in out.getvalue()


def test_macro_f1():
    assert Z.macro_f1([0, 0, 1, 2], [0, 1, 1, 2], 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_truncation_cuts_the_context_from_the_left_never_the_question_or_option(trained_tokenizer):
    from tokenizers import Tokenizer

    from megatron_biomed.finetune.classifier import encode_example
    tok = Tokenizer.from_file(str(trained_tokenizer / "tokenizer.json"))
    long_context = " ".join(f"sentence {i} of the abstract." for i in range(200))
    ex = T.Example(id="1", question="Does it work?", label=0, context=long_context, labels=T.PUBMEDQA_LABELS)
    (seq,) = encode_example(tok, ex, 64)
    question = tok.encode("Question: Does it work?\nAnswer:").ids
    assert len(seq) == 64 and seq[-len(question):] == question
    assert tok.decode(seq[:-len(question)]).endswith("sentence 199 of the abstract.\n")
    mc = T.Example(id="2", question="word " * 100, label=0, options=["a", "b"])
    with pytest.raises(ValueError, match="example 2: question and answer take .* more than --max-length 64"):
        encode_example(tok, mc, 64)
