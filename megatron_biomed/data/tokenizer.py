"""The BioMedLM tokenizer: byte-level BPE trained on PubMed with Hugging Face `tokenizers`.

Defaults follow BioMedLM: vocabulary 28,896, min frequency 2, no prefix space, and
`<|endoftext|>` as the last id. The files written load in `transformers.GPT2TokenizerFast`
(tokenizer.json) and in the slow GPT-2 / Megatron GPT2BPETokenizer (vocab.json + merges.txt).
"""
import json
import os

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


def save_tokenizer(tok, out_dir, model_max_length=1024):
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    os.makedirs(out_dir, exist_ok=True)
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
        vocab, merges = models.BPE.read_file(vocab_file, merge_file)
        tok = new_bpe_tokenizer(vocab, merges)
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
        return Tokenizer.from_file(path)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                     "choose GPT2BPETokenizer or HuggingFaceTokenizer")


def eod_id(tok):
    i = tok.token_to_id(EOD_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOD_TOKEN} token, needed for --append-eod")
    return i
