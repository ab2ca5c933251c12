"""tools/decontaminate.py: evaluation items planted in a corpus are found (by n-gram after case
and punctuation normalisation, and by PMID) and dropped, and nothing else is."""
import json

from conftest import read_jsonl, run_tool, write_jsonl

from megatron_biomed.data import synthetic

QUESTION = ("Which of the following drugs is the first-line treatment of uncomplicated hypertension in elderly "
            "patients with diabetes and chronic kidney disease")


def corpus_and_eval(tmp_path):
    docs = list(synthetic.pubmed_like_documents(600, seed=3))
    # the question, in other case and punctuation, inside one abstract
    docs[77]["text"] += (" WHICH of the following drugs, is the first line treatment of uncomplicated "
                         "hypertension in elderly patients with diabetes; and chronic kidney disease?")
    # 12 consecutive words of another question: below the 13-word threshold
    docs[300]["text"] += " the mean serum sodium of adult patients admitted with acute severe pancreatitis was low"
    mc = synthetic.medmcqa_like(40, 1)
    mc[5]["question"] = QUESTION
    mc[9]["question"] = ("Why was the mean serum sodium of adult patients admitted with acute severe pancreatitis "
                         "lower in winter")
    return write_jsonl(tmp_path / "corpus.jsonl", docs), write_jsonl(tmp_path / "medmcqa_dev.json", mc), docs


def test_planted_question_is_found_and_dropped_and_nothing_else(tmp_path):
    corpus, mc, docs = corpus_and_eval(tmp_path)
    r = run_tool("decontaminate", "--eval", f"medmcqa={mc}", "--corpus", corpus, "--report", tmp_path / "r.json",
                 "--drop", tmp_path / "clean.jsonl", "--drop-ids", tmp_path / "ids.txt", "--workers", 2, check=0)
    assert "| medmcqa:medmcqa_dev.json | 40 | 1 | 1 | 0 | 2.5 |" in r.stdout
    assert "1 of 600 corpus documents" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    items = report["sets"]["medmcqa:medmcqa_dev.json"]["contaminated_items"]
    assert [(x["id"], x["ngram_docs"]) for x in items] == [(mc_id(5), [docs[77]["id"]])]
    assert (tmp_path / "ids.txt").read_text() == docs[77]["id"] + "\n"
    kept = corpus.read_text().splitlines(keepends=True)
    del kept[77]
    assert (tmp_path / "clean.jsonl").read_text() == "".join(kept)  # every other line byte for byte
    one = run_tool("decontaminate", "--eval", f"medmcqa={mc}", "--corpus", corpus, "--report", tmp_path / "r1.json",
                   "--workers", 1, check=0)
    assert json.loads((tmp_path / "r1.json").read_text()) == report and one.stdout == r.stdout
    # --ngram 12 also finds the 12-word overlap
    r = run_tool("decontaminate", "--eval", f"medmcqa={mc}", "--corpus", corpus, "--ngram", 12, check=0)
    assert "| medmcqa:medmcqa_dev.json | 40 | 2 | 2 | 0 | 5.0 |" in r.stdout


def mc_id(i):
    return synthetic.medmcqa_like(40, 1)[i]["id"]


def test_pubmedqa_and_bioasq_articles_are_found_by_pmid(tmp_path):
    docs = list(synthetic.pubmed_like_documents(50, seed=4))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    pmid = docs[10]["id"].removeprefix("PMID:")
    pqa = tmp_path / "ori_pqal.json"
    pqa.write_text(json.dumps({pmid: {"QUESTION": "Does x help?", "CONTEXTS": ["Unrelated words only."],
                                      "final_decision": "yes"},
                               "99999999": {"QUESTION": "Does y help?", "CONTEXTS": ["Other words."],
                                            "final_decision": "no"}}))
    other = docs[20]["id"].removeprefix("PMID:")
    bioasq = tmp_path / "training.json"
    bioasq.write_text(json.dumps({"questions": [{"id": "b1", "type": "yesno", "body": "Is z real?",
                                                 "exact_answer": "yes", "documents": [
                                                     f"http://www.ncbi.nlm.nih.gov/pubmed/{other}"],
                                                 "snippets": [{"text": "z is real.", "document":
                                                               f"http://www.ncbi.nlm.nih.gov/pubmed/{other}"}]}]}))
    r = run_tool("decontaminate", "--eval", f"pubmedqa={pqa}", "--eval", f"bioasq={bioasq}", "--corpus", corpus,
                 "--report", tmp_path / "r.json", "--drop-ids", tmp_path / "ids.txt", check=0)
    assert "| pubmedqa:ori_pqal.json | 2 | 1 | 0 | 1 | 50.0 |" in r.stdout
    assert "| bioasq:training.json | 1 | 1 | 0 | 1 | 100.0 |" in r.stdout
    sets = json.loads((tmp_path / "r.json").read_text())["sets"]
    assert sets["pubmedqa:ori_pqal.json"]["contaminated_items"][0]["pmid_docs"] == [docs[10]["id"]]
    assert sorted((tmp_path / "ids.txt").read_text().split()) == sorted([docs[10]["id"], docs[20]["id"]])


def test_indexed_corpus_with_ids(tmp_path, trained_tokenizer):
    """The same planted question found in the .bin/.idx dataset tools/preprocess_data.py makes,
    named by the document id in its .ids file."""
    corpus, mc, docs = corpus_and_eval(tmp_path)
    run_tool("preprocess_data", "--input", corpus, "--output-prefix", tmp_path / "ds", "--tokenizer-type",
             "GPT2BPETokenizer", "--vocab-file", trained_tokenizer / "vocab.json", "--merge-file",
             trained_tokenizer / "merges.txt", "--append-eod", "--no-progress", check=0)
    r = run_tool("decontaminate", "--eval", f"medmcqa={mc}", "--corpus", tmp_path / "ds_text_document",
                 "--corpus-format", "indexed", "--vocab-file", trained_tokenizer / "vocab.json", "--merge-file",
                 trained_tokenizer / "merges.txt", "--drop-ids", tmp_path / "ids.txt", check=0)
    assert "| medmcqa:medmcqa_dev.json | 40 | 1 | 1 | 0 | 2.5 |" in r.stdout
    assert (tmp_path / "ids.txt").read_text() == docs[77]["id"] + "\n"


def test_bad_inputs_are_one_line(tmp_path):
    corpus, mc, _ = corpus_and_eval(tmp_path)
    lines = corpus.read_text().splitlines()
    lines[2] = lines[2][:40]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    for args, expected in [
        (["--corpus", bad], f"error: {bad}:3: not a JSON object on this line"),
        (["--corpus", corpus, "--text-key", "body"], f"error: {corpus}:1: no string field 'body'; name the text "
                                                     f"field with --text-key"),
        (["--corpus", tmp_path / "nothere.jsonl"], f"error: --corpus {tmp_path / 'nothere.jsonl'}: no such file"),
    ]:
        r = run_tool("decontaminate", "--eval", f"medmcqa={mc}", *args, "--drop", tmp_path / "out.jsonl")
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(expected), r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out.jsonl").exists()
    r = run_tool("decontaminate", "--eval", str(mc), "--corpus", corpus)
    assert r.returncode == 2 and "give TASK=FILE" in r.stderr.strip().splitlines()[-1]
    assert read_jsonl(corpus)  # untouched
