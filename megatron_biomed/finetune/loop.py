"""What fine-tuning for classification (finetune/trainer.py) and for answers (finetune/patient_qa.py)
share: the model and tokenizer from --load, the optimizer and its schedule, gradient reduction,
the --save directory (apart from --load, one run at a time), and checks on the data splits."""
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_biomed.checkpoint import run_lock
from megatron_biomed.errors import UserError
from megatron_biomed.parallel import parallelize as P
from megatron_biomed.training.checkpoint import agree
from megatron_biomed.utils import atomic_output, print0


def fit_vocab_rows(weights, rows, vocab_size):
    """The embedding (and the tied output layer) padded for this TP size, as pretraining's --load
    does: the real vocabulary's rows kept, padding rows zero (the model masks them out)."""
    from megatron_biomed.convert.ours import pad_rows
    out = dict(weights)
    for key in ("wte.weight", "lm_head.weight"):
        w = out.get(key)
        if w is not None and w.shape[0] != rows:
            out[key] = pad_rows(w[:vocab_size], rows)
    return out


def build_optimizer(params, args):
    """AdamW as Hugging Face's Trainer sets it up (no decay on biases and LayerNorms)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_schedule(lr, total_steps, warmup_ratio):
    """(step -> learning rate, warmup steps): linear warmup, then linear decay to 0."""
    warmup = max(1, int(warmup_ratio * total_steps))
    return (lambda step: lr * (step / warmup if step <= warmup else
                               max(0.0, (total_steps - step) / max(1, total_steps - warmup)))), warmup


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def reduce_and_clip(params, mesh, dp, clip_grad, device):
    """Average gradients over data parallelism and clip them by their global norm."""
    P.match_grad_placements(params)
    if dp > 1:
        P.average_gradients(params, mesh["dp"].get_group(), dp)
    norm = P.grad_square_sum(params, device).sqrt()
    P.clip_gradients(params, clip_grad, norm)
    return float(norm)


def prepare_save_dir(args):
    """Collective, at start: --save apart from --load and this run's alone (rank 0 holds its lock
    until the process ends); what a killed run left there is removed."""
    save = args.save
    run_lock.check_apart(args.load, save)
    error = None
    if dist.get_rank() == 0:
        try:
            run_lock.acquire(save, tool="fine-tuning run")
        except (OSError, UserError) as e:
            error = e
    agree(error)  # every rank raises the holder's line, as pretraining's start does
    if dist.get_rank() == 0:
        for leftover in ("best.tmp", "best.old"):  # a killed run's; this run writes best/ anew
            path = os.path.join(save, leftover)
            if os.path.exists(path):
                shutil.rmtree(path, ignore_errors=True)
                print0(f"removed {path}: left by an interrupted run")
    dist.barrier()


def write_text(path, text):
    with atomic_output(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_model(args):
    """(tokenizer, model config with the dropout overrides, full weights or None) for --load
    (our checkpoint or a Hugging Face directory) or a randomly initialised --model preset."""
    from megatron_biomed.config import preset
    from megatron_biomed.data.tokenizer import load_tokenizer
    if args.load:
        from megatron_biomed.generation import load_for_inference
        model, tok = load_for_inference(args.load, "cpu", "fp32", args.vocab_file, args.merge_file)
        cfg, weights = model.config, model.state_dict()
        del model
    else:
        tok = load_tokenizer("GPT2BPETokenizer", args.vocab_file, args.merge_file)
        cfg, weights = preset(args.model, vocab_size=tok.get_vocab_size()), None
    overrides = {k: getattr(args, k) for k in ("hidden_dropout", "attention_dropout") if getattr(args, k) is not None}
    cfg = cfg.replace(**overrides)
    if args.max_length > cfg.seq_length:
        print0(f"note: --max-length {args.max_length} is more than the model's {cfg.seq_length} positions: "
               f"using {cfg.seq_length}")
        args.max_length = cfg.seq_length
    return tok, cfg, weights





def _normalised(text):
    return " ".join(re.findall(r"\w+", text.lower()))


def check_splits(splits, question_of):
    """Warn about what makes a dev or test score mean less than it seems: ids repeated within a
    file, and dev/test questions that also occur (after lower-casing and dropping punctuation) in
    the training file. `splits`: {name: (path, examples)}; returns the counts for metrics.json."""
    counts = {"duplicate_ids": {}, "in_train": {}}
    for name, (path, examples) in splits.items():
        seen, repeated = set(), []
        for e in examples:
            if e.id in seen:
                repeated.append(e.id)
            seen.add(e.id)
        counts["duplicate_ids"][name] = len(repeated)
        if repeated:
            print0(f"warning: {path}: {len(repeated)} record(s) repeat an id of an earlier record (e.g. "
                   f"{', '.join(map(str, sorted(set(repeated))[:3]))}); predictions are matched by id, so give "
                   f"each record its own")
    if "train" not in splits:
        return counts
    train = {_normalised(question_of(e)) for e in splits["train"][1]}
    for name in ("valid", "test"):
        if name not in splits:
            continue
        path, examples = splits[name]
        shared = [e.id for e in examples if _normalised(question_of(e)) in train]
        counts["in_train"][name] = len(shared)
        if shared:
            print0(f"warning: {path}: {len(shared)} of {len(examples)} {name} question(s) also occur in "
                   f"--train-data {splits['train'][0]} (e.g. id {shared[0]}); the {name} score overstates how "
                   f"well the model generalises: remove them from one side")
    return counts
