"""Parse MEDLINE/PubMed citation XML and PMC JATS articles into plain documents.

Parsing is hardened for untrusted input: no DTD is loaded, no entity (internal or external)
is substituted, nothing is fetched from the network, and libxml2's huge-tree limits stay on.
Entity references therefore survive as `etree._Entity` nodes, which `element_text` skips.
"""
import re

from lxml import etree

# Everything iterparse needs to refuse DTDs, external entities and entity expansion.
SAFE_PARSE = dict(resolve_entities=False, load_dtd=False, no_network=True, huge_tree=False,
                  dtd_validation=False, remove_comments=True, remove_pis=True)

MEDLINE_RECORD_TAGS = ("PubmedArticle", "PubmedBookArticle", "DeleteCitation")

# JATS elements whose content is not running prose: their text is dropped, their tail kept.
JATS_SKIP = frozenset({
    "table-wrap", "table", "fig", "fig-group", "graphic", "inline-graphic", "media",
    "supplementary-material", "disp-formula", "inline-formula", "tex-math", "math",
    "alternatives", "ref-list", "fn-group", "label", "caption", "table-wrap-foot",
    "object-id", "chem-struct-wrap", "code", "preformat", "array",
})
_YEAR = re.compile(r"(1[89]\d\d|20\d\d)")


def local_name(tag):
    if not isinstance(tag, str):  # comments, processing instructions, entities
        return ""
    return tag.rsplit("}", 1)[-1]


def element_text(el, skip=frozenset()):
    """Concatenated text of `el`, skipping unexpanded entities and any subtree in `skip`."""
    parts = [el.text or ""]
    for child in el:
        if isinstance(child.tag, str) and local_name(child.tag) not in skip and not (
                skip and child.get("ref-type") == "bibr"):  # citation markers are noise in prose
            parts.append(element_text(child, skip))
        parts.append(child.tail or "")
    return "".join(parts)


_EMPTY_BRACKETS = re.compile(r"\s*(\[[\s,;\u2013-]*\]|\([\s,;\u2013-]*\))")


def clean(text):
    """Collapse whitespace; drop brackets left empty by removed citation markers."""
    return " ".join(_EMPTY_BRACKETS.sub("", text).split())


def sniff_kind(head):
    """'medline', 'jats' or None from the first bytes of an XML stream."""
    if b"<PubmedArticleSet" in head or b"<PubmedArticle" in head or b"<DeleteCitation" in head:
        return "medline"
    if re.search(rb"<(\w+:)?(article|pmc-articleset)[\s>]", head) or b"JATS" in head \
            or b"journalpublishing" in head.lower():
        return "jats"
    return None


def _first_year(*candidates):
    for text in candidates:
        if text:
            m = _YEAR.search(text)
            if m:
                return int(m.group(1))
    return None


# ---------------------------------------------------------------------------------------------
# MEDLINE / PubMed
# ---------------------------------------------------------------------------------------------
def parse_medline_record(el):
    """A PubmedArticle or PubmedBookArticle element -> document dict (text may be empty)."""
    if el.tag == "PubmedArticle":
        cit = el.find("MedlineCitation")
        art = cit.find("Article") if cit is not None else None
        pmid = cit.findtext("PMID") if cit is not None else None
        journal = art.findtext("Journal/Title") if art is not None else None
        date = art.find("Journal/JournalIssue/PubDate") if art is not None else None
        alt_year = art.findtext("ArticleDate/Year") if art is not None else None
    else:  # PubmedBookArticle
        art = el.find("BookDocument")
        pmid = art.findtext("PMID") if art is not None else None
        journal = art.findtext("Book/BookTitle") if art is not None else None
        date = art.find("Book/PubDate") if art is not None else None
        alt_year = None
    if art is None or not pmid:
        return None
    title_el = art.find("ArticleTitle")
    if title_el is None:
        title_el = art.find("VernacularTitle")
    title = clean(element_text(title_el)) if title_el is not None else ""
    sections = []
    for ab in art.iterfind("Abstract/AbstractText"):
        body = clean(element_text(ab))
        if not body:
            continue
        label = ab.get("Label")
        sections.append(f"{label}: {body}" if label else body)
    year = None
    if date is not None:
        year = _first_year(date.findtext("Year"), date.findtext("MedlineDate"))
    if year is None:
        year = _first_year(alt_year)
    return {
        "id": f"PMID:{pmid.strip()}",
        "source": "pubmed_abstract",
        "title": title,
        "text": "\n".join(([title] if title else []) + sections) if sections else "",
        "year": year,
        "journal": clean(journal or ""),
        "languages": [x.text.strip().lower() for x in art.findall("Language") if x.text],
        "pmid": int(pmid.strip()) if pmid.strip().isdigit() else None,
    }


def deleted_pmids(el):
    return [int(p.text.strip()) for p in el.iter("PMID") if p.text and p.text.strip().isdigit()]


# ---------------------------------------------------------------------------------------------
# PMC JATS full text
# ---------------------------------------------------------------------------------------------
def _child(el, name):
    for c in el:
        if local_name(c.tag) == name:
            return c
    return None


def _find_path(el, *names):
    for name in names:
        if el is None:
            return None
        el = _child(el, name)
    return el


def _blocks(container, out, skip=JATS_SKIP):
    """Append the prose blocks of a JATS body/abstract/sec to `out`, in document order."""
    for child in container:
        name = local_name(child.tag)
        if not name or name in skip:
            continue
        if name == "sec":
            title = _child(child, "title")
            if title is not None:
                heading = clean(element_text(title, skip))
                if heading:
                    out.append(heading)
            _blocks(child, out, skip)
        elif name in ("title", "sec-meta", "object-id"):
            continue
        elif name == "p":
            # A paragraph can hold a list or a box; their prose follows as blocks of their own.
            nested = [c for c in child if local_name(c.tag) in ("list", "boxed-text", "disp-quote")]
            text = clean(element_text(child, skip | {"list", "boxed-text", "disp-quote"}))
            if text:
                out.append(text)
            for c in nested:
                _blocks(c, out, skip)
        elif name in ("list-item", "def-item", "term", "def", "speech", "statement"):
            text_before = len(out)
            _blocks(child, out, skip)
            if len(out) == text_before:
                text = clean(element_text(child, skip))
                if text:
                    out.append(text)
        else:  # list, boxed-text, disp-quote, def-list, glossary, app, ...
            _blocks(child, out, skip)


def _abstract_blocks(abstract):
    out = []
    for child in abstract:
        name = local_name(child.tag)
        if name == "sec":
            # Structured abstracts: "Background: ..." as MEDLINE labels its sections.
            title = _child(child, "title")
            label = clean(element_text(title)) if title is not None else ""
            inner = []
            _blocks(child, inner)
            body = " ".join(inner)
            if body:
                out.append(f"{label.rstrip(':')}: {body}" if label else body)
        elif name == "p":
            text = clean(element_text(child, JATS_SKIP))
            if text:
                out.append(text)
        elif name not in ("title", "label") and isinstance(child.tag, str):
            _blocks(child, out)
    return out


def parse_jats_article(article, fallback_id=None):
    """A JATS <article> element -> document dict (text may be empty)."""
    front = _child(article, "front")
    meta = _find_path(front, "article-meta")
    ids = {}
    if meta is not None:
        for aid in meta:
            if local_name(aid.tag) == "article-id" and aid.text:
                ids[aid.get("pub-id-type", "")] = aid.text.strip()
    pmc = ids.get("pmc") or ids.get("pmcid") or ids.get("pmcaid") or fallback_id
    if pmc:
        pmc = pmc if pmc.upper().startswith("PMC") else f"PMC{pmc}"
        pmc = "PMC" + pmc[3:]
    title_el = _find_path(meta, "title-group", "article-title")
    title = clean(element_text(title_el, JATS_SKIP)) if title_el is not None else ""
    journal_meta = _find_path(front, "journal-meta")
    journal_el = _find_path(journal_meta, "journal-title-group", "journal-title")
    if journal_el is None:
        journal_el = _find_path(journal_meta, "journal-title")
    year = None
    if meta is not None:
        dates = {}
        for d in meta:
            if local_name(d.tag) == "pub-date":
                kind = d.get("pub-type") or d.get("date-type") or ""
                y = _child(d, "year")
                if y is not None and y.text:
                    dates.setdefault(kind, y.text)
        for kind in ("epub", "pub", "ppub", "collection", "epub-ppub"):
            if kind in dates:
                year = _first_year(dates[kind])
                break
        if year is None and dates:
            year = _first_year(*dates.values())
    blocks = []
    if meta is not None:
        for ab in meta:
            if local_name(ab.tag) == "abstract" and ab.get("abstract-type") in (
                    None, "", "summary", "structured", "executive-summary"):
                blocks.extend(_abstract_blocks(ab))
                break
    body = _child(article, "body")
    body_blocks = []
    if body is not None:
        _blocks(body, body_blocks)
    text_blocks = blocks + body_blocks
    lang = article.get("{http://www.w3.org/XML/1998/namespace}lang") or ""
    pmid = ids.get("pmid")
    return {
        "id": pmc,
        "source": "pmc_fulltext",
        "title": title,
        "text": "\n".join(([title] if title else []) + text_blocks) if text_blocks else "",
        "year": year,
        "journal": clean(element_text(journal_el)) if journal_el is not None else "",
        "languages": [_LANG_ALIASES.get(lang.lower(), lang.lower())] if lang else [],
        "pmid": int(pmid) if pmid and pmid.isdigit() else None,
    }


# JATS uses ISO 639-1 ("en"); MEDLINE uses 639-2 ("eng"). Filters are written in MEDLINE codes.
_LANG_ALIASES = {"en": "eng", "fr": "fre", "de": "ger", "es": "spa", "it": "ita", "pt": "por",
                 "ru": "rus", "ja": "jpn", "zh": "chi", "nl": "dut", "pl": "pol", "ko": "kor"}
