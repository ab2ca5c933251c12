"""Generative fine-tuning: teach the GPT to write answers to (patient) questions.

Inputs, told apart by their fields (every record of a file must have the same kind):
  question/answer         {"question": ..., "answer": ...}
  prompt/completion       {"prompt": ..., "completion": ...}   (the prompt is used as written)
  Alpaca                  {"instruction": ..., "input": ..., "output": ...}
  chat                    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  MedQuAD                 a directory of its XML documents, as NIH publishes them
                          (Document > QAPairs > QAPair > Question[qtype] + Answer)

A question goes through --prompt-template (`{question}` and any field of the record), the answer
follows after a space and ends with <|endoftext|> (added as a token, so no text can
forge it). Only answer tokens (every assistant turn of a
chat) carry loss. A pair longer than --max-length is skipped and counted, never cut: a cut
answer would teach the model to stop mid-sentence.
"""
import collections
import glob
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_biomed.finetune.loop import (build_optimizer, check_splits, fit_vocab_rows, load_model,
                                           lr_schedule, prepare_save_dir, reduce_and_clip, set_lr, write_text)
from megatron_biomed.finetune.tasks import TaskFormatError, _read_json_or_lines
from megatron_biomed.model.loss import cross_entropy
from megatron_biomed.parallel.tensor_parallel import IGNORE_INDEX

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
FORMATS = {"question/answer": ("question", "answer"), "prompt/completion": ("prompt", "completion"),
           "Alpaca": ("instruction", "output"), "chat": ("messages",)}


@dataclass
class QAExample:
    id: str
    # (text, trained): the prompt's pieces are not trained; the answers' are, each followed by
    # <|endoftext|>
    segments: list = field(default_factory=list)
    record: dict = field(default_factory=dict)  # the input's fields, kept in the outputs

    @property
    def prompt(self):
        """Everything before the last answer: what generation continues."""
        last = max(i for i, (_, trained) in enumerate(self.segments) if trained)
        return "".join(text for text, _ in self.segments[:last])

    @property
    def reference(self):
        return next(text for text, trained in reversed(self.segments) if trained).strip()


def _answer(prompt, text):
    """The answer as it follows its prompt: after a space unless the prompt ends in one."""
    return text if not prompt or prompt[-1].isspace() or text[:1].isspace() else " " + text


def _render(template, where, question, record):
    from megatron_biomed.generation import fill_template
    try:
        return fill_template(template, where, dict(record, question=question))
    except ValueError as e:
        raise TaskFormatError(str(e)) from None


def _kind(record):
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            return name
    return None


def _text(record, key, where, allow_empty=False):
    value = record.get(key)
    if not isinstance(value, str):
        raise TaskFormatError(f"{where}: field {key!r} should be a string, found {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise TaskFormatError(f"{where}: field {key!r} is empty")
    return value


def example_from_record(record, where, template):
    """One QAExample from a JSON record of any of the FORMATS."""
    kind = _kind(record)
    rid = str(record.get("id", where.rsplit(":", 1)[-1]))
    if kind == "chat":
        return _chat_example(record, where, template, rid)
    if kind is None:
        raise TaskFormatError(f"{where}: no question/answer, prompt/completion, instruction/output (Alpaca) or "
                              f"messages (chat) fields; found {', '.join(sorted(record)) or 'none'}")
    if kind == "prompt/completion":
        prompt = _text(record, "prompt", where)
        if template is not None:
            prompt = _render(template, where, prompt, record)
        answer = _text(record, "completion", where)
    else:
        if kind == "question/answer":
            question, answer = _text(record, "question", where), _text(record, "answer", where)
        else:  # Alpaca: the input, when there is one, follows the instruction
            question = _text(record, "instruction", where)
            extra = _text(record, "input", where, allow_empty=True) if "input" in record else ""
            question = question + ("\n\n" + extra if extra.strip() else "")
            answer = _text(record, "output", where)
        prompt = _render(template or DEFAULT_TEMPLATE, where, question, record)
    return QAExample(rid, [(prompt, False), (_answer(prompt, answer), True)], record)


def _chat_example(record, where, template, rid):
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise TaskFormatError(f"{where}: 'messages' should be a non-empty list of {{role, content}} objects")
    segments, prompt = [], ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise TaskFormatError(f"{where}: message {i} should be {{\"role\": \"system\"|\"user\"|\"assistant\", "
                                  f"\"content\": \"...\"}}")
        if m["role"] == "system":
            segments.append((m["content"] + "\n\n", False))
        elif m["role"] == "user":
            segments.append((_render(template or DEFAULT_TEMPLATE, where, m["content"], record), False))
        else:
            prompt = segments[-1][0] if segments else ""
            segments.append((_answer(prompt, m["content"]), True))
    if not segments[-1][1]:
        raise TaskFormatError(f"{where}: the conversation should end with an assistant message (the answer "
                              f"to learn)")
    return QAExample(rid, segments, record)


def read_medquad(directory, template):
    """QAExamples from MedQuAD's XML documents under `directory` (sorted, recursively), and the
    number of pairs skipped for an empty answer (MedQuAD publishes some collections without
    their answers)."""
    from lxml import etree

    from megatron_biomed.data.pubmed_xml import SAFE_PARSE, element_text
    files = sorted(glob.glob(os.path.join(directory, "**", "*.xml"), recursive=True))
    if not files:
        raise TaskFormatError(f"{directory}: no .xml files; give MedQuAD's directory (its XML documents) or a "
                              f"JSON lines file")
    parser = etree.XMLParser(**SAFE_PARSE)
    out, empty = [], 0
    for path in files:
        try:
            root = etree.parse(path, parser).getroot()
        except etree.XMLSyntaxError as e:
            raise TaskFormatError(f"{path}:{e.lineno}: not well-formed XML ({e.msg})") from None
        if root.tag != "Document":
            raise TaskFormatError(f"{path}:{root.sourceline}: expected a MedQuAD <Document>, found <{root.tag}>")
        doc_id, focus = root.get("id", os.path.basename(path)[:-4]), root.findtext("Focus", "").strip()
        for pair in root.iterfind("QAPairs/QAPair"):
            q, a = pair.find("Question"), pair.find("Answer")
            if q is None:
                raise TaskFormatError(f"{path}:{pair.sourceline}: <QAPair> without a <Question>")
            question = " ".join(element_text(q).split())
            # MedQuAD answers are indented across lines: keep the lines, drop the indentation
            answer = "\n".join(" ".join(line.split()) for line in (element_text(a) if a is not None else "")
                               .splitlines() if line.strip())
            if not answer:
                empty += 1
                continue
            if not question:
                raise TaskFormatError(f"{path}:{q.sourceline}: empty <Question>")
            record = {"id": q.get("qid") or f"{doc_id}-{pair.get('pid')}", "question": question, "answer": answer,
                      "qtype": q.get("qtype", ""), "focus": focus, "document": doc_id, "url": root.get("url", "")}
            prompt = _render(template or DEFAULT_TEMPLATE, f"{path}:{q.sourceline}", question, record)
            out.append(QAExample(record["id"], [(prompt, False), (_answer(prompt, answer), True)], record))
    return out, empty


def read_patient_qa(path, template=None):
    """(examples, {"format": ..., "empty_answers": n}) from a JSON lines file (or one JSON
    array) or a MedQuAD directory."""
    if os.path.isdir(path):
        examples, empty = read_medquad(path, template)
        return examples, {"format": "MedQuAD", "empty_answers": empty}
    kind, value = _read_json_or_lines(path)
    records = list(enumerate(value, 1)) if kind == "json" and isinstance(value, list) else \
        value if kind == "lines" else [(1, value)]
    examples, first = [], None
    for n, record in records:
        where = f"{path}: record {n}" if isinstance(value, list) and kind == "json" else f"{path}:{n}"
        if not isinstance(record, dict):
            raise TaskFormatError(f"{where}: expected a JSON object (JSON lines: one object per line)")
        this = _kind(record)
        first = first or this
        if this is not None and this != first:
            raise TaskFormatError(f"{where}: a {this} record in a file of {first} records; give one kind per file")
        examples.append(example_from_record(record, where, template))
    return examples, {"format": first, "empty_answers": 0}


def encode(tok, example, max_length, eos_id):
    """(token ids, labels): labels are the ids on answer tokens (and the <|endoftext|> after
    each answer) and IGNORE_INDEX elsewhere; None when the pair does not fit max_length."""
    tok.encode_special_tokens = True  # "<|endoftext|>" typed in a record is text, not the marker
    ids, labels = [], []
    for text, trained in example.segments:
        piece = tok.encode(text).ids + ([eos_id] if trained else [])
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return (ids, labels) if len(ids) <= max_length else None


def encode_all(tok, examples, max_length, eos_id):
    """(kept examples, their encodings, number skipped for length)."""
    kept, encoded = [], []
    for e in examples:
        enc = encode(tok, e, max_length, eos_id)
        if enc is not None:
            kept.append(e)
            encoded.append(enc)
    return kept, encoded, len(examples) - len(kept)


def collate(encoded, pad_id):
    """Right-padded (tokens, targets): targets are the next token's label (IGNORE_INDEX on
    prompts and padding)."""
    width = max(len(ids) for ids, _ in encoded) - 1
    tokens = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    targets = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(encoded):
        tokens[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, :len(ids) - 1] = torch.tensor(labels[1:])
    return tokens, targets


def answer_tokens(encoded):
    return sum(sum(1 for t in labels[1:] if t != IGNORE_INDEX) for _, labels in encoded)


def rouge_l(predictions, references):
    """Mean ROUGE-L F1 (rouge-score's tokenizer: lower-cased alphanumeric words) and each pair's."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    each = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return (sum(each) / len(each) if each else 0.0), each


class _GatheredLogits:
    """generate_batch's view of a tensor-parallel GPT: each step's vocabulary shards gathered."""

    def __init__(self, gpt, group):
        self.gpt, self.config, self.group = gpt, gpt.config, group

    def parameters(self):
        return self.gpt.parameters()

    def __call__(self, tokens, **kw):
        from megatron_biomed.model.gpt import mask_padded_vocab
        shard = self.gpt(tokens, **kw).contiguous()
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, shard, group=self.group)
        return mask_padded_vocab(torch.cat(parts, -1), self.config.vocab_size)


class AnswerTuner:
    """The GPT (tensor-parallel over the mesh's tp dimension, data-parallel over dp) trained on
    answer tokens."""

    def __init__(self, args, tok, cfg, weights, device, mesh):
        from megatron_biomed.model.gpt import GPT
        self.args, self.tok, self.device, self.mesh = args, tok, device, mesh
        self.tp = args.tensor_model_parallel_size
        self.dp, self.dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
        self.tp_group, self.tp_rank = mesh["tp"].get_group(), mesh["tp"].get_local_rank()
        torch.manual_seed(args.seed)
        gpt = GPT(cfg, tensor_parallel_size=self.tp)
        if weights is not None:
            gpt.load_state_dict(fit_vocab_rows(weights, gpt.wte.weight.shape[0], cfg.vocab_size))
        gpt = gpt.to(device)
        if self.tp > 1:
            from megatron_biomed.parallel.tensor_parallel import apply_tensor_parallel
            apply_tensor_parallel(gpt, mesh["tp"])
        self.model = gpt
        self.params = [p for p in gpt.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, args)
        from megatron_biomed.data.tokenizer import EOD_TOKEN
        self.eos_id = tok.token_to_id(EOD_TOKEN)
        self.pad_id = self.eos_id or 0
        torch.manual_seed(args.seed + 1)  # dropout: the same stream on every rank of a step

    def _autocast(self):
        import contextlib
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.bf16 else contextlib.nullcontext()

    def token_losses(self, tokens, targets):
        """Per-token answer losses (0 off the answers), the vocabulary sharded under TP."""
        g = self.model
        with self._autocast():
            logits = g.head(g.blocks(g.embed(tokens.to(self.device))))
        return cross_entropy(logits, targets.to(self.device), g.config.vocab_size,
                             self.tp_group if self.tp > 1 else None, self.tp_rank * logits.shape[-1])

    def train_epoch(self, encoded, epoch, step, schedule):
        a = self.args
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(a.seed + epoch)).tolist()
        per = a.global_batch_size // self.dp
        losses = []
        self.model.train()
        for start in range(0, len(order) - a.global_batch_size + 1, a.global_batch_size):
            batch = [encoded[i] for i in order[start:start + a.global_batch_size]]
            count = answer_tokens(batch)  # every rank knows the whole global batch's count
            step += 1
            set_lr(self.optimizer, schedule(step))
            self.optimizer.zero_grad(set_to_none=True)
            local = self.token_losses(*collate(batch[self.dp_rank * per:(self.dp_rank + 1) * per], self.pad_id)).sum()
            # the mean over the global batch's answer tokens after the data-parallel average
            (local * (self.dp / count)).backward()
            reduce_and_clip(self.params, self.mesh, self.dp, a.clip_grad, self.device)
            self.optimizer.step()
            value = local.detach().clone()
            if self.dp > 1:
                dist.all_reduce(value, group=self.mesh["dp"].get_group())
            losses.append(float(value) / count)
        return step, losses

    @torch.no_grad()
    def answer_loss(self, encoded):
        """Mean loss per answer token over `encoded` (every rank computes all of it)."""
        self.model.eval()
        total = 0.0
        for start in range(0, len(encoded), self.args.eval_batch_size):
            total += float(self.token_losses(*collate(encoded[start:start + self.args.eval_batch_size],
                                                      self.pad_id)).sum())
        self.model.train()
        return total / max(1, answer_tokens(encoded))

    @torch.no_grad()
    def generate(self, examples):
        """Greedy answers to the examples' prompts (every rank generates all of them)."""
        from megatron_biomed.generation import generate_batch
        self.model.eval()
        model = _GatheredLogits(self.model, self.tp_group) if self.tp > 1 else self.model
        cfg, out = self.model.config, []
        for start in range(0, len(examples), self.args.eval_batch_size):
            prompts = [self.tok.encode(e.prompt).ids[-(cfg.seq_length - 1):]
                       for e in examples[start:start + self.args.eval_batch_size]]
            with self._autocast():
                results = generate_batch(model, prompts, self.args.max_new_tokens, eos_id=self.eos_id)
            out += [self.tok.decode(ids[:-1] if reason == "eos" else ids).strip() for ids, reason in results]
        self.model.train()
        return out

    def evaluate(self, examples, encoded):
        loss = self.answer_loss(encoded)
        generated = self.generate(examples)
        score, each = rouge_l(generated, [e.reference for e in examples])
        import math
        metrics = {"answer_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rougeL": score}
        rows = [dict(e.record, id=e.id, prompt=e.prompt, reference=e.reference, generated=g, rougeL=s)
                for e, g, s in zip(examples, generated, each)]
        return metrics, rows


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run(args, device):
    """The patient_qa task of tools/finetune.py (the process group already joined)."""
    import time

    from megatron_biomed.config import ParallelConfig
    from megatron_biomed.data.tokenizer import EOD_TOKEN, save_tokenizer
    from megatron_biomed.parallel.mesh import build_mesh
    from megatron_biomed.training import checkpoint as ckpt
    from megatron_biomed.utils import print0
    t0 = time.time()
    read = {}
    for split, path in (("train", args.train_data), ("valid", args.valid_data), ("test", args.test_data)):
        if path is not None:  # read first: a bad file fails before the model loads
            read[split] = (path, *read_patient_qa(path, args.prompt_template))
    prepare_save_dir(args)
    data_checks = check_splits({split: (path, examples) for split, (path, examples, _) in read.items()},
                               lambda e: e.prompt)
    tok, cfg, weights = load_model(args)
    data, skipped = {}, collections.Counter()
    for split, (path, examples, info) in read.items():
        kept, encoded, too_long = encode_all(tok, examples, args.max_length, tok.token_to_id(EOD_TOKEN))
        skipped[f"{split}_too_long"] = too_long
        skipped[f"{split}_empty_answers"] = info["empty_answers"]
        if not kept:
            raise TaskFormatError(f"{path}: no {split} pairs" + (
                f" that fit --max-length {args.max_length} ({too_long} are longer: raise it)" if too_long else ""))
        data[split] = (kept, encoded)
        print0(f"{split}: {len(kept)} {info['format']} pairs from {path}" +
               (f"; skipped {too_long} longer than --max-length {args.max_length} (answers are never cut)"
                if too_long else "") +
               (f"; skipped {info['empty_answers']} with an empty answer" if info["empty_answers"] else ""))
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size)
    parallel.validate(cfg, dist.get_world_size())
    mesh = build_mesh(parallel, device.type)
    if args.global_batch_size % mesh["dp"].size():
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the data-parallel "
                         f"size {mesh['dp'].size()}")
    tuner = AnswerTuner(args, tok, cfg, weights, device, mesh)
    train, valid = data["train"], data["valid"]
    steps_per_epoch = len(train[0]) // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train[0])} training pairs are fewer than --global-batch-size {args.global_batch_size}")
    total = steps_per_epoch * args.epochs
    schedule, warmup = lr_schedule(args.lr, total, args.warmup_ratio)
    print0(f"fine-tuning to answer questions on {len(train[0])} pairs: {args.epochs} epochs x {steps_per_epoch} steps, "
           f"warmup {warmup}, world {dist.get_world_size()} (tp {args.tensor_model_parallel_size}, dp {tuner.dp}); "
           f"loss on answer tokens only")
    layout = {"tp": args.tensor_model_parallel_size, "pp": 1}
    model_config = {"model": dict(preset=None, **vars(cfg)), "vocab_file": None, "merge_file": None}
    best_root = os.path.join(args.save, "best")

    def line(m):
        return f"dev answer loss {m['answer_loss']:.4f} | perplexity {m['perplexity']:.2f} | ROUGE-L {m['rougeL']:.4f}"

    m, rows = tuner.evaluate(*valid)
    history = [{"epoch": 0, "valid": m}]
    print0(f" before fine-tuning | {line(m)}")
    if dist.get_rank() == 0:
        write_text(os.path.join(args.save, "valid_generations_before.jsonl"), _jsonl(rows))
    best, step = None, 0
    for epoch in range(1, args.epochs + 1):
        step, losses = tuner.train_epoch(train[1], epoch, step, schedule)
        m, rows = tuner.evaluate(*valid)
        train_loss = sum(losses) / len(losses)
        history.append({"epoch": epoch, "train_loss": train_loss, "valid": m})
        print0(f" epoch {epoch}/{args.epochs} | train answer loss {train_loss:.4f} | {line(m)}")
        if best is None or m["rougeL"] > best["valid"]["rougeL"]:
            if best is None and dist.get_rank() == 0 and os.path.isdir(best_root):
                print0(f"replacing {best_root} of an earlier run")
                shutil.rmtree(best_root)
            best = {"epoch": epoch, "valid": m}
            if dist.get_rank() == 0:  # the tokenizer beside the weights: the checkpoint converts alone
                save_tokenizer(tok, os.path.join(best_root, "tokenizer"), cfg.seq_length)
            ckpt.save(best_root, epoch, tuner.model, None, None, model_config, 0, layout, keep_last=1)
            if dist.get_rank() == 0:
                write_text(os.path.join(args.save, "valid_generations.jsonl"), _jsonl(rows))
    result = {"task": args.task, "best_epoch": best["epoch"], "best_by": "dev ROUGE-L", "valid": best["valid"],
              "history": history, "skipped": dict(skipped), "data_checks": data_checks}
    if "test" in data:
        ckpt.load(best_root, tuner.model, None, None, layout, load_optim=False, load_rng=False)
        result["test"], rows = tuner.evaluate(*data["test"])
        if dist.get_rank() == 0:
            write_text(os.path.join(args.save, "test_generations.jsonl"), _jsonl(rows))
        print0(f" test (best dev epoch {best['epoch']}) | {line(result['test'])}")
    if dist.get_rank() == 0:
        write_text(os.path.join(args.save, "metrics.json"), json.dumps(result, indent=2))
    print0(f"done in {time.time() - t0:.0f} s: best dev ROUGE-L {best['valid']['rougeL']:.4f} at epoch {best['epoch']}; "
           f"weights in {best_root} (tools/convert_checkpoint.py --load {best_root} releases them), "
           f"{args.save}/metrics.json")
    return result
