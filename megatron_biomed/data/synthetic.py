"""PubMed-like synthetic records for the demo, tests and benchmarks (no download needed).

The text is generated from biomedical vocabulary and sentence templates with the features that
matter to the pipeline: structured abstract labels, abbreviations with periods (i.v., et al.,
approx.), numbers, Greek letters and other non-ASCII characters.
"""
import random
from xml.sax.saxutils import escape

_TERMS = ("insulin resistance", "type 2 diabetes", "tumor necrosis factor-α", "interleukin-6",
          "myocardial infarction", "hepatocellular carcinoma", "BRCA1 mutation", "CD4+ T cells",
          "chronic kidney disease", "atrial fibrillation", "Staphylococcus aureus", "COVID-19",
          "gut microbiota", "oxidative stress", "amyloid-β", "metformin", "statin therapy",
          "randomized controlled trial", "cohort", "mRNA expression", "apoptosis", "sepsis",
          "Alzheimer's disease", "blood pressure", "HbA1c", "p53", "NF-κB signaling", "asthma",
          "glioblastoma", "tuberculosis", "vitamin D deficiency", "osteoporosis", "PD-L1")
_VERBS = ("was associated with", "significantly reduced", "increased", "did not affect",
          "was inversely correlated with", "predicted", "modulated", "was elevated in")
_GROUPS = ("patients", "mice", "healthy volunteers", "children", "older adults", "rats",
           "participants", "women", "cell lines")
_TEMPLATES = (
    "{T1} {V} {T2} in {G} (n = {N}).",
    "As reported by Smith et al. in {Y}, {T1} {V} {T2}.",
    "Treatment with {T1} ({D} mg/kg i.v.) {V} {T2} in {G}.",
    "The mean follow-up was approx. {N2} months, and {T1} {V} {T2} (p < 0.0{P}).",
    "We enrolled {N} {G} with {T1} at {K} centers.",
    "In {G}, {T1} {V} {T2} compared with controls (OR {O}; 95% CI {O}-{O2}).",
    "These findings suggest that {T1} is a therapeutic target in {T2}.",
    "Levels of {T1} were measured at baseline and after {N2} wk. of treatment.",
    "Data were analysed with a Cox model, i.e. adjusted for age, sex, etc., as described.",
    "We described {T1} in {G} from {K} centers in Europe and Asia.",
    "Samples were described in detail elsewhere; {K} centers contributed {N} {G}.",
)
_EXTRA = (
    "Expression of {GENE} and {GENE} was quantified by {WORD} assays.",
    "{WORD} {WORD} of {GENE} was observed after {X} h of exposure to {WORD}.",
    "The {WORD} pathway involving {GENE} ({X} ± {X2}) may explain {WORD} in {G}.",
)
_SYLLABLES = ("hy", "dro", "xy", "me", "thyl", "ami", "no", "phos", "pho", "ryl", "ase", "cyto",
              "kine", "gen", "ic", "lipo", "pro", "tein", "neuro", "endo", "the", "lial", "osis",
              "itis", "glyco", "sul", "fate", "car", "dio", "myo", "path", "y", "trans", "ferase",
              "oxi", "dase", "immuno", "globu", "lin", "nephro", "hepato", "toxic", "ity", "vas")


def rare_word(rng):
    """Zipf-distributed pseudo-terms: PubMed's long tail of rare words, as real text has."""
    r = random.Random(int(rng.paretovariate(0.8)) % 300_000)
    return "".join(r.choice(_SYLLABLES) for _ in range(r.randint(2, 5)))


def gene(rng):
    r = random.Random(int(rng.paretovariate(0.8)) % 50_000)
    letters = "".join(r.choice("ABCDEFGHIKLMNPRSTVWXYZ") for _ in range(r.randint(2, 4)))
    return letters + str(r.randint(1, 40)) if r.random() < 0.8 else letters.capitalize()


LABELS = ("BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS")
JOURNALS = ("J Biol Chem", "Lancet", "N Engl J Med", "PLoS One", "BMC Med", "Nat Med")


def sentence(rng):
    t = rng.choice(_TEMPLATES) if rng.random() < 0.7 else rng.choice(_EXTRA)
    while "{GENE}" in t or "{WORD}" in t:
        t = t.replace("{GENE}", gene(rng), 1).replace("{WORD}", rare_word(rng), 1)
    return t.format(X=round(rng.uniform(0.1, 48), 1), X2=round(rng.uniform(0.01, 5), 2),
                    T1=rng.choice(_TERMS), T2=rng.choice(_TERMS), V=rng.choice(_VERBS),
                    G=rng.choice(_GROUPS), N=rng.randint(12, 4000), N2=rng.randint(2, 60),
                    D=rng.choice((0.5, 1, 2.5, 10)), P=rng.randint(1, 5), K=rng.randint(2, 40),
                    Y=rng.randint(1990, 2023), O=round(rng.uniform(0.3, 3), 2),
                    O2=round(rng.uniform(3, 6), 2))


def paragraph(rng, n_min=2, n_max=5):
    s = " ".join(sentence(rng) for _ in range(rng.randint(n_min, n_max)))
    return s[0].upper() + s[1:]


def title(rng):
    first = rng.choice(_TERMS)
    return f"{first[0].upper() + first[1:]} and {rng.choice(_TERMS)} in {rng.choice(_GROUPS)}"


def medline_article_xml(rng, pmid, structured=None, language="eng", year=None):
    structured = rng.random() < 0.5 if structured is None else structured
    if structured:
        abstract = "".join(f'<AbstractText Label="{lab}" NlmCategory="{lab}">{escape(paragraph(rng))}'
                           f"</AbstractText>" for lab in LABELS)
    else:
        abstract = f"<AbstractText>{escape(paragraph(rng, 4, 9))}</AbstractText>"
    year = year or rng.randint(1975, 2024)
    return (f'<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">{pmid}</PMID>'
            f'<Article PubModel="Print"><Journal><JournalIssue CitedMedium="Internet"><PubDate>'
            f"<Year>{year}</Year><Month>Mar</Month></PubDate></JournalIssue>"
            f"<Title>{rng.choice(JOURNALS)}</Title></Journal>"
            f"<ArticleTitle>{escape(title(rng))}.</ArticleTitle>"
            f"<Abstract>{abstract}</Abstract><Language>{language}</Language></Article>"
            f"</MedlineCitation></PubmedArticle>\n")


def medline_file_xml(articles, deleted=()):
    body = "".join(articles)
    if deleted:
        body += "<DeleteCitation>" + "".join(f'<PMID Version="1">{p}</PMID>' for p in deleted) + \
                "</DeleteCitation>\n"
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
            '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n'
            f"<PubmedArticleSet>\n{body}</PubmedArticleSet>\n")


def jats_article_xml(rng, pmcid, pmid=None, n_sections=3):
    secs = "".join(
        f'<sec id="s{i}"><title>{name}</title><p>{escape(paragraph(rng, 3, 6))} '
        f'[<xref ref-type="bibr" rid="r1">1</xref>]</p>'
        f'<p>{escape(paragraph(rng))}</p></sec>'
        for i, name in enumerate(("Introduction", "Methods", "Results", "Discussion")[:n_sections]))
    table = ('<table-wrap id="t1"><label>Table 1</label><caption><p>Baseline characteristics.</p>'
             "</caption><table><tr><td>Age</td><td>54.2</td></tr></table></table-wrap>")
    fig = ('<fig id="f1"><label>Figure 1</label><caption><p>Kaplan-Meier curves.</p></caption>'
           '<graphic xlink:href="f1.jpg"/></fig>')
    pmid_xml = f'<article-id pub-id-type="pmid">{pmid}</article-id>' if pmid else ""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange '
            'DTD v1.3 20210610//EN" "JATS-archivearticle1-3.dtd">\n'
            '<article xmlns:xlink="http://www.w3.org/1999/xlink" article-type="research-article" xml:lang="en">'
            f"<front><journal-meta><journal-title-group><journal-title>{rng.choice(JOURNALS)}"
            f"</journal-title></journal-title-group></journal-meta><article-meta>{pmid_xml}"
            f'<article-id pub-id-type="pmc">{pmcid}</article-id>'
            f"<title-group><article-title>{escape(title(rng))}</article-title></title-group>"
            f'<pub-date pub-type="epub"><year>{rng.randint(2000, 2024)}</year></pub-date>'
            f"<abstract><p>{escape(paragraph(rng))}</p></abstract></article-meta></front>"
            f"<body>{secs.replace('</sec>', table + fig + '</sec>', 1)}</body>"
            '<back><ref-list><ref id="r1"><mixed-citation>Smith J. A reference. 2001.'
            "</mixed-citation></ref></ref-list></back></article>\n")


def pubmed_like_documents(n, seed=0):
    """JSONL-ready dicts shaped like tools/pubmed_to_jsonl.py output (for tokenizer/benchmarks)."""
    rng = random.Random(seed)
    for i in range(n):
        t = title(rng)
        body = "\n".join(f"{lab}: {paragraph(rng)}" for lab in LABELS)
        yield {"id": f"PMID:{10_000_000 + i}", "source": "pubmed_abstract", "title": t,
               "text": f"{t}.\n{body}", "year": rng.randint(1975, 2024), "journal": rng.choice(JOURNALS)}


MC_WORDS = ["insulin", "aspirin", "heparin", "warfarin", "cortisol", "dopamine", "serotonin", "histamine",
            "glucose", "sodium", "calcium", "potassium", "thyroid", "kidney", "liver", "spleen"]


def medmcqa_like(n, seed):
    """Multiple-choice records in MedMCQA's format whose answer is the option the question
    names: a model learns them only by looking back at the question (fine-tuning tests, demo)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        options = rng.sample(MC_WORDS, 4)
        cop = rng.randrange(4)
        if i == 0:
            cop = 3  # a "cop": 4 shows the release's 1-4 numbering (tasks.read_medmcqa refuses to guess)
        rows.append({"id": f"s{seed}-{i}", "question": f"Which term is {options[cop]}?", "opa": options[0],
                     "opb": options[1], "opc": options[2], "opd": options[3], "cop": cop + 1,
                     "subject_name": "Pharmacology" if i % 2 else "Physiology"})
    return rows


CONDITIONS = ("asthma", "type 2 diabetes", "osteoporosis", "tuberculosis", "atrial fibrillation", "sepsis",
              "chronic kidney disease", "glioblastoma", "vitamin D deficiency", "Alzheimer's disease",
              "myocardial infarction", "hepatocellular carcinoma", "COVID-19", "insulin resistance")
# question wordings per question type, and the answer each type gets
PATIENT_QA = {
    "symptoms": (("What are the symptoms of {C}?", "What are the signs of {C}?"),
                 "Symptoms of {C} vary; see your doctor."),
    "treatment": (("How is {C} treated?", "What is the treatment for {C}?"),
                  "Treatment of {C} depends on its severity."),
    "causes": (("What causes {C}?", "Why do people get {C}?"),
               "{C} has several causes."),
    "inheritance": (("Is {C} inherited?", "Does {C} run in families?"),
                    "Some cases of {C} run in families."),
    "prevention": (("How can I prevent {C}?", "Can {C} be prevented?"),
                   "A healthy lifestyle lowers the risk of {C}."),
}


def patient_qa_like(n, seed):
    """Consumer-health question/answer records whose answer follows from the question: its type
    picks the answer's wording and the condition it names is repeated in it (generative
    fine-tuning tests and demo)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        qtype = rng.choice(sorted(PATIENT_QA))
        wordings, answer = PATIENT_QA[qtype]
        condition = rng.choice(CONDITIONS)
        question = rng.choice(wordings).format(C=condition)
        text = answer.format(C=condition)
        rows.append({"id": f"p{seed}-{i}", "question": question, "answer": text[0].upper() + text[1:],
                     "qtype": qtype})
    return rows
