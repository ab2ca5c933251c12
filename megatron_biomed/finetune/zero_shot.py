"""Zero-/few-shot scoring of a pretrained checkpoint, the way lm-eval-harness scores these tasks:
each answer is a continuation of the prompt; its log-likelihood (summed over its tokens) picks
the prediction (`acc`), and the same divided by the answer's length in bytes (`acc_norm`).

Prompts: multiple choice "Question: {q}\\nAnswer:" + " {option}"; classification
"Abstract: {c}\\nQuestion: {q}\\nAnswer:" + " yes" / " no" / " maybe" (lm-eval's PubMedQA
prompt). k-shot prompts prepend k solved examples separated by a blank line. Inputs longer than
the model are cut from the left, so the end of the prompt and the whole answer are always scored.
"""
import math

import torch
import torch.nn.functional as F


def prompt(example):
    if example.is_multiple_choice:
        return f"Question: {example.question}\nAnswer:"
    return f"Abstract: {example.context}\nQuestion: {example.question}\nAnswer:"


def continuations(example):
    return [" " + c for c in (example.options or example.labels)]


def fewshot_prefix(shots):
    return "".join(prompt(s) + continuations(s)[s.label] + "\n\n" for s in shots)


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) as lm-eval splits them: the whole string is encoded and
    the continuation is what follows the context's own encoding."""
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    if whole[:len(ctx)] != ctx:  # a merge across the boundary: encode the parts separately
        return ctx, tok.encode(continuation).ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprob(model, ctx_ids, cont_ids):
    """Sum of log p(continuation token | everything before it)."""
    max_len = model.config.seq_length + 1  # predictions need one token of lookahead
    ids = (ctx_ids + cont_ids)[-max_len:]
    if len(cont_ids) >= len(ids):
        raise ValueError(f"an answer of {len(cont_ids)} tokens does not fit {model.config.seq_length} positions")
    device = next(model.parameters()).device
    x = torch.tensor([ids[:-1]], device=device)
    logits = model(x)[0, :, :model.config.vocab_size].float()
    logp = F.log_softmax(logits, -1)
    n = len(cont_ids)
    targets = torch.tensor(ids[-n:], device=device)
    return float(logp[-n:].gather(1, targets[:, None]).sum())


def score_example(model, tok, example, prefix=""):
    """(log-likelihood of each answer, the same per byte of the answer)."""
    context = prefix + prompt(example)
    lls, norms = [], []
    for cont in continuations(example):
        ctx_ids, cont_ids = encode_pair(tok, context, cont)
        ll = continuation_logprob(model, ctx_ids, cont_ids)
        lls.append(ll)
        norms.append(ll / max(1, len(cont.encode("utf-8"))))
    return lls, norms


def macro_f1(gold, pred, num_classes):
    f1s = []
    for c in range(num_classes):
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / num_classes


def metrics(examples, predictions, key="pred"):
    """accuracy, per-subject accuracy, and macro-F1 for classification tasks."""
    gold = [e.label for e in examples]
    pred = [p[key] for p in predictions]
    out = {"n": len(examples), "accuracy": sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold))}
    subjects = sorted({e.subject for e in examples if e.subject})
    if subjects:
        out["per_subject"] = {}
        for s in subjects:
            idx = [i for i, e in enumerate(examples) if e.subject == s]
            out["per_subject"][s] = {"n": len(idx), "accuracy": sum(gold[i] == pred[i] for i in idx) / len(idx)}
    if examples and not examples[0].is_multiple_choice:
        out["macro_f1"] = macro_f1(gold, pred, examples[0].num_choices)
    return out


def predict(model, tok, example, shots=()):
    """One example's prediction record: by log-likelihood (pred) and per byte (pred_norm)."""
    lls, norms = score_example(model, tok, example, fewshot_prefix(shots))
    return {"id": example.id, "label": example.label, "pred": max(range(len(lls)), key=lls.__getitem__),
            "pred_norm": max(range(len(norms)), key=norms.__getitem__), "loglikelihoods": lls,
            "probs": _softmax(lls)}


def summary(examples, predictions):
    return {"acc": metrics(examples, predictions, "pred"), "acc_norm": metrics(examples, predictions, "pred_norm")}


def evaluate(model, tok, examples, shots=()):
    predictions = [predict(model, tok, e, shots) for e in examples]
    return predictions, summary(examples, predictions)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]
