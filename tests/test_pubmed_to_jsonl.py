import gzip
import io
import os
import random
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, read_jsonl, run_tool
from megatron_biomed.data import documents, synthetic

MEDLINE = """<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
{records}
</PubmedArticleSet>
"""


def medline_record(pmid, title, abstract_xml, year="<Year>2019</Year>", language="eng",
                   journal="Journal of Testing"):
    return f"""<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM">
<PMID Version="1">{pmid}</PMID>
<Article PubModel="Print"><Journal><JournalIssue CitedMedium="Print"><PubDate>{year}</PubDate>
</JournalIssue><Title>{journal}</Title></Journal>
<ArticleTitle>{title}</ArticleTitle>
{abstract_xml}
<Language>{language}</Language></Article>
<CommentsCorrectionsList><CommentsCorrections RefType="Cites"><PMID Version="1">999</PMID></CommentsCorrections></CommentsCorrectionsList>
</MedlineCitation></PubmedArticle>"""


STRUCTURED = """<Abstract>
<AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Sepsis is common.</AbstractText>
<AbstractText Label="METHODS" NlmCategory="METHODS">We gave <i>S. aureus</i> 10 mg/kg i.v. to mice.</AbstractText>
<AbstractText Label="RESULTS" NlmCategory="RESULTS">Mortality fell (p &lt; 0.05).</AbstractText>
</Abstract>"""


def write(path, text, gz=False):
    data = text.encode("utf-8") if isinstance(text, str) else text
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def jats(pmcid, body, pmid=None, extra_front=""):
    pmid_xml = f'<article-id pub-id-type="pmid">{pmid}</article-id>' if pmid else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.3 20210610//EN" "JATS-archivearticle1-3.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML" article-type="research-article" xml:lang="en">
<front><journal-meta><journal-title-group><journal-title>BMC Testing</journal-title></journal-title-group></journal-meta>
<article-meta>{pmid_xml}<article-id pub-id-type="pmc">{pmcid}</article-id>
<title-group><article-title>Full text of a <italic>test</italic> article</article-title></title-group>
<pub-date pub-type="epub"><day>3</day><month>4</month><year>2021</year></pub-date>{extra_front}
<abstract><sec><title>Background</title><p>We studied things.</p></sec>
<sec><title>Results</title><p>Things happened.</p></sec></abstract>
</article-meta></front>
<body>{body}</body>
<back><ack><p>We thank funders.</p></ack><ref-list><title>References</title>
<ref id="r1"><mixed-citation>Smith J. Old paper. Nature. 1999.</mixed-citation></ref></ref-list></back>
</article>"""


JATS_BODY = """<sec id="s1"><title>Introduction</title>
<p>Asthma affects many children [<xref ref-type="bibr" rid="r1">1</xref>].</p>
<table-wrap id="t1"><label>Table 1</label><caption><p>Cohort table caption.</p></caption>
<table><tr><td>TABLECELL</td></tr></table></table-wrap>
</sec>
<sec id="s2"><title>Methods</title>
<p>Dose was <inline-formula><mml:math><mml:mi>MATHX</mml:mi></mml:math></inline-formula> daily.</p>
<fig id="f1"><label>Figure 1</label><caption><p>FIGCAPTION curves.</p></caption><graphic xlink:href="f1.jpg"/></fig>
<sec><title>Statistics</title><p>We used R.</p></sec></sec>"""


def convert(tmp_path, *inputs, extra=(), check=0):
    out = tmp_path / "out.jsonl"
    r = run_tool("pubmed_to_jsonl", *inputs, "--output", out, "--no-progress", *extra, check=check)
    return (read_jsonl(out) if out.exists() else None), r


def test_medline_structured_abstract(tmp_path):
    records = [medline_record(101, "Sepsis in <i>mice</i>.", STRUCTURED),
               medline_record(102, "No abstract here.", "", year="<MedlineDate>1998 Dec-1999 Jan</MedlineDate>"),
               medline_record(103, "Plain abstract.", "<Abstract><AbstractText>One paragraph.</AbstractText></Abstract>",
                              year="<MedlineDate>1998 Dec-1999 Jan</MedlineDate>")]
    f = write(tmp_path / "pubmed25n0001.xml.gz", MEDLINE.format(records="\n".join(records)), gz=True)
    docs, r = convert(tmp_path, f)
    assert [d["id"] for d in docs] == ["PMID:101", "PMID:103"]
    d = docs[0]
    assert d == {"id": "PMID:101", "source": "pubmed_abstract", "title": "Sepsis in mice.",
                 "text": "Sepsis in mice.\nBACKGROUND: Sepsis is common.\n"
                         "METHODS: We gave S. aureus 10 mg/kg i.v. to mice.\n"
                         "RESULTS: Mortality fell (p < 0.05).",
                 "year": 2019, "journal": "Journal of Testing"}
    assert docs[1]["year"] == 1998 and docs[1]["text"] == "Plain abstract.\nOne paragraph."
    assert "skipped: no text (no abstract or body): 1" in r.stderr
    assert "wrote 2 documents" in r.stderr


def test_update_files_replace_and_delete_in_file_name_order(tmp_path):
    base = [medline_record(p, f"Title {p}.", f"<Abstract><AbstractText>Version one of {p}.</AbstractText></Abstract>")
            for p in (1, 2, 3, 4)]
    upd = [medline_record(2, "Title 2.", "<Abstract><AbstractText>Version two of 2.</AbstractText></Abstract>"),
           medline_record(5, "Title 5.", "<Abstract><AbstractText>New 5.</AbstractText></Abstract>")]
    deletes = '<DeleteCitation><PMID Version="1">3</PMID><PMID Version="1">4</PMID></DeleteCitation>'
    d = tmp_path / "in"
    (d / "updatefiles").mkdir(parents=True)
    write(d / "pubmed25n0001.xml.gz", MEDLINE.format(records="\n".join(base)), gz=True)
    u = write(d / "updatefiles" / "pubmed25n1275.xml.gz", MEDLINE.format(records="\n".join(upd) + deletes), gz=True)
    # Given in the "wrong" order on the command line: natural file-name order still applies.
    docs, r = convert(tmp_path, u, d / "pubmed25n0001.xml.gz")
    by_id = {x["id"]: x["text"] for x in docs}
    assert sorted(by_id) == ["PMID:1", "PMID:2", "PMID:5"]
    assert by_id["PMID:2"] == "Title 2.\nVersion two of 2."
    assert "DeleteCitation PMIDs: 2" in r.stderr
    assert "superseded by a later version or DeleteCitation: 3" in r.stderr
    docs2, _ = convert(tmp_path, d)  # a directory, searched recursively: same result
    assert docs2 == docs


def test_pmc_article_sections_without_tables_figures_references(tmp_path):
    f = write(tmp_path / "PMC777.nxml", jats("777", JATS_BODY, pmid=12345))
    docs, _ = convert(tmp_path, f)
    assert len(docs) == 1
    d = docs[0]
    assert d["id"] == "PMC777" and d["source"] == "pmc_fulltext" and d["year"] == 2021
    assert d["pmid"] == 12345  # the article's abstract is PMID:12345 (tools/dedup.py --prefer pairs them)
    assert d["journal"] == "BMC Testing" and d["title"] == "Full text of a test article"
    assert d["text"] == ("Full text of a test article\n"
                         "Background: We studied things.\nResults: Things happened.\n"
                         "Introduction\nAsthma affects many children.\n"
                         "Methods\nDose was daily.\nStatistics\nWe used R.")
    for noise in ("TABLECELL", "Cohort table", "FIGCAPTION", "MATHX", "Old paper", "funders", "f1.jpg"):
        assert noise not in d["text"]


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_oa_bundle_and_unsafe_members_refused(tmp_path):
    good = [(f"PMC{i}/PMC{i}.nxml", jats(str(i), JATS_BODY).encode()) for i in (11, 12)]
    evil = [("../escape.nxml", jats("13", JATS_BODY).encode()),
            ("/etc/abs.nxml", jats("14", JATS_BODY).encode()),
            ("PMC15/figure.jpg", b"\xff\xd8\xff")]
    t = make_tar(tmp_path / "oa_comm_xml.PMC000xxxxxx.baseline.tar.gz", good + evil)
    docs, r = convert(tmp_path, t, check=1)
    assert [d["id"] for d in docs] == ["PMC11", "PMC12"]
    assert "refused tar member '../escape.nxml'" in r.stderr
    assert "refused tar member '/etc/abs.nxml'" in r.stderr
    assert not (tmp_path.parent / "escape.nxml").exists()


def test_bad_inputs_are_named_and_the_rest_is_processed(tmp_path):
    good = write(tmp_path / "pubmed25n0001.xml", MEDLINE.format(records=medline_record(
        1, "Fine.", "<Abstract><AbstractText>Good text.</AbstractText></Abstract>")))
    full = gzip.compress(MEDLINE.format(records=medline_record(
        2, "Cut.", "<Abstract><AbstractText>" + "word " * 5000 + "</AbstractText></Abstract>")).encode())
    truncated = write(tmp_path / "pubmed25n0002.xml.gz", full[: len(full) // 2])
    malformed = write(tmp_path / "pubmed25n0003.xml", MEDLINE.format(records="<PubmedArticle>\n<MedlineCitation>\n</Oops>"))
    latin1 = write(tmp_path / "pubmed25n0004.xml", MEDLINE.format(records=medline_record(
        4, "Caf\u00e9.", "<Abstract><AbstractText>x</AbstractText></Abstract>")).encode("utf-8").replace(
        "\u00e9".encode(), b"\xe9"))
    docs, r = convert(tmp_path, good, truncated, malformed, latin1, "--workers", "2", check=1)
    assert [d["id"] for d in docs] == ["PMID:1"]
    err = r.stderr
    assert f"{truncated}: corrupt or truncated gzip at uncompressed byte" in err
    assert f"{malformed}: line 6, column" in err and "malformed XML" in err
    assert f"{latin1}: line" in err
    assert "files: 4 (3 with errors)" in err


def test_hostile_xml_no_external_entities_no_expansion(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xxe = f"""<?xml version="1.0"?>
<!DOCTYPE PubmedArticleSet [<!ENTITY xxe SYSTEM "file://{secret}">
<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<PubmedArticleSet>{medline_record(7, "Leak &xxe; here.", "<Abstract><AbstractText>Bomb &lol9; end.</AbstractText></Abstract>")}
</PubmedArticleSet>"""
    f = write(tmp_path / "pubmed25n0001.xml", xxe)
    docs, r = convert(tmp_path, f)
    assert docs[0]["text"] == "Leak here.\nBomb end."
    assert "TOPSECRET" not in (tmp_path / "out.jsonl").read_text()


def test_filters(tmp_path):
    recs = [medline_record(1, "English.", "<Abstract><AbstractText>" + "long text " * 30 + "</AbstractText></Abstract>"),
            medline_record(2, "French.", "<Abstract><AbstractText>" + "long text " * 30 + "</AbstractText></Abstract>", language="fre"),
            medline_record(3, "Short.", "<Abstract><AbstractText>tiny</AbstractText></Abstract>"),
            medline_record(4, "Excluded.", "<Abstract><AbstractText>" + "long text " * 30 + "</AbstractText></Abstract>")]
    f = write(tmp_path / "pubmed25n0001.xml", MEDLINE.format(records="\n".join(recs)))
    pmc = write(tmp_path / "PMC9.nxml", jats("9", JATS_BODY, pmid=4))
    ex = tmp_path / "exclude.txt"
    ex.write_text("# held-out test articles\n4\n")
    docs, r = convert(tmp_path, f, pmc, extra=("--min-chars", 100, "--languages", "eng", "--exclude-pmids", ex))
    assert [d["id"] for d in docs] == ["PMID:1"]
    for reason in ("language: 1", "shorter than --min-chars 100: 1", "excluded PMID: 2"):
        assert reason in r.stderr
    ex.write_text("4\nnot-a-pmid\n")
    _, r = convert(tmp_path, f, extra=("--exclude-pmids", ex), check=2)
    assert f"{ex}:2: not a PMID" in r.stderr


def test_workers_give_identical_output(tmp_path):
    rng = random.Random(5)
    for i in range(4):
        arts = [synthetic.medline_article_xml(rng, 1000 * i + j) for j in range(30)]
        write(tmp_path / f"pubmed25n000{i}.xml.gz", synthetic.medline_file_xml(arts, deleted=[5]), gz=True)
    one, _ = convert(tmp_path, tmp_path, extra=("--workers", 1))
    two, _ = convert(tmp_path, tmp_path, extra=("--workers", 3))
    assert one == two and len(one) == 119


def test_interrupted_run_leaves_no_output(tmp_path, monkeypatch):
    f = write(tmp_path / "pubmed25n0001.xml", synthetic.medline_file_xml(
        [synthetic.medline_article_xml(random.Random(1), 1)]))
    out = tmp_path / "docs.jsonl"

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(documents, "winning_events", interrupted)
    with pytest.raises(KeyboardInterrupt):
        documents.convert([str(f)], str(out), show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["pubmed25n0001.xml"]


@pytest.mark.slow
def test_memory_stays_flat_on_a_large_file(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "pubmed25n0001.xml"
    with open(path, "w", encoding="utf-8") as f:
        f.write(synthetic.medline_file_xml([]).split("</PubmedArticleSet>")[0])
        for i in range(40_000):
            f.write(synthetic.medline_article_xml(rng, i + 1))
        f.write("</PubmedArticleSet>\n")
    size_mb = path.stat().st_size / 2**20
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec.
    code = ("from megatron_biomed.data import documents as d; "
            f"d.convert([{str(path)!r}], {str(tmp_path / 'o.jsonl')!r}, show_progress=False); "
            "print([int(x.split()[1]) // 1024 for x in open('/proc/self/status') if x.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    peak_mb = int(r.stdout.split()[-1])
    # A whole parsed tree would take several times the file size.
    assert size_mb > 50 and peak_mb < 120, (size_mb, peak_mb)
