"""Generative fine-tuning (tools/finetune.py --task patient_qa): the input formats, MedQuAD's
XML, loss on answer tokens only, a synthetic task learned and released to Hugging Face, and
the same run under tp=2 and dp=2 equal to one process."""
import json
import os

import pytest
import torch

from conftest import read_jsonl, run_tool, write_jsonl
from test_finetune import launch_finetune

from megatron_biomed.data import synthetic
from megatron_biomed.data.tokenizer import load_tokenizer
from megatron_biomed.finetune import patient_qa as PQ
from megatron_biomed.finetune.tasks import TaskFormatError
from megatron_biomed.parallel.tensor_parallel import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(trained_tokenizer):
    return load_tokenizer("GPT2BPETokenizer", str(trained_tokenizer / "vocab.json"), str(trained_tokenizer / "merges.txt"))


def trained_text(tok, example, eos_id):
    ids, labels = PQ.encode(tok, example, 10_000, eos_id)
    assert len(ids) == len(labels)
    return [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]


def test_every_json_format_and_what_carries_loss(tok, tmp_path):
    eos = tok.token_to_id("<|endoftext|>")
    qa = PQ.read_patient_qa(write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "Is asthma inherited?", "answer": "Sometimes.", "topic": "lungs"}]))[0][0]
    assert qa.prompt == "Question: Is asthma inherited?\nAnswer:" and qa.reference == "Sometimes."
    assert trained_text(tok, qa, eos) == tok.encode(" Sometimes.").ids + [eos]
    templated = PQ.read_patient_qa(tmp_path / "qa.jsonl", "Topic: {topic}\\nQ: {question}\\nA:")[0][0]
    assert templated.prompt == "Topic: lungs\nQ: Is asthma inherited?\nA:"

    pc = PQ.read_patient_qa(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: why?\nA: ", "completion": "Because."}]))
    assert pc[1]["format"] == "prompt/completion" and pc[0][0].prompt == "Q: why?\nA: "  # as written, no space added
    assert trained_text(tok, pc[0][0], eos) == tok.encode("Because.").ids + [eos]

    alpaca = PQ.read_patient_qa(write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Explain the result.", "input": "HbA1c 9%", "output": "It is high."},
        {"instruction": "Define sepsis.", "input": "", "output": "An infection response."}]))[0]
    assert alpaca[0].prompt == "Question: Explain the result.\n\nHbA1c 9%\nAnswer:"
    assert alpaca[1].prompt == "Question: Define sepsis.\nAnswer:"

    chat = PQ.read_patient_qa(write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Answer plainly."},
        {"role": "user", "content": "What is HbA1c?"}, {"role": "assistant", "content": "A blood test."},
        {"role": "user", "content": "Is 9% high?"}, {"role": "assistant", "content": "Yes."}]}]))[0][0]
    assert chat.prompt == ("Answer plainly.\n\nQuestion: What is HbA1c?\nAnswer: A blood test."
                           "Question: Is 9% high?\nAnswer:")
    assert chat.reference == "Yes."
    # both assistant turns, each closed by <|endoftext|>, and nothing else
    assert trained_text(tok, chat, eos) == tok.encode(" A blood test.").ids + [eos] + tok.encode(" Yes.").ids + [eos]
    # text that spells the end-of-text marker stays text: no input can end an answer early
    forged = PQ.read_patient_qa(write_jsonl(tmp_path / "forged.jsonl", [
        {"question": "q", "answer": "a <|endoftext|> b"}]))[0][0]
    assert trained_text(tok, forged, eos).count(eos) == 1


def test_prompt_tokens_carry_no_loss_gradient(tok, tmp_path):
    """The answer loss's gradient with respect to the logits is exactly zero at every prompt
    (and padding) position and non-zero at every answer position: prompt tokens are only
    context."""
    from megatron_biomed.config import preset
    from megatron_biomed.model.gpt import GPT
    from megatron_biomed.model.loss import cross_entropy
    eos = tok.token_to_id("<|endoftext|>")
    rows = synthetic.patient_qa_like(3, 0)
    examples = PQ.read_patient_qa(write_jsonl(tmp_path / "qa.jsonl", rows))[0]
    encoded = [PQ.encode(tok, e, 64, eos) for e in examples]
    tokens, targets = PQ.collate(encoded, eos)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.get_vocab_size(), seq_length=128))
    logits = model(tokens).detach().requires_grad_()
    cross_entropy(logits, targets, model.config.vocab_size).sum().backward()
    per_position = logits.grad.abs().sum(-1)
    for row, (ids, labels) in enumerate(encoded):
        prompt_len = sum(1 for label in labels if label == IGNORE_INDEX)
        # position t predicts token t + 1: the answer's first token is predicted from the prompt's last
        assert (per_position[row, :prompt_len - 1] == 0).all()
        assert (per_position[row, prompt_len - 1:len(ids) - 1] > 0).all()
        assert (per_position[row, len(ids) - 1:] == 0).all()  # padding
        assert targets[row, prompt_len - 1:len(ids) - 1].tolist() == ids[prompt_len:]
    assert PQ.answer_tokens(encoded) == int((targets != IGNORE_INDEX).sum())


MEDQUAD_DOC = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="{id}" source="GHR" url="https://ghr.nlm.nih.gov/condition/{id}">
<Focus>{focus}</Focus>
<FocusAnnotations>
\t<UMLS><CUIs><CUI>C0002395</CUI></CUIs><SemanticGroup>Disorders</SemanticGroup></UMLS>
</FocusAnnotations>
<QAPairs>
{pairs}</QAPairs>
</Document>
"""


def medquad_pair(pid, doc, qtype, question, answer):
    return (f'\t<QAPair pid="{pid}">\n\t\t<Question qid="{doc}-{pid}" qtype="{qtype}">{question}</Question>\n'
            f"\t\t<Answer>{answer}</Answer>\n\t</QAPair>\n")


def write_medquad(root):
    (root / "3_GHR_QA").mkdir(parents=True)
    (root / "10_MPlus_ADAM_QA").mkdir()
    (root / "3_GHR_QA" / "0000001.xml").write_text(MEDQUAD_DOC.format(
        id="0000001", focus="Cystic fibrosis", pairs=medquad_pair(
            1, "0000001", "information", "What is (are) cystic fibrosis ?",
            "Cystic fibrosis is an inherited disease &amp; affects the lungs &lt;mostly&gt;.\n"
            "                    It is caused by CFTR variants &#8211; see &#x201C;genetics&#x201D;.") +
        medquad_pair(2, "0000001", "inheritance", "Is cystic fibrosis inherited ?",
                     "This condition is inherited in an autosomal recessive pattern.")), encoding="utf-8")
    # MedQuAD publishes the MedlinePlus A.D.A.M. answers empty
    (root / "10_MPlus_ADAM_QA" / "0000002.xml").write_text(MEDQUAD_DOC.format(
        id="0000002", focus="Asthma", pairs=medquad_pair(1, "0000002", "symptoms", "What are the symptoms of Asthma ?",
                                                         "") +
        medquad_pair(2, "0000002", "treatment", "What are the treatments for Asthma ?", "")), encoding="utf-8")
    return root


def test_medquad_read_as_published(tmp_path):
    root = write_medquad(tmp_path / "MedQuAD")
    examples, info = PQ.read_patient_qa(str(root))
    assert info == {"format": "MedQuAD", "empty_answers": 2}
    assert [e.id for e in examples] == ["0000001-1", "0000001-2"]
    first = examples[0]
    assert first.prompt == "Question: What is (are) cystic fibrosis ?\nAnswer:"
    assert first.reference == ("Cystic fibrosis is an inherited disease & affects the lungs <mostly>.\n"
                               "It is caused by CFTR variants \u2013 see \u201cgenetics\u201d.")
    assert first.record["qtype"] == "information" and first.record["focus"] == "Cystic fibrosis"
    assert first.record["url"] == "https://ghr.nlm.nih.gov/condition/0000001"


def test_medquad_xml_is_parsed_safely(tmp_path):
    """An external entity is not fetched or substituted, an entity bomb is not expanded."""
    root = tmp_path / "m"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (root / "x.xml").write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE Document [<!ENTITY x SYSTEM "file://{secret}">'
        '<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
        '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>\n'
        '<Document id="1"><QAPairs><QAPair pid="1"><Question qid="1-1" qtype="t">Q?</Question>'
        "<Answer>start &x; &c; end</Answer></QAPair></QAPairs></Document>\n")
    examples, _ = PQ.read_patient_qa(str(root))
    assert examples[0].reference == "start end"  # neither the file nor the expansion


@pytest.mark.parametrize("files, expected", [
    ({"d.jsonl": '{"question": "q", "answer": "a"}\n{"question": "q2"}\n'},
     r"d.jsonl:2: no question/answer, prompt/completion, instruction/output \(Alpaca\) or messages"),
    ({"d.jsonl": '{"question": "q", "answer": "a"}\n{"prompt": "p", "completion": "c"}\n'},
     "d.jsonl:2: a prompt/completion record in a file of question/answer records"),
    ({"d.jsonl": '{"question": "q", "answer": "a"}\n{"question": "q", "answer": 3}\n'},
     "d.jsonl:2: field 'answer' should be a string, found int"),
    ({"d.jsonl": '{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a"\n'},
     "d.jsonl:2: not a JSON object on this line"),
    ({"d.jsonl": '{"question": " ", "answer": "a"}\n'}, "d.jsonl:1: field 'question' is empty"),
    ({"d.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'},
     "d.jsonl:1: the conversation should end with an assistant message"),
    ({"d.jsonl": '{"messages": [{"role": "doctor", "content": "hi"}]}\n'}, "d.jsonl:1: message 0 should be"),
    ({"m/a.xml": "<Document><QAPairs><QAPair><Answer>x</Answer></QAPair></QAPairs></Document>"},
     "a.xml:1: <QAPair> without a <Question>"),
    ({"m/a.xml": '<?xml version="1.0"?>\n<Document>\n<QAPairs>&nbsp;</QAPairs></Document>'},
     "a.xml:3: not well-formed XML"),
    ({"m/a.xml": "<PubmedArticleSet/>"}, "a.xml:1: expected a MedQuAD <Document>, found <PubmedArticleSet>"),
    ({"m/readme.txt": "no xml here"}, "m: no .xml files"),
])
def test_malformed_input_is_one_line_naming_file_and_record(tmp_path, files, expected):
    import re
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    target = tmp_path / ("m" if any(n.startswith("m/") for n in files) else "d.jsonl")
    with pytest.raises(TaskFormatError, match=expected) as e:
        PQ.read_patient_qa(str(target))
    assert "\n" not in str(e.value)
    assert re.search(r"(d\.jsonl|a\.xml|/m):", str(e.value))


def test_bad_input_through_the_tool_is_one_line(tmp_path, trained_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic.patient_qa_like(4, 0))
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    r = run_tool("finetune", "--task", "patient_qa", "--train-data", train, "--valid-data", bad, "--save",
                 tmp_path / "out", "--vocab-file", trained_tokenizer / "vocab.json", "--merge-file",
                 trained_tokenizer / "merges.txt")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {bad}:2: no question/answer, prompt/completion, "
                                             f"instruction/output (Alpaca) or messages (chat) fields; found question"]
    r = run_tool("finetune", "--task", "patient_qa", "--train-data", train, "--valid-data", train, "--save",
                 tmp_path / "out", "--vocab-file", trained_tokenizer / "vocab.json", "--merge-file",
                 trained_tokenizer / "merges.txt", "--prompt-template", "Q: {question} ({topic})")
    assert r.returncode == 1 and r.stderr.strip() == f"error: {train}:1: no field 'topic' for --prompt-template"


def test_rouge_l_is_rouge_score():
    score, each = PQ.rouge_l(["the cat sat on the mat", "nothing alike"], ["the cat sat", "a dog ran"])
    assert each == [pytest.approx(2 * 1.0 * 0.5 / 1.5), 0.0]  # LCS 3 of 6 and of 3 words
    assert score == pytest.approx(each[0] / 2)


def qa_args(trained_tokenizer, train, valid, save, **kw):
    args = {"task": "patient_qa", "train-data": train, "valid-data": valid, "model": "tiny",
            "vocab-file": trained_tokenizer / "vocab.json", "merge-file": trained_tokenizer / "merges.txt",
            "global-batch-size": 16, "lr": 3e-3, "warmup-ratio": 0.1, "hidden-dropout": 0.0,
            "attention-dropout": 0.0, "max-length": 64, "max-new-tokens": 32, "save": save, "seed": 7}
    args.update(kw)
    out = []
    for k, v in args.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("patient_qa")
    return (write_jsonl(d / "train.jsonl", synthetic.patient_qa_like(320, 1)),
            write_jsonl(d / "dev.jsonl", synthetic.patient_qa_like(32, 2)),
            write_jsonl(d / "train_small.jsonl", synthetic.patient_qa_like(64, 3)))


@pytest.mark.slow
def test_learns_a_synthetic_patient_qa_task_and_releases_it(qa_files, trained_tokenizer, tmp_path):
    save = tmp_path / "ft"
    out = launch_finetune(1, qa_args(trained_tokenizer, qa_files[0], qa_files[1], save, epochs=10,
                                     **{"test-data": qa_files[1]}))
    metrics = json.loads((save / "metrics.json").read_text())
    assert metrics["history"][0]["valid"]["rougeL"] < 0.2, out[-3000:]
    assert metrics["valid"]["rougeL"] > 0.8, out[-3000:]
    assert metrics["best_by"] == "dev ROUGE-L" and metrics["test"] == metrics["valid"]  # best/ reloaded
    losses = [h["valid"]["answer_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] / 10
    assert metrics["valid"]["perplexity"] == pytest.approx(2.718281828 ** metrics["valid"]["answer_loss"])
    rows = read_jsonl(save / "valid_generations.jsonl")
    assert len(rows) == 32 and {"question", "answer", "qtype", "prompt", "reference", "generated", "rougeL"} <= set(rows[0])
    # best/ is our checkpoint with its tokenizer: released to Hugging Face as it is, and
    # generation from the release gives the dev answers the fine-tuning scored
    run_tool("convert_checkpoint", "--load", save / "best", "--save", tmp_path / "hf", "--target-format", "hf",
             check=0)
    run_tool("generate", "--load", tmp_path / "hf", "--input", qa_files[1], "--prompt-template",
             "Question: {question}\\nAnswer:", "--batch-size", 8, "--max-new-tokens", 32, "--output",
             tmp_path / "gen.jsonl", check=0)
    released = read_jsonl(tmp_path / "gen.jsonl")
    assert [r["completion"].strip() for r in released] == [r["generated"] for r in rows]
    # megatron-biomed-release of best/: its own run's ROUGE-L on the card, nothing else
    run_tool("release", "--load", save / "best", "--save", tmp_path / "release", check=0)
    card = (tmp_path / "release" / "README.md").read_text()
    import yaml
    [valid, test] = yaml.safe_load(card.split("---\n")[1])["model-index"][0]["results"]
    assert valid["dataset"]["name"] == "Patient questions" and valid["dataset"]["split"] == "valid"
    assert valid["metrics"][0] == {"type": "rougeL", "value": round(metrics["valid"]["rougeL"], 4),
                                   "name": "rougeL (fine-tuned, greedy answers, ROUGE-L F1)"}
    assert test["dataset"]["split"] == "test" and "The run's datasets are not recorded" in card


_REFERENCE = {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], []], ids=["tp2", "dp2"])
def test_two_processes_equal_one(qa_files, trained_tokenizer, tmp_path, tmp_path_factory, layout):
    """4 steps and the dev answer loss and generations after them (lr 3e-4: see
    test_finetune's note on Adam and round-off)."""
    def result(d):
        metrics = json.loads((d / "metrics.json").read_text())
        return ([h["train_loss"] for h in metrics["history"][1:]], [h["valid"]["answer_loss"] for h in metrics["history"]],
                [r["generated"] for r in read_jsonl(d / "valid_generations.jsonl")])
    if "dir" not in _REFERENCE:
        d = tmp_path_factory.mktemp("qa_one_process")
        launch_finetune(1, qa_args(trained_tokenizer, qa_files[2], qa_files[1], d, epochs=1, lr=3e-4))
        _REFERENCE["dir"] = d
    launch_finetune(2, qa_args(trained_tokenizer, qa_files[2], qa_files[1], tmp_path / "two", epochs=1, lr=3e-4) + layout)
    one, two = result(_REFERENCE["dir"]), result(tmp_path / "two")
    assert two[0] == pytest.approx(one[0], abs=1e-5) and two[1] == pytest.approx(one[1], abs=1e-5)
    assert two[2] == one[2]


def test_pairs_longer_than_max_length_are_skipped_and_counted_bf16(trained_tokenizer, tmp_path):
    rows = synthetic.patient_qa_like(40, 0)
    rows[3]["answer"] = " ".join(["The answer goes on."] * 30)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = launch_finetune(1, qa_args(trained_tokenizer, train, train, tmp_path / "ft", epochs=1,
                                     bf16=True, **{"global-batch-size": 8, "max-new-tokens": 4}))
    assert "train: 39 question/answer pairs" in out and "skipped 1 longer than --max-length 64" in out
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["skipped"]["train_too_long"] == 1 and metrics["skipped"]["valid_too_long"] == 1
    assert len(read_jsonl(tmp_path / "ft" / "valid_generations.jsonl")) == 39
    assert os.path.isfile(tmp_path / "ft" / "best" / "latest_checkpointed_iteration.txt")
