"""Text generation with our GPT: a KV cache, greedy decoding or sampling with temperature,
top-k and top-p, stopping at <|endoftext|>. Greedy decoding matches transformers' `generate`."""
import sys

import torch

from megatron_biomed.model.gpt import KVCache
from megatron_biomed.errors import add_debug_flag, entry_point
from megatron_biomed.utils import clean_stale_temps


def filter_logits(logits, top_k=0, top_p=1.0):
    """-inf outside the top-k tokens and outside the smallest set whose probability exceeds top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the tokens after the nucleus is complete
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits: (rows, vocab) -> (rows,) token ids, on the logits' device. Greedy when
    temperature is 0."""
    if temperature <= 0:
        return torch.argmax(logits, -1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits: (vocab,) float. Greedy when temperature is 0."""
    return int(next_tokens(logits[None], temperature, top_k, top_p, generator)[0])


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, eos_id=None,
             generator=None):
    """Continue one prompt (a list of token ids); returns (new token ids, finish reason).
    The reason is "eos" (the returned ids end with eos_id), "length" (max_new_tokens) or
    "context" (the model's positions are used up)."""
    cfg = model.config
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token")
    if len(prompt_ids) >= cfg.seq_length:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model has {cfg.seq_length} positions")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = min(len(prompt_ids) + max_new_tokens, cfg.seq_length)
    cache = KVCache(cfg, 1, total, device, dtype)
    tokens = torch.tensor([prompt_ids], device=device)
    out = []
    for _ in range(max_new_tokens):
        logits = model(tokens, cache=cache, last_only=True)[0, -1, :cfg.vocab_size]
        token = next_token(logits, temperature, top_k, top_p, generator)
        out.append(token)
        if token == eos_id:
            return out, "eos"
        if len(out) == max_new_tokens:
            break
        if cache.length >= total:
            return out, "context"
        tokens = torch.tensor([[token]], device=device)
    return out, "length"


def decode_step(model, tokens, positions, column, key_mask, cache):
    """One new token per row with the same shapes at every step: its keys and values go into
    cache column `column` (a 1-element tensor, so a compiled step is not recompiled as it moves)
    and it attends over every column of the cache, those not written yet and the padding masked
    out by `key_mask` (rows, cache columns). Logits over the real vocabulary."""
    cache.index = column
    try:
        x = model.blocks(model.embed(tokens, positions=positions), cache=cache, mask=key_mask[:, None, :])
        return model.head(x)[:, -1, :model.config.vocab_size]
    finally:
        cache.index = None


_COMPILED = {}


def compiled_decode_step():
    """decode_step under torch.compile (fixed shapes: compiled once per batch size and length)."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(decode_step, dynamic=False)
    return _COMPILED["step"]


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, eos_id=None,
                   generator=None, static=False, compile=False):
    """Continue several prompts (lists of token ids) at once: left-padded into one batch with
    one KV cache, each row's positions counted from its own first token and its padding masked
    out of attention. A row stops at eos_id, after max_new_tokens, or when its positions run out,
    as generate() stops; the others go on. Returns [(new ids, finish reason)] in order. Greedy
    decoding gives generate()'s tokens, row for row.

    `static`: after the prompt, every step has the same shapes (decode_step: the whole cache
    read, unwritten columns masked), which `compile` runs under torch.compile."""
    static = static or compile
    cfg = model.config
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(ids) >= cfg.seq_length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model has {cfg.seq_length} positions")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = torch.tensor([len(ids) for ids in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths
    # as generate(): the last position still predicts one token
    steps = min(max_new_tokens, cfg.seq_length - int(lengths.min()) + 1)
    cache = KVCache(cfg, len(prompts), width + max(steps - 1, 0), device, dtype, padding=int(pad.max()))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        tokens[i, width - len(ids):] = torch.tensor(ids, device=device)
    columns = torch.arange(width, device=device)
    key_mask = columns[None, :] >= pad[:, None]
    positions = (columns[None, :] - pad[:, None]).clamp(min=0)
    logits = model(tokens, cache=cache, positions=positions, key_mask=key_mask,
                   last_only=True)[:, -1, :cfg.vocab_size]
    out, reasons = [[] for _ in prompts], [None] * len(prompts)
    next_position = lengths.clone()
    step, full_mask = (compiled_decode_step() if compile else decode_step), None
    for _ in range(steps):
        # all rows at once, finished ones included (their tokens are dropped): one transfer per step
        chosen = next_tokens(logits, temperature, top_k, top_p, generator)
        for i, token in enumerate(chosen.tolist()):
            if reasons[i] is None:
                out[i].append(token)
                if token == eos_id:
                    reasons[i] = "eos"
                elif len(out[i]) == max_new_tokens:
                    reasons[i] = "length"
                elif len(prompts[i]) + len(out[i]) > cfg.seq_length:
                    reasons[i] = "context"
        if all(reasons):
            break
        positions = next_position.clamp(max=cfg.seq_length - 1)[:, None]
        if static:
            if full_mask is None:  # every column of the cache; those written so far as key_mask says
                full_mask = key_mask.new_zeros(len(prompts), cache.max_length)
                full_mask[:, :key_mask.shape[1]] = key_mask
            full_mask[:, cache.length] = True
            logits = step(model, chosen[:, None], positions, torch.tensor([cache.length], device=device), full_mask,
                          cache)
            cache.length += 1
        else:
            key_mask = torch.cat([key_mask, key_mask.new_ones(len(prompts), 1)], 1)
            logits = model(chosen[:, None], cache=cache, positions=positions, key_mask=key_mask)[:, -1, :cfg.vocab_size]
        next_position += 1
    return [(ids, reason or "length") for ids, reason in zip(out, reasons)]


# -- tools/generate.py -------------------------------------------------------------------------
def build_parser():
    import argparse
    p = argparse.ArgumentParser(
        description="Generate text from our checkpoint (any TP/PP layout, loaded as one process) or a "
                    "Hugging Face GPT-2-family directory. Prompts come from --prompt or a JSONL --input; "
                    "completions are written as JSONL (one record per prompt, the input's fields kept).")
    p.add_argument("--load", required=True, help="our checkpoint root / iter_N dir, or a Hugging Face directory")
    p.add_argument("--iteration", type=int, default=None, help="our checkpoints: which iteration (default latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", default=None, help="JSONL file of prompts")
    p.add_argument("--prompt-key", default="prompt", help="the field of --input records holding the prompt")
    p.add_argument("--prompt-template", default=None,
                   help="build each prompt from the record's fields, e.g. 'Question: {question}\\nAnswer:' "
                        "(instead of --prompt-key)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts generated at once (left-padded, one KV cache); greedy output is the same as "
                        "one at a time")
    p.add_argument("--output", default="-", help="JSONL output file (default: standard output)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default when --temperature is 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep generating past <|endoftext|>")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--vocab-file", default=None, help="tokenizer vocab.json (default: the checkpoint's)")
    p.add_argument("--merge-file", default=None, help="tokenizer merges.txt")
    return add_debug_flag(p)


def fill_template(template, where, fields):
    """A --prompt-template filled from a record's fields (`\\n` as typed on a command line is a
    newline); a missing field or a malformed template is a ValueError naming `where` or the flag."""
    try:
        return template.replace("\\n", "\n").format(**fields)
    except KeyError as e:
        raise ValueError(f"{where}: no field {e.args[0]!r} for --prompt-template") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"--prompt-template {template!r}: {e}; name the fields, e.g. {{question}}") from None


def _prompts(args):
    """(record, prompt text) pairs from --prompt and --input."""
    from megatron_biomed.utils import iter_json_objects
    for text in args.prompt:
        yield {args.prompt_key: text}, text
    if args.input:
        for line_no, record in iter_json_objects(args.input):
            if args.prompt_template is not None:
                text = fill_template(args.prompt_template, f"{args.input}:{line_no}", record)
            elif isinstance(record.get(args.prompt_key), str):
                text = record[args.prompt_key]
            else:
                raise ValueError(f"{args.input}:{line_no}: no string field {args.prompt_key!r}")
            yield record, text


def load_for_inference(load, device="auto", dtype="fp32", vocab_file=None, merge_file=None, iteration=None):
    """(our GPT in eval mode, its tokenizers.Tokenizer) from our checkpoint (any layout) or a
    Hugging Face directory, as one process."""
    from megatron_biomed.checkpoint.layout import detect_format
    from megatron_biomed.convert.ours import build_model, verified_reads
    from megatron_biomed.convert.storage import CheckpointFormatError
    from megatron_biomed.data.tokenizer import load_tokenizer
    fmt = detect_format(load)
    if fmt == "hf":
        from megatron_biomed.convert.hf import HFSource
        source = HFSource(load)
    elif fmt == "megatron_biomed":
        from megatron_biomed.convert.ours import OursSource
        source = OursSource(load, iteration, verify="background")  # checked while the weights load
    else:
        raise CheckpointFormatError(f"--load {load}: convert a {fmt} checkpoint first (tools/convert_checkpoint.py)")
    if vocab_file or merge_file:
        tok = load_tokenizer("GPT2BPETokenizer", vocab_file, merge_file)
    else:
        tok = source.tokenizer()
    if tok is None:
        raise CheckpointFormatError(f"--load {load}: no tokenizer with the checkpoint; pass --vocab-file and "
                                    f"--merge-file")
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with verified_reads(source):
        model = build_model(source, device, dtype)
    return model, tok


@entry_point
def main(argv=None):
    import contextlib
    import json
    import sys

    from megatron_biomed.convert.storage import CheckpointFormatError
    from megatron_biomed.data.tokenizer import EOD_TOKEN
    from megatron_biomed.utils import atomic_output
    args = build_parser().parse_args(argv)
    for out in (getattr(args, "output", None), getattr(args, "metrics_file", None)):
        if out and out != "-":
            clean_stale_temps(out)
    if not args.prompt and not args.input:
        print("error: give --prompt or --input", file=sys.stderr)
        return 2
    try:
        model, tok = load_for_inference(args.load, args.device, args.dtype, args.vocab_file, args.merge_file,
                                        args.iteration)
        device = next(model.parameters()).device
        eos = None if args.no_stop_at_eos else tok.token_to_id(EOD_TOKEN)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        temperature = 0.0 if args.greedy else args.temperature
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: give 1 or more")
        records = list(_prompts(args))
        out = sys.stdout if args.output == "-" else None
        with (atomic_output(args.output, "w", encoding="utf-8") if out is None else contextlib.nullcontext(out)) as f:
            for start in range(0, len(records), args.batch_size):
                batch, prompts = records[start:start + args.batch_size], []
                for _, text in batch:
                    ids = tok.encode(text).ids
                    if len(ids) >= model.config.seq_length:  # keep the end: it is what gets continued
                        print(f"warning: prompt of {len(ids)} tokens cut to its last {model.config.seq_length - 1}",
                              file=sys.stderr)
                        ids = ids[-(model.config.seq_length - 1):]
                    prompts.append(ids)
                if len(prompts) == 1:
                    results = [generate(model, prompts[0], args.max_new_tokens, temperature, args.top_k, args.top_p,
                                        eos, generator)]
                else:
                    results = generate_batch(model, prompts, args.max_new_tokens, temperature, args.top_k,
                                             args.top_p, eos, generator)
                for (record, _), ids, (new, reason) in zip(batch, prompts, results):
                    text = tok.decode(new[:-1] if reason == "eos" else new)
                    f.write(json.dumps(dict(record, completion=text, prompt_tokens=len(ids),
                                            completion_tokens=len(new), finish_reason=reason),
                                       ensure_ascii=False) + "\n")
                f.flush()
    except (CheckpointFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
