"""Offline sentence splitting: Punkt trained on the corpus itself, stored as plain JSON.

nltk's `sent_tokenize` loads punkt data downloaded at run time; we instead learn the Punkt
parameters (abbreviations such as "i.v." or "et al.", collocations, sentence starters) from the
same PubMed text the tokenizer is trained on, and save them as JSON - never a pickle.
"""
import json

from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer, PunktTrainer

from megatron_biomed.errors import UserError

SPLITTER_FILE = "sentence_splitter.json"
FORMAT = "megatron_biomed.punkt/1"


def train_splitter(texts, max_chars=50_000_000):
    """Learn Punkt parameters from an iterable of texts (up to `max_chars` characters)."""
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    seen, batch, batch_chars = 0, [], 0
    for text in texts:
        batch.append(text)
        batch_chars += len(text)
        seen += len(text)
        if batch_chars >= 1_000_000:
            trainer.train("\n\n".join(batch), finalize=False)
            batch, batch_chars = [], 0
        if seen >= max_chars:
            break
    if batch:
        trainer.train("\n\n".join(batch), finalize=False)
    trainer.finalize_training()
    return trainer.get_params()


def save_splitter(params, path):
    data = {
        "format": FORMAT,
        "abbrev_types": sorted(params.abbrev_types),
        "collocations": sorted([a, b] for a, b in params.collocations),
        "sent_starters": sorted(params.sent_starters),
        "ortho_context": dict(sorted(params.ortho_context.items())),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=0)


def load_splitter(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a megatron_biomed sentence splitter file")
    params = PunktParameters()
    params.abbrev_types = set(data["abbrev_types"])
    params.collocations = {tuple(x) for x in data["collocations"]}
    params.sent_starters = set(data["sent_starters"])
    for k, v in data["ortho_context"].items():
        params.ortho_context[k] = v
    return SentenceSplitter(PunktSentenceTokenizer(params))


class SentenceSplitter:
    """Splits at line breaks (paragraphs in our documents) and at Punkt sentence boundaries."""

    def __init__(self, punkt):
        self.punkt = punkt

    def split(self, text, keep_newlines=False):
        """Sentences of `text`. With keep_newlines each sentence keeps the whitespace after it,
        so that "".join(sentences) == text."""
        spans = []
        start = 0
        for line in text.split("\n"):
            for s, e in self.punkt.span_tokenize(line):
                spans.append((start + s, start + e))
            start += len(line) + 1
        if not keep_newlines:
            return [text[s:e] for s, e in spans]
        if not spans:
            return [text] if text else []
        out = []
        for i, (s, e) in enumerate(spans):
            s = 0 if i == 0 else s
            e = spans[i + 1][0] if i + 1 < len(spans) else len(text)
            out.append(text[s:e])
        return out


class _KeepWhitespaceVars(PunktLanguageVars):
    """Megatron-LM's CustomLanguageVars (tools/preprocess_data.py): the whitespace after a
    sentence end stays with the sentence, so --keep-newlines loses no newline."""

    _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""


class NltkSplitter:
    """NLTK's pretrained Punkt model for a language (`--lang`), applied exactly as Megatron-LM's
    preprocess_data.py does: the text in slices of 1,000,000 characters, each split by Punkt
    on its own. The model is read from the local NLTK data (`punkt_tab`); nothing is downloaded."""

    SLICE = 1_000_000

    def __init__(self, lang, keep_newlines=False):
        from nltk.tokenize.punkt import PunktTokenizer
        try:
            punkt = PunktTokenizer(lang)
        except (LookupError, ValueError, TypeError):
            raise SplitterNotFound(
                f"--lang {lang}: NLTK's Punkt model for {lang!r} is not installed here (no "
                f"tokenizers/punkt_tab/{lang} in the NLTK data path); install it once with "
                f"`python -m nltk.downloader punkt_tab` (set NLTK_DATA on a cluster), or pass "
                f"--sentence-splitter FILE (tools/train_tokenizer.py writes one)") from None
        self.punkt = (PunktSentenceTokenizer(train_text=punkt._params, lang_vars=_KeepWhitespaceVars())
                      if keep_newlines else punkt)

    def split(self, text, keep_newlines=False):
        n = self.SLICE
        return [s for i in range(0, len(text), n) for s in self.punkt.tokenize(text[i:i + n])]


class SplitterNotFound(UserError):
    pass
