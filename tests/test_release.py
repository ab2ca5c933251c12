"""The released model runs correctly wherever people serve it: --portable folds BioMedLM's
per-layer attention scale into the query weights (same logits, plain GPT-2 config), a real
inference engine (CTranslate2) generates our tokens from the portable release and not from the
flagged one, and megatron-biomed-release writes a directory ready to upload whose model card is
drawn from the run's own records."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import run_tool, write_jsonl
from test_convert import convert, our_logits, ours_tp2pp2, random_hf_gpt2  # noqa: F401
from test_pretrain import base_args, train

from megatron_biomed.convert.ours import OursSource
from megatron_biomed.data import synthetic
from megatron_biomed.generation import generate, load_for_inference

PROMPTS = [[5, 17, 42, 7], [100, 3], [250, 251, 252, 253, 254, 9, 9], [1]]


def hf_model(d, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


def greedy_ours(d, n=16):
    model, _ = load_for_inference(str(d), "cpu", "fp32")
    return [generate(model, p, max_new_tokens=n)[0] for p in PROMPTS]


def greedy_ct2(d, tmp_path, n=16):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer
    out = tmp_path / (os.path.basename(d) + "-ct2")
    shutil.rmtree(out, ignore_errors=True)
    TransformersConverter(str(d)).convert(str(out))
    tok = AutoTokenizer.from_pretrained(str(d))
    gen = ctranslate2.Generator(str(out), device="cpu", compute_type="float32")
    # one prompt a call: in a batch, CTranslate2 returns the tokens past the shortest prompt as generated
    return [gen.generate_batch([tok.convert_ids_to_tokens(p)], max_length=n, sampling_topk=1,
                               include_prompt_in_result=False, end_token=[])[0].sequences_ids[0] for p in PROMPTS]


@pytest.mark.parametrize("layers", [2, 5])
def test_folding_equals_the_unfolded_model(tmp_path, trained_tokenizer, layers):
    """From Hugging Face: fp32 logits within 1e-5, greedy tokens equal; bf16 within its rounding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(layers)
    cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=layers, n_head=4, initializer_range=0.2,
                     scale_attn_by_inverse_layer_idx=True)
    src = tmp_path / "flagged"
    GPT2LMHeadModel(cfg).save_pretrained(src)
    out = convert("--load", src, "--save", tmp_path / "portable", "--target-format", "hf", "--portable",
                  "--no-tokenizer")
    assert "scale_attn_by_inverse_layer_idx" not in out.stderr  # no note: the flag is not written
    port = json.loads((tmp_path / "portable" / "config.json").read_text())
    assert port["scale_attn_by_inverse_layer_idx"] is False and port.get("reorder_and_upcast_attn", False) is False
    x = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        a, b = hf_model(src)(x).logits, hf_model(tmp_path / "portable")(x).logits
    assert (a - b).abs().max() <= 1e-5
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # the default conversion keeps the flag (bit-exact round trip) and says which engines mishandle it
    out = convert("--load", src, "--save", tmp_path / "plain", "--target-format", "hf", "--no-tokenizer")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["scale_attn_by_inverse_layer_idx"] is True
    assert "note:" in out.stdout + out.stderr and "--portable" in out.stdout + out.stderr
    # bf16: the folded weights are the fp32 quotient rounded once
    convert("--load", src, "--save", tmp_path / "p16", "--target-format", "hf", "--portable", "--dtype", "bf16",
            "--no-tokenizer")
    with torch.no_grad():
        c = hf_model(tmp_path / "p16", torch.bfloat16)(x).logits.float()
    assert (a - c).abs().max() <= 0.1 * a.abs().max()


def test_portable_from_a_tp2pp2_checkpoint_converts_back_and_trains_on(ours_tp2pp2, tmp_path, dataset):  # noqa: F811
    port, back = tmp_path / "portable", tmp_path / "back"
    convert("--load", ours_tp2pp2, "--save", port, "--target-format", "hf", "--portable")
    x = torch.randint(0, 1000, (2, 30))
    ref = our_logits(ours_tp2pp2, x, 1000)
    with torch.no_grad():
        assert (hf_model(port)(x).logits - ref).abs().max() <= 1e-5
    convert("--load", port, "--save", back, "--target-format", "megatron_biomed")
    assert OursSource(str(back)).config.scale_attn_by_inverse_layer_idx is False
    assert (our_logits(back, x, 1000) - ref).abs().max() <= 1e-5
    out = train(1, base_args(dataset, tmp_path, iters=2, load=back, save=tmp_path / "more",
                             **{"use-checkpoint-args": True, "finetune": True}))
    assert re.search(r"iteration\s+2/\s+2", out)


def test_ctranslate2_generates_our_tokens_from_the_portable_release_only(ours_tp2pp2, tmp_path,  # noqa: F811
                                                                         trained_tokenizer):
    """A real engine: CTranslate2 (CPU wheel) converts the release with its own converter and
    generates greedily. Portable: our tokens, token for token, on every prompt. With the flag
    written, CTranslate2 silently ignores it and goes its own way: why --portable exists."""
    sharp = tmp_path / "sharp"  # a small model with the flag and peaked logits: no near-ties
    random_hf_gpt2(sharp, scale=True, vocab=1000, tokenizer=trained_tokenizer)
    for name, src in (("trained", ours_tp2pp2), ("sharp", sharp)):
        flagged, port = tmp_path / f"{name}-flagged", tmp_path / f"{name}-portable"
        extra = ["--vocab-file", trained_tokenizer / "vocab.json", "--merge-file", trained_tokenizer / "merges.txt"]
        convert("--load", src, "--save", flagged, "--target-format", "hf", *extra)
        convert("--load", src, "--save", port, "--target-format", "hf", "--portable", *extra)
        ours = greedy_ours(src)
        assert greedy_ct2(port, tmp_path) == ours, name
        if name == "sharp":
            assert greedy_ct2(flagged, tmp_path) != ours


@pytest.fixture(scope="module")
def pretrain_run(dataset, tmp_path_factory):
    d = tmp_path_factory.mktemp("release_run")
    merges = os.path.join(os.path.dirname(dataset["vocab"]), "merges.txt")
    train(1, base_args(dataset, d, iters=6, save=d / "ckpt", **{"merge-file": merges, "eval-interval": 3,
                                                                 "eval-iters": 1}))
    return d


def test_release_of_a_pretraining_run_draws_its_card_from_the_run(pretrain_run, tmp_path, dataset):
    from megatron_biomed.data.indexed import read_index
    from transformers import pipeline
    rel = tmp_path / "release"
    mc = write_jsonl(tmp_path / "mc.json", synthetic.medmcqa_like(8, 1))
    metrics = tmp_path / "zero_shot.json"
    run_tool("evaluate", "--load", pretrain_run / "ckpt", "--task", "medmcqa", "--data", mc,
             "--metrics-file", metrics, check=0)
    corpus = write_jsonl(tmp_path / "docs.jsonl", list(synthetic.pubmed_like_documents(40, seed=3)) +
                         [{"id": "PMID:1", "text": "Leaked: " + json.loads(open(mc).readline())["question"]}])
    run_tool("decontaminate", "--eval", f"medmcqa={mc}", "--corpus", corpus, "--ngram", 3, "--report",
             tmp_path / "contamination.json", "--no-progress", check=0)
    r = run_tool("release", "--load", pretrain_run / "ckpt", "--save", rel, "--metrics", metrics,
                 "--decontamination-report", tmp_path / "contamination.json", check=0)
    assert "1 evaluation result(s) on the card" in r.stdout
    names = sorted(os.listdir(rel))
    for f in ("README.md", "config.json", "generation_config.json", "loss_curves.png", "model.safetensors",
              "tokenizer.json", "vocab.json", "merges.txt"):
        assert f in names, names
    cfg = json.loads((rel / "config.json").read_text())
    assert cfg["scale_attn_by_inverse_layer_idx"] is False and cfg["dtype"] == "bfloat16"
    gen = json.loads((rel / "generation_config.json").read_text())
    vocab = json.loads((rel / "vocab.json").read_text())
    assert gen["eos_token_id"] == vocab["<|endoftext|>"]
    card = (rel / "README.md").read_text()
    front = card.split("---\n")[1]
    import yaml
    meta = yaml.safe_load(front)
    acc = json.loads(metrics.read_text())["acc"]["accuracy"]
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] and meta["language"] == ["en"]
    [result] = meta["model-index"][0]["results"]
    assert result["dataset"]["name"] == "MedMCQA" and result["metrics"][0]["value"] == round(acc, 4)
    tokens = int(read_index(dataset["prefix"] + ".idx")[1].astype("int64").sum())
    assert "| iterations | 6 |" in card and f"| tokens seen | {6 * 8 * 32:,} " in card
    assert f"| `{os.path.basename(dataset['prefix'])}` | {tokens:,} |" in card
    assert "not medical advice" in card and "review-sheet" in card and "![training and validation loss]" in card
    report = json.loads((tmp_path / "contamination.json").read_text())["sets"]
    [(set_name, counts)] = report.items()
    assert counts["contaminated"] >= 1 and f"| {set_name} | {counts['items']} | {counts['contaminated']} |" in card
    # it loads as it is
    generate_ = pipeline("text-generation", model=str(rel))
    assert generate_("The patients", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("The patients")


def test_release_without_evaluations_reports_none(pretrain_run, tmp_path):
    rel = tmp_path / "release"
    r = run_tool("release", "--load", pretrain_run / "ckpt", "--save", rel, "--dtype", "fp32",
                 "--tensorboard-dir", tmp_path / "nothing", check=0)
    assert "none given: the card says so" in r.stdout
    card = (rel / "README.md").read_text()
    assert "model-index" not in card and "No evaluation results were given" in card
    assert "no loss curves" in card and not (rel / "loss_curves.png").exists()
    assert json.loads((rel / "config.json").read_text())["dtype"] == "float32"


def test_release_bad_inputs_are_one_line(pretrain_run, tmp_path):
    cases = [(["--load", tmp_path / "none", "--save", tmp_path / "o"], "--load"),
             (["--load", pretrain_run / "ckpt", "--save", tmp_path / "o", "--dtype", "int4"], "--dtype"),
             (["--load", pretrain_run / "ckpt", "--save", pretrain_run / "ckpt" / "rel"], "lies inside --load"),
             (["--load", pretrain_run / "ckpt", "--save", tmp_path / "o", "--metrics", tmp_path / "x.json"],
              "x.json: cannot read the metrics file")]
    for args, needle in cases:
        r = run_tool("release", *args)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode != 0 and len(errors) == 1 and needle in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
