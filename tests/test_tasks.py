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
           {"id": "q2", "question": "The most common site of carcinoid tumour is", "opa": "Ileum",
            "opb": "Rectum", "opc": "Stomach", "opd": "Appendix", "cop": 4, "subject_name": "Pathology"}]


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
    assert [e.label for e in mc] == [2, 3] and mc[0].options[2] == "Vitamin C" and mc[0].subject == "Biochemistry"
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
     ":1: 'cop' should be an option number (1-4, or 0-3 in hub exports), found 5"),
    ("medmcqa", '{"question": "q",\n', ":1: not a JSON object on this line"),
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
    lls = Z.score_example(model, tok, example, Z.Prompts("medmcqa"))
    by_hand = []
    for option in example.options:
        ctx = tok.encode("Question: " + example.question + "\nAnswer:").ids
        full = tok.encode("Question: " + example.question + "\nAnswer: " + option).ids
        assert full[:len(ctx)] == ctx
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0, :, :tok.get_vocab_size()], -1)
        by_hand.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
    assert lls == pytest.approx(by_hand, abs=1e-5)
    predictions, results = Z.evaluate(model, tok, [example], Z.Prompts("medmcqa"))
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
    assert "| medmcqa | 2 | 1 |" in out.getvalue() and "| acc | acc_norm | acc_bytes |" in out.getvalue()


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


# ---------------------------------------------------------------------------------------------
# lm-eval-harness fidelity. The expected strings and formulas are copied from lm-eval-harness
# 0.4.13 (lm_eval/tasks/{pubmedqa,medmcqa,medqa,mmlu}, lm_eval/api/task.py process_results,
# lm_eval/api/model.py _encode_pair); README records the side-by-side run against lm-eval itself.
# ---------------------------------------------------------------------------------------------
def test_lm_eval_prompts_and_targets_character_for_character():
    mc = T.Example(id="1", question="Which vitamin?", label=2, options=["Vit A", "Vit B12", "Vit C", "Vit D"],
                   subject="clinical_knowledge")
    shot = T.Example(id="2", question="Best drug?", label=1, options=["a", "b", "c", "d"], subject="clinical_knowledge")
    p = Z.Prompts("medmcqa", "lm-eval")
    assert p.context(mc) == "Question: Which vitamin?\nChoices:\nA. Vit A\nB. Vit B12\nC. Vit C\nD. Vit D\nAnswer:"
    assert p.answers(mc) == ["A", "B", "C", "D"]
    assert Z.Prompts("medqa", "lm-eval").context(mc) == \
        "Question: Which vitamin?\nA. Vit A\nB. Vit B12\nC. Vit C\nD. Vit D\nAnswer:"
    mmlu = Z.Prompts("mmlu", "lm-eval")
    mc.question = "  Which vitamin? \n"  # lm-eval strips MMLU questions (and only those)
    assert mmlu.context(mc, [shot]) == (
        "The following are multiple choice questions (with answers) about clinical knowledge.\n\n"
        "Best drug?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
        "Which vitamin?\nA. Vit A\nB. Vit B12\nC. Vit C\nD. Vit D\nAnswer:")
    cls = T.Example(id="3", question="Does it?", label=0, context="First.\nSecond.", labels=T.PUBMEDQA_LABELS)
    for style in Z.PROMPT_STYLES:
        pq = Z.Prompts("pubmedqa", style)
        assert pq.context(cls) == "Abstract: First.\nSecond.\nQuestion: Does it?\nAnswer:"
        assert pq.answers(cls) == ["yes", "no", "maybe"]
    assert Z.Prompts("medmcqa").context(mc) == "Question:   Which vitamin? \n\nAnswer:"  # ours: answers scored as text
    five = T.Example(id="4", question="q", label=0, options=list("abcde"))
    with pytest.raises(Exception, match="lm-eval's medqa_4options has 4 options; example 4 has 5"):
        Z.Prompts("medqa", "lm-eval").answers(five)
    with pytest.raises(Exception, match="lm-eval-harness has no BioASQ task"):
        Z.Prompts("bioasq", "lm-eval")


def test_acc_acc_norm_acc_bytes_are_lm_evals_formulas(monkeypatch):
    """acc: argmax ll; acc_norm: ll / characters of the answer; acc_bytes: ll / its UTF-8 bytes
    (neither counts the leading space); ties to the first. Chosen so all three differ."""
    ex = T.Example(id="1", question="q", label=1, options=["ab", "µµµ", "x"])
    lls = iter([-2.0, -3.3, -1.2])
    monkeypatch.setattr(Z, "continuation_logprob", lambda model, ctx, cont: next(lls))

    class Tok:
        def encode(self, text):
            return type("E", (), {"ids": list(text.encode())})()
    p = Z.predict(None, Tok(), ex, Z.Prompts("medmcqa"))
    # acc: max(-2.0, -3.3, -1.2) -> 2; acc_norm: (-1.0, -1.1, -1.2) -> 0; acc_bytes: (-1.0, -0.55, -1.2) -> 1
    assert (p["pred"], p["pred_norm"], p["pred_bytes"]) == (2, 0, 1)
    s = Z.summary([ex], [p])
    assert (s["acc"]["accuracy"], s["acc_norm"]["accuracy"], s["acc_bytes"]["accuracy"]) == (0.0, 0.0, 1.0)
    assert Z.argmax([1.0, 3.0, 3.0]) == 1


def test_encode_pair_is_lm_evals(trained_tokenizer):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(trained_tokenizer / "tokenizer.json"))
    # trailing whitespace of the context moves to the continuation, then whole-string split
    ctx, cont = Z.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:").ids and ctx + cont == tok.encode("Answer: yes").ids


# ---------------------------------------------------------------------------------------------
# The layouts people download: Hugging Face hub exports beside the original releases.
# ---------------------------------------------------------------------------------------------
def medmcqa_rows(cops):
    return [dict(MEDMCQA[0], id=f"h{i}", cop=c) for i, c in enumerate(cops)]


def test_medmcqa_numbering_read_from_the_file_or_refused(tmp_path):
    hub = write_lines(tmp_path / "hub.jsonl", medmcqa_rows([0, 2, 3, 1]))       # datasets' to_json: 0-3
    assert [e.label for e in T.read_task("medmcqa", str(hub))] == [0, 2, 3, 1]
    release = write_lines(tmp_path / "dev.json", medmcqa_rows([4, 2, 3, 1]))    # the release: 1-4
    assert [e.label for e in T.read_task("medmcqa", str(release))] == [3, 1, 2, 0]
    unclear = write_lines(tmp_path / "few.json", medmcqa_rows([1, 2, 3, 3]))
    with pytest.raises(T.TaskFormatError, match=r"every 'cop' is 1-3, so the file does not show whether .* pass "
                                                r"--cop-base 1 or --cop-base 0"):
        T.read_task("medmcqa", str(unclear))
    assert [e.label for e in T.read_task("medmcqa", str(unclear), cop_base=0)] == [1, 2, 3, 3]
    assert [e.label for e in T.read_task("medmcqa", str(unclear), cop_base=1)] == [0, 1, 2, 2]
    mixed = write_lines(tmp_path / "mixed.json", medmcqa_rows([1, 0, 4]))
    with pytest.raises(T.TaskFormatError, match="'cop' is 0 on line 2 and 4 on line 3"):
        T.read_task("medmcqa", str(mixed))
    with pytest.raises(T.TaskFormatError, match=r"'cop' 4 is out of range for --cop-base 0 \(0-3\)"):
        T.read_task("medmcqa", str(release), cop_base=0)
    test_split = write_lines(tmp_path / "test.jsonl", medmcqa_rows([-1]))
    with pytest.raises(T.TaskFormatError, match=":1: 'cop' is -1, an unlabelled question"):
        T.read_task("medmcqa", str(test_split))


def test_evaluate_refuses_unclear_medmcqa_numbering_naming_the_flag(tmp_path):
    from conftest import run_tool
    unclear = write_lines(tmp_path / "few.json", medmcqa_rows([1, 2]))
    r = run_tool("evaluate", "--load", tmp_path / "none", "--task", "medmcqa", "--data", unclear, check=1)
    assert r.stderr.startswith(f"error: {unclear}: every 'cop' is 1-3") and "--cop-base" in r.stderr
    r = run_tool("evaluate", "--load", tmp_path / "none", "--task", "bioasq", "--data", unclear,
                 "--prompt-style", "lm-eval", check=2)
    assert "lm-eval-harness has no BioASQ task" in r.stderr


def test_medqa_hub_layouts(tmp_path):
    q = "A 23-year-old woman presents with fever."
    gbaker = write_lines(tmp_path / "gbaker.jsonl", [{"id": "x", "sent1": q, "sent2": "", "ending0": "a", "ending1": "b",
                                                      "ending2": "c", "ending3": "d", "label": 2}])
    bigbio_src = write_lines(tmp_path / "src.jsonl", [{"meta_info": "step1", "question": q, "answer_idx": "B",
                                                       "answer": "b", "options": [{"key": k, "value": v} for k, v in
                                                                                  zip("ABCD", "abcd")]}])
    bigbio_qa = write_lines(tmp_path / "qa.jsonl", [{"id": "1", "question": q, "choices": list("abcd"), "answer": ["d"],
                                                     "type": "multiple_choice", "context": ""}])
    for path, label in ((gbaker, 2), (bigbio_src, 1), (bigbio_qa, 3)):
        (e,) = T.read_task("medqa", str(path))
        assert (e.question, e.options, e.label) == (q, list("abcd"), label), path
    wrong = write_lines(tmp_path / "wrong.jsonl", [{"question": q, "answer_idx": "A", "answer": "b",
                                                    "options": dict(zip("ABCD", "abcd"))}])
    with pytest.raises(T.TaskFormatError, match=r"wrong.jsonl:1: 'answer' 'b' is not option A \('a'\)"):
        T.read_task("medqa", str(wrong))


def test_pubmedqa_hub_json_lines_and_split(tmp_path, files):
    qiaojin = write_lines(tmp_path / "pqa.jsonl", [
        {"pubid": 21645374, "question": "Do mitochondria play a role?", "context": {
            "contexts": ["Programmed cell death", "The following"], "labels": ["A", "B"], "meshes": []},
         "long_answer": "x", "final_decision": "yes"},
        {"pubid": 10808977, "question": "Does X cause Y?", "context": {"contexts": ["No."]}, "final_decision": "no"}])
    got = T.read_task("pubmedqa", str(qiaojin), split_file=str(files["pubmedqa_test"]))
    assert [(e.id, e.label, e.context) for e in got] == [("21645374", 0, "Programmed cell death\nThe following"),
                                                          ("10808977", 1, "No.")]
    bigbio = write_lines(tmp_path / "bigbio.jsonl", [{"QUESTION": "q?", "CONTEXTS": ["c1", "c2"], "LABELS": [],
                                                      "final_decision": "maybe", "LONG_ANSWER": ""}])
    assert [(e.label, e.context) for e in T.read_task("pubmedqa", str(bigbio))] == [(2, "c1\nc2")]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(qiaojin.read_text() + '{"pubid": 1, "question": \n')
    with pytest.raises(T.TaskFormatError, match=r"broken.jsonl:3: not a JSON object on this line .*JSON lines"):
        T.read_task("pubmedqa", str(broken))


def test_mmlu_header_bom_and_hub_json_lines(tmp_path):
    csv_path = tmp_path / "anatomy_test.csv"
    csv_path.write_bytes("\ufeffquestion,A,B,C,D,answer\nWhich bone?,Femur,Tibia,Ulna,Radius,C\n".encode())
    (e,) = T.read_task("mmlu", str(csv_path))
    assert (e.question, e.label, e.subject) == ("Which bone?", 2, "anatomy")
    headerless = tmp_path / "anatomy_dev.csv"
    headerless.write_bytes("\ufeffWhich bone?,Femur,Tibia,Ulna,Radius,C\n".encode())
    assert T.read_task("mmlu", str(headerless))[0].question == "Which bone?"  # no BOM left in the question
    hub = write_lines(tmp_path / "mmlu.jsonl", [{"question": "Which bone?", "subject": "anatomy",
                                                 "choices": ["Femur", "Tibia", "Ulna", "Radius"], "answer": 2}])
    (h,) = T.read_task("mmlu", str(hub))
    assert (h.label, h.options[h.label], h.subject) == (2, "Ulna", "anatomy")
    bom_json = tmp_path / "dev.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + (json.dumps(dict(MEDMCQA[0], cop=4)) + "\n").encode())
    assert T.read_task("medmcqa", str(bom_json))[0].label == 3


def test_evaluate_names_the_file_and_line_of_a_byte_that_is_not_utf8(tmp_path):
    from conftest import run_tool
    bad = tmp_path / "medmcqa.jsonl"
    good = json.dumps({"question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1})
    bad.write_bytes((good + "\n").encode() + b'{"question": "caf\xe9?", "opa": "a", "opb": "b", "opc": "c", '
                    b'"opd": "d", "cop": 1}\n')
    r = run_tool("evaluate", "--load", tmp_path / "none", "--task", "medmcqa", "--data", bad, check=1)
    assert r.stderr.strip() == f"error: {bad}:2: not UTF-8 (byte 0xe9); save the file as UTF-8", r.stderr
    mmlu = tmp_path / "anatomy_test.csv"
    mmlu.write_bytes(b"q,a,b,c,d,A\nq2\xff,a,b,c,d,B\n")
    r = run_tool("evaluate", "--load", tmp_path / "none", "--task", "mmlu", "--data", mmlu, check=1)
    assert r.stderr.strip() == f"error: {mmlu}:2: not UTF-8 (byte 0xff); save the file as UTF-8", r.stderr
