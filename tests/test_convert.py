"""tools/convert_checkpoint.py and tools/generate.py: every conversion verified by logits."""
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_jsonl, run_tool, write_jsonl
from test_pretrain import base_args, train

from megatron_biomed.convert.megatron_lm import MegatronLMSource
from megatron_biomed.convert.ours import OursSource, build_model

TOL = 1e-4


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def in_process(main, *args, check=0):
    """Run a tool's main() in this process (the tools are thin wrappers around it): the same
    code path as the command line without paying torch's import per call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    r = Result(code, out.getvalue(), err.getvalue())
    if check is not None:
        assert code == check, f"exit {code}\nSTDOUT:\n{r.stdout}\nSTDERR:\n{r.stderr}"
    return r


def convert(*args, check=0):
    from megatron_biomed.convert.cli import main
    return in_process(main, *args, check=check)


def generate_tool(*args, check=0):
    from megatron_biomed.generation import main
    return in_process(main, *args, check=check)


def hf_logits(directory, tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(tokens).logits


def our_logits(path, tokens, vocab):
    model = build_model(OursSource(str(path)))
    with torch.no_grad():
        return model(tokens)[..., :vocab]


def random_hf_gpt2(directory, scale=True, vocab=500, tokenizer=None, **save_kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=3, n_head=4, initializer_range=0.2,
                     scale_attn_by_inverse_layer_idx=scale, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, **save_kw)
    if tokenizer is not None:
        for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(os.path.join(tokenizer, f), directory)
    return model


@pytest.fixture(scope="module")
def ours_tp2pp2(dataset, tmp_path_factory):  # noqa: F811
    """A checkpoint written by pretrain_gpt with tp=2 x pp=2 (4 processes), after 3 iterations."""
    d = tmp_path_factory.mktemp("tp2pp2")
    args = base_args(dataset, d, iters=3, **{"tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2,
                                             "save": d / "ckpt", "save-interval": 3,
                                             "merge-file": os.path.join(os.path.dirname(dataset["vocab"]),
                                                                        "merges.txt")})
    train(4, args)
    return d / "ckpt"


@pytest.mark.slow
def test_tp2pp2_to_hf_to_tp1_round_trip(ours_tp2pp2, tmp_path, dataset):  # noqa: F811
    from transformers import AutoTokenizer
    hf, back = tmp_path / "hf", tmp_path / "ours_tp1"
    out = run_tool("convert_checkpoint", "--load", ours_tp2pp2, "--save", hf, "--target-format", "hf", check=0).stdout
    assert "converted megatron_biomed" in out and not os.path.exists(str(hf) + ".tmp")
    cfg = json.load(open(hf / "config.json"))
    assert cfg["scale_attn_by_inverse_layer_idx"] is True and cfg["activation_function"] == "gelu_new"
    assert cfg["n_positions"] == 32 and cfg["vocab_size"] == 1000 and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert os.path.isfile(hf / "generation_config.json") and os.path.isfile(hf / "model.safetensors")
    tokens = torch.randint(0, 1000, (2, 32))
    reference = our_logits(ours_tp2pp2, tokens, 1000)
    assert (hf_logits(hf, tokens) - reference).abs().max() <= TOL
    # the tokenizer travelled with it and is the one training used
    text = "Aspirin reduced the risk of myocardial infarction (p < 0.05)."
    from tokenizers import Tokenizer
    ours_tok = Tokenizer.from_file(os.path.join(os.path.dirname(dataset["vocab"]), "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(hf)(text)["input_ids"] == ours_tok.encode(text).ids
    convert("--load", hf, "--save", back, "--target-format", "megatron_biomed")
    meta = json.load(open(back / "iter_0000000" / "config.json"))
    assert meta["layout"] == {"tp": 1, "pp": 1}
    assert (our_logits(back, tokens, 1000) - reference).abs().max() <= TOL


@pytest.mark.slow
def test_offline_reshard_resumes_like_the_original(ours_tp2pp2, tmp_path, dataset):  # noqa: F811
    """tp2 x pp2 -> tp1 offline (optimizer state included): training iteration 4 from the
    resharded checkpoint equals iteration 4 loaded straight from the original."""
    resharded = tmp_path / "tp1"
    convert("--load", ours_tp2pp2, "--save", resharded, "--target-format", "megatron_biomed",
            "--target-tensor-parallel-size", "1")
    src, dst = OursSource(str(ours_tp2pp2)), OursSource(str(resharded))
    assert dst.iteration == src.iteration == 3 and dst.consumed_samples == 24
    assert set(dst.extra_specs) == set(src.extra_specs) and any(k.startswith("optim.") for k in dst.extra_specs)
    for key in ("optim.h.1.mlp.c_fc.weight.exp_avg_sq", "optim.wte.weight.exp_avg"):
        a, b = src.extra_tensor(key), dst.extra_tensor(key)
        assert torch.equal(a[:1000], b[:1000])
    losses = []
    for ckpt in (ours_tp2pp2, resharded):
        args = base_args(dataset, tmp_path / ckpt.name, iters=4, load=ckpt)
        out = train(1, args)
        losses.append(re.search(r"iteration\s+4/.*?lm loss: (\S+)", out).group(0))
    ours = [float(line.split("lm loss: ")[1]) for line in losses]
    assert abs(ours[0] - ours[1]) < 1e-5, losses


@pytest.mark.parametrize("scale", [True, False], ids=["scale_attn_by_inverse_layer_idx", "plain_gpt2"])
def test_hf_gpt2_to_ours_and_back(tmp_path, scale):
    src = tmp_path / "hf"
    random_hf_gpt2(src, scale=scale, max_shard_size="200KB")  # sharded, with an index
    assert os.path.isfile(src / "model.safetensors.index.json")
    tokens = torch.randint(0, 500, (2, 64))
    reference = hf_logits(src, tokens)
    ours = tmp_path / "ours"
    convert("--load", src, "--save", ours, "--target-format", "megatron_biomed", "--target-tensor-parallel-size", "2")
    source = OursSource(str(ours))
    assert source.config.scale_attn_by_inverse_layer_idx is scale
    assert source.reader.shape("model.wte.weight") == (512, 64)  # padded for TP=2: 128 x 2 divides it
    assert (our_logits(ours, tokens, 500) - reference).abs().max() <= TOL
    back = tmp_path / "hf_back"
    convert("--load", ours, "--save", back, "--target-format", "hf", "--no-tokenizer", "--max-shard-size", "100KB")
    index = json.load(open(back / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    assert (hf_logits(back, tokens) - reference).abs().max() <= TOL


def test_bf16_round_trip_keeps_dtype_and_bits_and_tokenizer_is_optional(tmp_path):
    """HF bf16 -> ours TP2 -> HF: every tensor bit-identical and still bf16 (not a 2x larger
    fp32 model); no tokenizer files is a warning, not a failure; --dtype converts on request."""
    from transformers import GPT2LMHeadModel

    from megatron_biomed.convert import storage as S
    random_hf_gpt2(tmp_path / "fp32")
    GPT2LMHeadModel.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    r = convert("--load", tmp_path / "hf", "--save", tmp_path / "ours", "--target-format", "megatron_biomed",
                "--target-tensor-parallel-size", "2")
    assert "warning: --load" in r.stderr and "no tokenizer files found" in r.stderr and "no tokenizer" in r.stdout
    reader = S.DCPReader(str(tmp_path / "ours" / "iter_0000000"))
    assert reader.dtype("model.h.0.attn.c_attn.weight") == torch.bfloat16
    mapped = reader.read("model.h.0.mlp.c_fc.weight")  # the file mapped, not copied through DCP
    copied = torch.empty_like(mapped)
    reader.read_into({"model.h.0.mlp.c_fc.weight": copied})
    assert torch.equal(mapped, copied)
    convert("--load", tmp_path / "ours", "--save", tmp_path / "back", "--target-format", "hf")
    src = S.read_safetensors_header(str(tmp_path / "hf" / "model.safetensors"))
    back = S.read_safetensors_header(str(tmp_path / "back" / "model.safetensors"))
    assert set(src) == set(back) and json.load(open(tmp_path / "back" / "config.json"))["dtype"] == "bfloat16"
    for name in src:
        a = S.read_safetensors_tensor(str(tmp_path / "hf" / "model.safetensors"), src[name])
        b = S.read_safetensors_tensor(str(tmp_path / "back" / "model.safetensors"), back[name])
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    convert("--load", tmp_path / "hf", "--save", tmp_path / "ours32", "--target-format", "megatron_biomed",
            "--dtype", "fp32")
    assert S.DCPReader(str(tmp_path / "ours32" / "iter_0000000")).dtype("model.wte.weight") == torch.float32
    tokens = torch.randint(0, 500, (2, 16))
    model = build_model(OursSource(str(tmp_path / "ours")), dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        assert torch.equal(model(tokens)[..., :500].float(), build_model(
            OursSource(str(tmp_path / "ours32")), dtype=torch.bfloat16)(tokens)[..., :500].float())


def test_hf_import_then_continue_pretraining(tmp_path, dataset, trained_tokenizer):  # noqa: F811
    """A released GPT-2-shaped model -> ours -> pretrain_gpt --use-checkpoint-args resumes from it."""
    src = tmp_path / "hf"
    random_hf_gpt2(src, vocab=1000, tokenizer=trained_tokenizer)
    convert("--load", src, "--save", tmp_path / "ours", "--target-format", "megatron_biomed")
    assert os.path.isfile(tmp_path / "ours" / "tokenizer" / "vocab.json")
    args = base_args(dataset, tmp_path, iters=2, load=tmp_path / "ours", save=tmp_path / "cont",
                     **{"use-checkpoint-args": True, "save-interval": 2, "seq-length": None, "model": "tiny"})
    out = train(1, args)
    assert "loaded checkpoint" in out
    cont = OursSource(str(tmp_path / "cont"))
    assert cont.config.num_layers == 3 and cont.config.seq_length == 64 and cont.iteration == 2


@pytest.fixture(scope="module")
def megatron_checkpoints(tmp_path_factory):
    """megatron-core itself writes torch_dist checkpoints and computes reference logits: stacked
    layers with its fused (tanh) bias-gelu, exact gelu, and per-layer keys."""
    d = tmp_path_factory.mktemp("megatron")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "helpers", "write_megatron_checkpoint.py"),
                        str(d), "fused", "exact", "per_layer"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


@pytest.mark.parametrize("variant", ["fused", "exact", "per_layer"])
def test_megatron_lm_import_matches_megatron_core(megatron_checkpoints, tmp_path, variant):
    root = megatron_checkpoints / variant
    ref = torch.load(megatron_checkpoints / f"{variant}.pt", weights_only=True)
    ours = tmp_path / "ours"
    out = convert("--load", root, "--save", ours, "--target-format", "megatron_biomed", "--vocab-size", "500").stdout
    assert "Megatron-LM" in out
    cfg = OursSource(str(ours)).config
    assert cfg.activation == ("gelu" if variant == "exact" else "gelu_new") and cfg.num_layers == 3
    assert (our_logits(ours, ref["tokens"], 500) - ref["logits"]).abs().max() <= TOL
    if variant == "fused":  # and straight on to Hugging Face
        hf = tmp_path / "hf"
        convert("--load", root, "--save", hf, "--target-format", "hf", "--vocab-size", "500", "--no-tokenizer")
        assert (hf_logits(hf, ref["tokens"]) - ref["logits"]).abs().max() <= TOL


def test_megatron_lm_import_needs_the_real_vocabulary(megatron_checkpoints, tmp_path):
    r = convert("--load", megatron_checkpoints / "fused", "--save", tmp_path / "o", "--target-format",
                "megatron_biomed", check=1)
    assert "the embedding has 512 rows, padded; pass --vocab-size or --vocab-file" in r.stderr
    assert not os.path.exists(tmp_path / "o")


# -- bad inputs ---------------------------------------------------------------------------------
def test_bad_inputs_give_one_clear_error(tmp_path):
    src = tmp_path / "hf"
    random_hf_gpt2(src, max_shard_size="200KB")
    save = tmp_path / "out"

    def fails(path, needle, *extra):
        r = convert("--load", path, "--save", save, "--target-format", "megatron_biomed", *extra, check=1)
        assert needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not os.path.exists(save) and not os.path.exists(str(save) + ".tmp")

    missing = tmp_path / "missing_shard"
    shutil.copytree(src, missing)
    shard = sorted(f for f in os.listdir(missing) if f.startswith("model-"))[1]
    os.remove(missing / shard)
    fails(missing, f"missing shard file(s) {shard}")

    shapes = tmp_path / "shapes"
    shutil.copytree(src, shapes)
    cfg = json.load(open(shapes / "config.json"))
    cfg["n_inner"] = 128
    json.dump(cfg, open(shapes / "config.json", "w"))
    fails(shapes, "transformer.h.0.mlp.c_fc.weight has shape (64, 256), config.json implies (64, 128)")

    llama = tmp_path / "llama"
    shutil.copytree(src, llama)
    cfg = json.load(open(llama / "config.json"))
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    json.dump(cfg, open(llama / "config.json", "w"))
    fails(llama, "architectures ['LlamaForCausalLM'] are not supported")

    fails(tmp_path / "nowhere", "no such directory")

    ours = tmp_path / "ours"
    convert("--load", src, "--save", ours, "--target-format", "megatron_biomed")
    broken = tmp_path / "ours_missing"
    shutil.copytree(ours, broken)
    os.remove(broken / "iter_0000000" / "__0_0.distcp")
    fails(broken, f"{broken / 'iter_0000000' / '__0_0.distcp'}: missing; restore the checkpoint from a copy")
    fails(broken, f"{broken / 'iter_0000000' / '__0_0.distcp'}: missing (an incomplete copy of the checkpoint?)",
          "--no-verify-checkpoint")
    fails(ours, "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3",
          "--target-tensor-parallel-size", "3")


def test_crafted_checkpoint_metadata_cannot_run_code(tmp_path):
    """DCP's .metadata is a pickle: ours is read with an allowlist, so a crafted one is refused
    before it can do anything (torch itself would run it with pickle.load)."""
    src = tmp_path / "hf"
    random_hf_gpt2(src)
    ours = tmp_path / "ours"
    convert("--load", src, "--save", ours, "--target-format", "megatron_biomed")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(ours / "iter_0000000" / ".metadata", "wb") as f:
        pickle.dump(Evil(), f)
    r = convert("--load", ours, "--save", tmp_path / "hf2", "--target-format", "hf", "--no-tokenizer", check=1)
    assert re.search(r"\.metadata: \d+ bytes, the manifest says", r.stderr)  # caught before it is even read
    r = convert("--load", ours, "--save", tmp_path / "hf2", "--target-format", "hf", "--no-tokenizer",
                "--no-verify-checkpoint", check=1)
    assert "refusing to unpickle posix.system" in r.stderr
    assert not marker.exists()


def test_refuses_to_overwrite_unless_forced(tmp_path):
    src = tmp_path / "hf"
    random_hf_gpt2(src)
    save = tmp_path / "out"
    save.mkdir()
    (save / "precious.txt").write_text("keep me")
    r = convert("--load", src, "--save", save, "--target-format", "megatron_biomed", check=2)
    assert "exists and is not empty; pass --force" in r.stderr and (save / "precious.txt").exists()
    convert("--load", src, "--save", save, "--target-format", "megatron_biomed", "--force")
    assert not (save / "precious.txt").exists() and (save / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_conversion_leaves_no_output(tmp_path, sig):
    src = tmp_path / "hf"
    random_hf_gpt2(src)
    save = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--load", str(src),
                          "--save", str(save), "--target-format", "hf", "--no-tokenizer"],
                         env=dict(os.environ, MEGATRON_BIOMED_TEST_PAUSE_IN_CONVERT="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(str(save) + ".tmp") or not any(
            f.endswith(".safetensors") for f in os.listdir(str(save) + ".tmp")):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # paused after its first tensors
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert not os.path.exists(save)
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "nothing was written" in err
        assert not os.path.exists(str(save) + ".tmp")
    convert("--load", src, "--save", save, "--target-format", "hf", "--no-tokenizer")  # a rerun just works
    assert os.listdir(save) and not os.path.exists(str(save) + ".tmp")


# -- generation ---------------------------------------------------------------------------------
def test_generate_greedy_equals_transformers(tmp_path, trained_tokenizer):
    from megatron_biomed.generation import generate
    from transformers import AutoTokenizer
    src = tmp_path / "hf"
    theirs = random_hf_gpt2(src, vocab=1000, tokenizer=trained_tokenizer)
    ours_dir = tmp_path / "ours"
    convert("--load", src, "--save", ours_dir, "--target-format", "megatron_biomed", "--target-tensor-parallel-size", "2")
    ours = build_model(OursSource(str(ours_dir)))
    tok = AutoTokenizer.from_pretrained(src)
    prompts = ["What is the first-line treatment for hypertension?", "The patient presented with",
               "BRCA1 mutations increase the risk of"]
    expected = []
    for text in prompts:
        ids = tok(text)["input_ids"]
        ref = theirs.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=999,
                              pad_token_id=999)[0, len(ids):].tolist()
        got, _ = generate(ours, ids, max_new_tokens=24, eos_id=999)
        assert got == ref
        assert len(set(ref)) > 3  # not a degenerate repetition
        expected.append(tok.decode([t for t in ref if t != 999]))
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts[1:])])
    for load, tool in ((src, generate_tool), (ours_dir, lambda *a: run_tool("generate", *a, check=0))):
        out = tmp_path / f"out_{load.name}.jsonl"  # from Hugging Face, and from ours on the command line
        tool("--load", load, "--prompt", prompts[0], "--input", tmp_path / "prompts.jsonl",
             "--output", out, "--max-new-tokens", 24, "--greedy")
        rows = read_jsonl(out)
        assert [r["completion"] for r in rows] == expected
        assert [r.get("id") for r in rows] == [None, 0, 1]
        assert all(r["completion_tokens"] <= 24 and r["finish_reason"] in ("eos", "length") for r in rows)
    # all three in one batch (left-padded, one KV cache), prompts built by --prompt-template
    write_jsonl(tmp_path / "topics.jsonl", [{"id": i, "topic": p} for i, p in enumerate(prompts)])
    out = tmp_path / "batched.jsonl"
    generate_tool("--load", src, "--input", tmp_path / "topics.jsonl", "--prompt-template", "{topic}",
                  "--batch-size", 3, "--output", out, "--max-new-tokens", 24, "--greedy")
    rows = read_jsonl(out)
    assert [r["completion"] for r in rows] == expected
    assert [(r["id"], r["topic"]) for r in rows] == list(enumerate(prompts))


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path, trained_tokenizer):
    src = tmp_path / "hf"
    random_hf_gpt2(src, vocab=1000, tokenizer=trained_tokenizer)

    def gen(*extra):
        r = generate_tool("--load", src, "--prompt", "The patient presented with", "--max-new-tokens", 16, *extra)
        return json.loads(r.stdout)["completion"]
    greedy = gen("--greedy")
    assert gen("--temperature", "0.9", "--top-k", "1") == greedy
    a = gen("--temperature", "1.0", "--top-p", "0.9", "--seed", "1")
    assert a == gen("--temperature", "1.0", "--top-p", "0.9", "--seed", "1")
    assert any(gen("--temperature", "1.0", "--seed", str(s)) != a for s in (2, 3, 4))


def test_filter_logits():
    from megatron_biomed.generation import filter_logits
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [False, False, True, True]
    p = logits.softmax(-1)  # 0.64, 0.24, 0.09, 0.03: the nucleus for 0.8 is the first two
    assert p[0] < 0.8 < p[0] + p[1]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [False, True, True, True]


@pytest.mark.parametrize("which", ["first", "last", "metadata"])
def test_a_flipped_byte_anywhere_stops_conversion_and_generation(tmp_path, trained_tokenizer, which):
    """Each file is checked against the manifest right after the converter reads it (and the
    files it does not read at the end): one flipped byte in any of them is an error naming the
    file, and no --save is left."""
    src = tmp_path / "hf"
    random_hf_gpt2(src, vocab=1000, tokenizer=trained_tokenizer)
    ours = tmp_path / "ours"
    convert("--load", src, "--save", ours, "--target-format", "megatron_biomed")
    d = ours / "iter_0000000"
    shards = sorted(d.glob("*.distcp"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    bad = {"first": shards[0], "last": shards[-1], "metadata": d / ".metadata"}[which]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2 if which != "metadata" else len(data) - 3] ^= 0x01
    bad.write_bytes(bytes(data))
    r = convert("--load", ours, "--save", tmp_path / "back", "--target-format", "hf", check=1)
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: checksum mismatch"), r.stderr
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob("back.tmp*"))
    r = generate_tool("--load", ours, "--prompt", "x", "--max-new-tokens", "2", check=1)
    assert f"{bad}: checksum mismatch" in r.stderr


def test_no_direct_io_writes_the_same_files(tmp_path):
    """--no-direct-io (for file systems where O_DIRECT is slow) changes how the bytes reach the
    disk, not the bytes: every tensor file of both directions is identical."""
    import filecmp
    random_hf_gpt2(tmp_path / "hf")
    for flags, suffix in (([], "direct"), (["--no-direct-io"], "buffered")):
        convert("--load", tmp_path / "hf", "--save", tmp_path / f"ours_{suffix}", "--target-format",
                "megatron_biomed", "--target-tensor-parallel-size", "2", "--no-tokenizer", *flags)
        convert("--load", tmp_path / f"ours_{suffix}", "--save", tmp_path / f"hf_{suffix}", "--target-format", "hf",
                "--no-tokenizer", *flags)
    it = "iter_0000000"
    shards = sorted(f for f in os.listdir(tmp_path / "ours_direct" / it) if f.endswith(".distcp"))
    assert len(shards) > 10 and shards == sorted(f for f in os.listdir(tmp_path / "ours_buffered" / it)
                                                 if f.endswith(".distcp"))
    for d, names in ((os.path.join("ours_{}", it), shards), ("hf_{}", ["model.safetensors", "config.json"])):
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / d.format("direct"), tmp_path / d.format("buffered"),
                                                   names, shallow=False)
        assert not mismatch and not errors and len(match) == len(names)


# -- the prefetch threads share a Megatron-LM source ---------------------------------------------
def test_megatron_lm_stacked_cache_is_right_under_every_interleaving(megatron_checkpoints):
    """Two prefetch threads call model_tensor at once. Forced orderings: (1) a thread's read of a
    stacked tensor is held while the other thread reads three other stacked tensors (evicting the
    first from the cache before its reader has used it); (2) a second thread asks for a tensor
    whose read the first has started (it waits for that read instead of reading again). Each
    thread must get its own layer of its own tensor, every tensor read once: the old single-slot
    cache crashed ('NoneType' object is not subscriptable) or handed a thread the other's tensor."""
    import threading
    src = MegatronLMSource(str(megatron_checkpoints / "fused"), vocab_size=500)
    assert src._stacked, "the fused variant keeps layers stacked"
    stacked = {}  # megatron-core key -> our names in it
    for name in src.spec_order():
        key, layer = src._key(name)
        if layer is not None:
            stacked.setdefault(key, []).append(name)
    keys = list(stacked)[:4]
    assert len(keys) == 4

    def expected(name):
        key, layer = src._key(name)
        return MegatronLMSource(str(megatron_checkpoints / "fused"), vocab_size=500).reader.read(key)[layer]

    real_read, calls, gates = src.reader.read, {}, {}

    def gated_read(key):
        calls[key] = calls.get(key, 0) + 1
        if key in gates:
            gates[key].wait(timeout=30)
        return real_read(key)

    src._stacked_cache._read = gated_read
    results = {}

    def ask(name):
        results[name] = src.model_tensor(name)

    # (1) the first thread's tensor is evicted while it is being read
    first = stacked[keys[0]][1]
    gates[keys[0]] = threading.Event()
    a = threading.Thread(target=ask, args=(first,))
    a.start()
    while calls.get(keys[0]) != 1:
        time.sleep(0.01)
    others = [stacked[k][0] for k in keys[1:]]
    for name in others:
        ask(name)
    gates[keys[0]].set()
    a.join(timeout=30)
    for name in [first] + others:
        assert torch.equal(results[name], expected(name)), name

    # (2) a second thread waits for the read the first has started
    calls.clear()
    key = keys[0]  # evicted by the three others: read again
    gates[key] = threading.Event()
    names = stacked[key][:2]
    threads = [threading.Thread(target=ask, args=(n,)) for n in names]
    threads[0].start()
    while calls.get(key) != 1:
        time.sleep(0.01)
    threads[1].start()
    time.sleep(0.2)
    assert calls[key] == 1 and threads[1].is_alive()  # waiting, not reading a second time
    gates[key].set()
    for t in threads:
        t.join(timeout=30)
    assert calls[key] == 1
    for name in names:
        assert torch.equal(results[name], expected(name)), name

    # (3) a failed read is raised to the caller and not cached: the next call reads again
    def failing_read(k):
        raise OSError(5, "Input/output error", k)
    src._stacked_cache._read = failing_read
    with pytest.raises(OSError):
        src.model_tensor(stacked[keys[1]][1])  # keys[1] was evicted by (2)
    src._stacked_cache._read = real_read
    assert torch.equal(src.model_tensor(stacked[keys[1]][1]), expected(stacked[keys[1]][1]))


def test_save_is_never_inside_or_around_load_and_force_keeps_foreign_checkpoints(tmp_path):
    src = tmp_path / "hf"
    random_hf_gpt2(src)
    ours = tmp_path / "ck"
    convert("--load", src, "--save", ours, "--target-format", "megatron_biomed")
    iter0 = ours / "iter_0000000"
    for save, what in ((ours, "contains --load"), (iter0 / "out", "lies inside --load"), (iter0, "is --load")):
        r = convert("--load", iter0, "--save", save, "--target-format", "hf", "--force", "--no-tokenizer", check=2)
        assert f"error: --save {save}: {what}" in r.stderr, r.stderr
        assert (iter0 / ".metadata").exists()
    # a training run's directory (not written by this tool) is never replaced, even with --force
    run = tmp_path / "run"
    shutil.copytree(ours, run)
    os.remove(run / ".written-by-megatron-biomed-convert")
    r = convert("--load", src, "--save", run, "--target-format", "megatron_biomed", "--force", check=2)
    assert "holds a checkpoint this tool did not write" in r.stderr and (run / "iter_0000000" / ".metadata").exists()
    # an earlier conversion's output is replaced with --force
    out = tmp_path / "hf_out"
    convert("--load", ours, "--save", out, "--target-format", "hf", "--no-tokenizer")
    convert("--load", ours, "--save", out, "--target-format", "hf", "--no-tokenizer", "--force")
    assert json.loads((out / ".written-by-megatron-biomed-convert").read_text())["source"] == str(ours)
