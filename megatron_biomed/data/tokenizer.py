"""The BioMedLM tokenizer: byte-level BPE trained on PubMed with Hugging Face `tokenizers`.

Defaults follow BioMedLM: vocabulary 28,896, min frequency 2, no prefix space, and
`<|endoftext|>` as the last id. The files written load in `transformers.GPT2TokenizerFast`
(tokenizer.json) and in the slow GPT-2 / Megatron GPT2BPETokenizer (vocab.json + merges.txt).
"""
import contextlib
import json
import os
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOD_TOKEN = "<|endoftext|>"


def new_bpe_tokenizer(vocab=None, merges=None):
    tok = Tokenizer(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts, vocab_size=28896, min_frequency=2, show_progress=True, length=None):
    """Train on an iterable of texts; `<|endoftext|>` is added last so it gets the last id."""
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=min_frequency, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    tok.add_special_tokens([EOD_TOKEN])
    return tok


@contextlib.contextmanager
def _rust_os_errors(path):
    """The Rust library reports I/O failures as a bare Exception('... (os error 28)'): make them
    OSErrors naming `path`, so they get the same one-line message as Python's own."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), path) from None


def save_tokenizer(tok, out_dir, model_max_length=1024):
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    os.makedirs(out_dir, exist_ok=True)
    with _rust_os_errors(out_dir):
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        tok.model.save(out_dir)  # vocab.json + merges.txt (the model vocab, without added tokens)
    vocab_path = os.path.join(out_dir, "vocab.json")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    vocab[EOD_TOKEN] = tok.token_to_id(EOD_TOKEN)  # GPT-2's vocab.json lists it too
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    config = dict(special, tokenizer_class="GPT2Tokenizer", add_prefix_space=False,
                  model_max_length=model_max_length, errors="replace",
                  add_bos_token=False, clean_up_tokenization_spaces=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def load_tokenizer(tokenizer_type, vocab_file=None, merge_file=None, tokenizer_model=None):
    """A Rust `tokenizers.Tokenizer` for Megatron's --tokenizer-type choices we support."""
    if tokenizer_type == "GPT2BPETokenizer":
        if not vocab_file or not merge_file:
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        for p in (vocab_file, merge_file):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            vocab, merges = models.BPE.read_file(vocab_file, merge_file)
            tok = new_bpe_tokenizer(vocab, merges)
        except Exception as e:  # noqa: BLE001 - the Rust library raises a bare Exception
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a matching GPT-2 BPE "
                             f"pair ({' '.join(str(e).split())}); give the vocab.json and merges.txt that "
                             f"train_tokenizer.py wrote together") from None
        if EOD_TOKEN in vocab:
            tok.add_special_tokens([EOD_TOKEN])
        return tok
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model "
                             "(a directory with tokenizer.json, or the file itself)")
        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.json not found: {path} (only local files are read)")
        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--tokenizer-model {path}: not a tokenizers JSON file ({' '.join(str(e).split())}); "
                             f"give the tokenizer.json that train_tokenizer.py wrote") from None
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                     "choose GPT2BPETokenizer or HuggingFaceTokenizer")


def eod_id(tok):
    i = tok.token_to_id(EOD_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOD_TOKEN} token, needed for --append-eod")
    return i


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode():
    """GPT-2's map from bytes to the printable characters vocab.json spells tokens with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


class BatchEncoder:
    """Encodes batches of texts to token id lists, exactly as the `tokenizers` Tokenizer does.

    For a GPT-2-style byte-level BPE whose merged tokens are numbered in merge order (what
    `train_bpe` and GPT-2 produce) it runs tiktoken's BPE, about 4x faster per core than
    `tokenizers` on PubMed-like text; BPE by merge rank and by token rank then give the same
    result (tiktoken builds its GPT-2 encoding from vocab/merges this way). Anything else, or a
    self-check mismatch, uses `tokenizers` itself.

    Special-token strings in the text are plain text, as in Megatron-LM's GPT2BPETokenizer: a
    literal "<|endoftext|>" inside an abstract is encoded as its characters, so no input can
    forge a document boundary; only the writer appends the real EOD id.
    """

    def __init__(self, tok, threads=0):
        tok.encode_special_tokens = True  # the Rust tokenizer: added tokens are not matched in text
        self.tok, self.threads = tok, threads or os.cpu_count() or 1
        self.fast = self._tiktoken_encoding(tok)

    @staticmethod
    def _tiktoken_encoding(tok):
        try:
            import tiktoken
        except ImportError:
            return None
        spec = json.loads(tok.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if (model.get("type") != "BPE" or spec.get("normalizer") is not None
                or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
                or not pre.get("use_regex", True) or model.get("dropout")
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
            return None
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        char_byte = {c: b for b, c in _bytes_to_unicode().items()}
        try:
            ranks = {bytes(char_byte[c] for c in t): i for t, i in vocab.items()}
            last = -1
            for a, b in merges:  # merged tokens must be numbered in merge order
                i = vocab[a + b]
                if i <= last:
                    return None
                last = i
        except KeyError:
            return None
        if len(ranks) != len(vocab):
            return None
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        return tiktoken.Encoding("megatron_biomed_bpe", pat_str=GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=specials)

    def self_check(self, texts):
        """Compare with `tokenizers` on sample texts; fall back to it on any difference."""
        if self.fast is not None and texts and self._encode_fast(texts) != self._encode_hf(texts):
            self.fast = None
        return self.fast is not None

    def _encode_fast(self, texts):
        # One text at a time: tiktoken's thread pool costs more per short document than it
        # saves; parallelism comes from worker processes instead.
        encode = self.fast.encode_ordinary
        return [encode(t) for t in texts]

    def _encode_hf(self, texts):
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, texts):
        if not texts:
            return []
        return self._encode_fast(texts) if self.fast is not None else self._encode_hf(texts)
