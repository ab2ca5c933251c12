import filecmp
import json
import os
import warnings

import numpy as np
import pytest

from conftest import run_tool, write_jsonl
from megatron_biomed.data import indexed, synthetic

warnings.filterwarnings("ignore")


def megatron_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix))


def docs_with_edge_cases(n=400):
    docs = list(synthetic.pubmed_like_documents(n, seed=11))
    docs[3]["text"] = "Unicode: αβγ µg/kg, “quotes”, 中文, 🧬 and <|endoftext|> inside."
    docs[5]["text"] = "Line one.\n\nLine two after a blank line.\tTabbed."
    docs[7]["text"] = ""  # an empty document: no sequence, no EOD (as Megatron-LM writes it)
    return docs


def hf_ids(tok_dir, texts):
    from transformers import GPT2TokenizerFast
    fast = GPT2TokenizerFast.from_pretrained(tok_dir)
    return [fast.encode(t, split_special_tokens=True) for t in texts]  # "<|endoftext|>" in text is text


def preprocess(tok_dir, inp, prefix, *extra, check=0):
    return run_tool("preprocess_data", "--input", inp, "--output-prefix", prefix,
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                    "--no-progress", *extra, check=check)


def test_megatron_core_reads_our_tokens_exactly(trained_tokenizer, tmp_path):
    docs = docs_with_edge_cases()
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    r = preprocess(trained_tokenizer, inp, tmp_path / "out", "--append-eod")
    assert str(tmp_path / "out_text_document.bin") in r.stdout
    ds = megatron_dataset(tmp_path / "out_text_document")
    expected = [ids + [999] for ids in hf_ids(trained_tokenizer, [d["text"] for d in docs]) if ids]
    assert len(ds) == len(docs) - 1 and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == [*range(8), *range(7, len(docs))]
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert 999 not in ds[3].tolist()[:-1]
    assert (tmp_path / "out_text_document.ids").read_text().split("\n")[:-1] == [d["id"] for d in docs]


def test_bytes_equal_megatron_core_builder(trained_tokenizer, tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    docs = docs_with_edge_cases(200)
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    preprocess(trained_tokenizer, inp, tmp_path / "ours", "--append-eod")
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for ids in hf_ids(trained_tokenizer, [d["text"] for d in docs]):
        if ids:
            builder.add_item(torch.IntTensor(ids + [999]))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"ours_text_document{ext}", tmp_path / f"ref{ext}", shallow=False)


def test_workers_and_partitions_give_identical_files(trained_tokenizer, tmp_path):
    docs = list(synthetic.pubmed_like_documents(3000, seed=12))
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    preprocess(trained_tokenizer, inp, tmp_path / "one", "--append-eod")
    preprocess(trained_tokenizer, inp, tmp_path / "many", "--append-eod", "--workers", 2,
               "--partitions", 3, "--chunk-size-mb", 0.2, "--keep-sequential-samples")
    for ext in (".bin", ".idx", ".ids"):
        assert filecmp.cmp(tmp_path / f"one_text_document{ext}", tmp_path / f"many_text_document{ext}",
                           shallow=False), ext
    ds = megatron_dataset(tmp_path / "many_text_document")
    assert len(ds) == 3000
    assert ds[2999].tolist() == hf_ids(trained_tokenizer, [docs[-1]["text"]])[0] + [999]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []


def test_split_sentences_offline_and_keep_newlines(trained_tokenizer, tmp_path):
    docs = [{"id": "PMID:1", "text": "Title here\nBACKGROUND: Dose was 5 mg i.v. daily. It worked."},
            {"id": "PMID:2", "text": "As Smith et al. showed, approx. 10 died.\n\nCONCLUSIONS: Fine."}]
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    r = run_tool("preprocess_data", "--input", inp, "--output-prefix", tmp_path / "s",
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", trained_tokenizer / "vocab.json",
                 "--merge-file", trained_tokenizer / "merges.txt", "--split-sentences", "--append-eod",
                 "--sentence-splitter", trained_tokenizer / "sentence_splitter.json",
                 "--keep-newlines", "--no-progress", check=0)
    assert str(tmp_path / "s_text_sentence.idx") in r.stdout
    ds = megatron_dataset(tmp_path / "s_text_sentence")
    assert list(ds.document_indices) == [0, 3, 5]
    from transformers import GPT2TokenizerFast
    fast = GPT2TokenizerFast.from_pretrained(trained_tokenizer)
    sentences = [fast.decode(ds[i]) for i in range(len(ds))]
    assert sentences[:3] == ["Title here\n", "BACKGROUND: Dose was 5 mg i.v. daily. ", "It worked.<|endoftext|>"]
    assert "".join(sentences[3:]) == docs[1]["text"] + "<|endoftext|>"
    assert sentences[3] == "As Smith et al. showed, approx. 10 died.\n\n"


def test_empty_documents_kept_as_megatron_does(trained_tokenizer, tmp_path):
    docs = [{"id": "a", "text": "Some text."}, {"id": "b", "text": ""}, {"id": "c", "text": "More."}]
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    r = preprocess(trained_tokenizer, inp, tmp_path / "o", "--append-eod")
    assert "1 documents without tokens kept as empty documents" in r.stderr
    assert (tmp_path / "o_text_document.ids").read_text() == "a\nb\nc\n"
    ds = megatron_dataset(tmp_path / "o_text_document")
    # Three documents, the empty one with no sequence (and no EOD); two sequences in all.
    assert list(ds.document_indices) == [0, 1, 1, 2] and len(ds) == 2


MEGATRON = os.path.join(os.path.dirname(__file__), "data", "megatron_lm")
MEGATRON_CASES = {  # case: (input, flags); pinned by tests/helpers/pin_megatron_lm.sh
    "edge": ("edge.jsonl", []),
    "edge_eod": ("edge.jsonl", ["--append-eod"]),
    "edge_partitions": ("edge.jsonl", ["--append-eod", "--workers", 2, "--partitions", 2]),
    "edge_partitions_sequential": ("edge.jsonl", ["--append-eod", "--workers", 2, "--partitions", 2,
                                                  "--keep-sequential-samples"]),
    "sentences": ("sentences.jsonl", ["--append-eod", "--split-sentences", "--lang", "english"]),
    "sentences_keep_newlines": ("sentences.jsonl", ["--append-eod", "--split-sentences", "--lang", "english",
                                                    "--keep-newlines"]),
    "sentences_default_lang": ("sentences.jsonl", ["--append-eod", "--split-sentences"]),  # English Punkt
    "cr_line_ends": ("cr.jsonl", ["--append-eod"]),  # lone \r line ends
    "mixed_line_ends_partitions": ("mixed.jsonl", ["--append-eod", "--workers", 2, "--partitions", 2]),
    "tokenizer_flags": ("edge.jsonl", ["--append-eod", "--vocab-size", 50257, "--padded-vocab-size", 50304,
                                       "--vocab-extra-ids", 0, "--tokenizer-hf-use-fast"]),
}


@pytest.fixture(scope="module")
def megatron_inputs(tmp_path_factory):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "megatron_edge_cases", os.path.join(os.path.dirname(__file__), "helpers", "megatron_edge_cases.py"))
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    d = tmp_path_factory.mktemp("megatron_inputs")
    cases.main(d)
    return d


@pytest.fixture
def nltk_data(monkeypatch):
    """NLTK's data path pointed at the Punkt parameters pinned beside Megatron's outputs (for
    this process and the worker processes it spawns)."""
    import nltk
    path = os.path.join(MEGATRON, "nltk_data")
    monkeypatch.setenv("NLTK_DATA", path)
    monkeypatch.setattr(nltk.data, "path", [path, *nltk.data.path])


def _megatron_run(tmp_path, inp, flags, case):
    """Our tool with Megatron-LM's command line (its flags unchanged), run in this process (the
    same main() as the command line, without paying torch's import per case); returns
    {suffix: sha256}."""
    import contextlib
    import hashlib
    import io

    from megatron_biomed.data.preprocess import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in (
            "--input", inp, "--output-prefix", tmp_path / "out", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", os.path.join(MEGATRON, "tokenizer", "vocab.json"),
            "--merge-file", os.path.join(MEGATRON, "tokenizer", "merges.txt"), "--legacy-tokenizer",
            "--log-interval", 5, "--no-progress", *flags)])
    assert code == 0, err.getvalue()
    level = "sentence" if "--split-sentences" in flags else "document"
    assert "Processed 5 documents (" in err.getvalue() and " MB/s)." in err.getvalue()  # Megatron's progress lines
    return {f"_text_{level}{ext}": hashlib.sha256((tmp_path / f"out_text_{level}{ext}").read_bytes()).hexdigest()
            for ext in (".bin", ".idx")}


@pytest.mark.parametrize("case", sorted(MEGATRON_CASES))
def test_bytes_equal_megatron_lm_preprocess_data(case, megatron_inputs, tmp_path, nltk_data):
    """Empty texts, "<|endoftext|>" inside text (plain text, never a boundary), list-valued text,
    non-ASCII and control characters, 500 KB documents, partition order, NLTK sentence splitting
    with and without --keep-newlines: the files equal what Megatron-LM core_v0.16.1 writes."""
    with open(os.path.join(MEGATRON, "expected.json")) as f:
        expected = json.load(f)["cases"][case]
    inp, flags = MEGATRON_CASES[case]
    assert _megatron_run(tmp_path, megatron_inputs / inp, flags, case) == expected


@pytest.mark.parametrize("flags", [["--split-sentences", "--lang", "english"], []])
def test_megatron_sentence_lists_are_sentences(flags, tmp_path, nltk_data):
    """Megatron's own sentence-split output (text: a list of sentences) encodes to the same bytes
    Megatron writes from it, with or without --split-sentences (the list is never re-split)."""
    with open(os.path.join(MEGATRON, "expected.json")) as f:
        expected = json.load(f)["cases"]["sentences"]
    got = _megatron_run(tmp_path, os.path.join(MEGATRON, "sentences_ss.jsonl"), ["--append-eod", *flags], "list")
    assert list(got.values()) == list(expected.values())


def test_lang_without_nltk_model_is_one_line(trained_tokenizer, tmp_path):
    inp = write_jsonl(tmp_path / "d.jsonl", [{"text": "One. Two."}])
    env = dict(os.environ, NLTK_DATA=str(tmp_path / "no_nltk_data"), HOME=str(tmp_path))
    r = run_tool("preprocess_data", "--input", inp, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", trained_tokenizer, "--split-sentences",
                 "--lang", "klingon", check=1, env=env)
    assert r.stderr.startswith("error: --lang klingon: NLTK's Punkt model for 'klingon' is not installed here")
    assert "python -m nltk.downloader punkt_tab" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("line,message", [
    ('{"id": "x", "text": "unterminated}', "malformed JSON"),
    ('{"id": "x", "body": "no text key"}', "record has no field 'text' holding a string or a list of "
                                            "strings (record id 'x')"),
    ('["not", "an", "object"]', "a JSON object per line is expected"),
])
def test_bad_records_named_and_nothing_written(trained_tokenizer, tmp_path, line, message):
    docs = list(synthetic.pubmed_like_documents(50))
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    with open(inp, "a") as f:
        f.write(line + "\n")
    r = preprocess(trained_tokenizer, inp, tmp_path / "out" / "p", "--workers", 2, "--partitions", 2,
                   "--chunk-size-mb", 0.01, check=1)
    assert f"{inp}:51: {message}" in r.stderr
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_non_utf8_named(trained_tokenizer, tmp_path):
    inp = tmp_path / "docs.jsonl"
    inp.write_bytes(b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "caf\xe9"}\n')
    r = preprocess(trained_tokenizer, inp, tmp_path / "p", check=1)
    assert f"{inp}:2: not UTF-8 (byte 0xe9)" in r.stderr
    assert not any(n.startswith("p_") for n in os.listdir(tmp_path))


def test_merge_datasets_tool_and_int32_datasets(trained_tokenizer, tmp_path):
    docs = list(synthetic.pubmed_like_documents(300, seed=4))
    whole = write_jsonl(tmp_path / "all.jsonl", docs)
    preprocess(trained_tokenizer, whole, tmp_path / "whole", "--append-eod")
    shards = tmp_path / "shards"
    for i, part in enumerate((docs[:120], docs[120:])):
        preprocess(trained_tokenizer, write_jsonl(tmp_path / f"p{i}.jsonl", part), shards / f"slice_{i:03d}", "--append-eod")
    run_tool("merge_datasets", "--input", shards, "--output-prefix", tmp_path / "merged", check=0)
    for ext in (".bin", ".idx", ".ids"):
        assert filecmp.cmp(tmp_path / f"whole_text_document{ext}", tmp_path / f"merged{ext}", shallow=False)
    # Vocabularies of 65,500 and more are stored as int32, and megatron-core reads them back.
    with indexed.IndexedDatasetWriter(str(tmp_path / "big"), indexed.optimal_dtype(100_000)) as w:
        w.add_documents(np.array([70_000, 1, 2, 99_999]), [3, 1], [2], ids=["PMC1"])
    ds = megatron_dataset(tmp_path / "big")
    assert ds.index.dtype == np.int32 and ds[0].tolist() == [70_000, 1, 2] and ds[1].tolist() == [99_999]
    r = run_tool("merge_datasets", "--input", tmp_path / "nothing", "--output-prefix", tmp_path / "m", check=1)
    assert "not a directory" in r.stderr


def test_fast_encoder_equals_tokenizers(trained_tokenizer):
    from megatron_biomed.data.tokenizer import BatchEncoder, load_tokenizer
    tok = load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(trained_tokenizer))
    enc = BatchEncoder(tok)
    assert enc.fast is not None
    texts = [d["text"] for d in synthetic.pubmed_like_documents(500, seed=9)]
    texts += ["", "  lots   of\n\n\n spaces\t\t", "<|endoftext|>x<|endoftext|>", "it's they'll we'd",
              "Ünïcödé 🧬🧪 中文 ½ ²", "a" * 5000]
    plain = load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(trained_tokenizer))
    plain.encode_special_tokens = True
    assert enc.encode(texts) == [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    assert 999 not in enc.encode(["<|endoftext|>x<|endoftext|>"])[0]


def test_gptdataset_builds_on_our_output(trained_tokenizer, tmp_path):
    """megatron-core's GPTDataset + BlendedMegatronDatasetBuilder take our files as their own."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    inp = write_jsonl(tmp_path / "docs.jsonl", synthetic.pubmed_like_documents(300, seed=2))
    preprocess(trained_tokenizer, inp, tmp_path / "d", "--append-eod")

    class Tok:
        vocab_size, eod, pad = 1000, 999, 999
        unique_identifiers = {"class": "test tokenizer"}
    config = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([str(tmp_path / "d_text_document")], None),
                              split="98,1,1", path_to_cache=str(tmp_path / "cache"), tokenizer=Tok(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, 2, 2], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape[0] == 64 and int(sample["tokens"].max()) < 1000


@pytest.mark.parametrize("line, message", [
    ('{"text": "a \\udc00 b"}', r"field 'text' holds a lone surrogate (\udc00, from a JSON escape) at character 2"),
    ('{"text": ["ok", "\\ud800"]}', r"field 'text' holds a lone surrogate (\ud800, from a JSON escape) at character 0"),
    ('{"text": "x", "n": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits) for integer string conversion"),
    ('{"text": "x", "n": ' + "[" * 100000 + "]" * 100000 + "}", "JSON nested too deeply for Python to read"),
], ids=["surrogate", "surrogate-in-list", "5000-digit-integer", "deep-nesting"])
@pytest.mark.parametrize("position", [2, 70], ids=["among-the-first-texts", "later"])
def test_records_megatron_stops_on_are_one_line(trained_tokenizer, tmp_path, line, message, position):
    """Megatron-LM's preprocess_data.py stops with a traceback on each of these; here each is one
    line naming the file and line, wherever the record is."""
    inp = tmp_path / "d.jsonl"
    good = [json.dumps({"text": f"Document {i}."}) for i in range(position - 1)]
    inp.write_text("\n".join(good + [line, json.dumps({"text": "after"})]) + "\n", encoding="utf-8")
    r = preprocess(trained_tokenizer, inp, tmp_path / "o", check=1)
    assert r.stderr.startswith(f"error: {inp}:{position}: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("o_*"))


def test_line_numbers_count_every_kind_of_line_end(trained_tokenizer, tmp_path):
    inp = tmp_path / "d.jsonl"
    inp.write_bytes(b'{"text": "a"}\r{"text": "b"}\r\n{"text": "c"}\n{"text": oops}\r')
    r = preprocess(trained_tokenizer, inp, tmp_path / "o", check=1)
    assert r.stderr.startswith(f"error: {inp}:4: malformed JSON"), r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--vocab-extra-ids", "100"], "error: --vocab-extra-ids 100: Megatron-LM flag refused: only 0 works here"),
    (["--tokenizer-special-tokens", "<a>"], "error: --tokenizer-special-tokens <a>: Megatron-LM flag refused"),
])
def test_megatron_tokenizer_flags_refused_in_one_line(trained_tokenizer, tmp_path, flags, message):
    inp = write_jsonl(tmp_path / "d.jsonl", [{"text": "One."}])
    r = preprocess(trained_tokenizer, inp, tmp_path / "o", *flags, check=2)
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_tool("preprocess_data", "--input", inp, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", "m.model", check=2)
    assert r.stderr.startswith("error: --tokenizer-type SentencePieceTokenizer: not built here; give "
                               "GPT2BPETokenizer"), r.stderr
