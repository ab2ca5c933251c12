"""Zero-/few-shot scoring of a pretrained checkpoint the way lm-eval-harness 0.4.x scores
multiple-choice tasks: each answer is a continuation of the prompt (after a space) and its
summed log-likelihood picks the prediction. The three accuracies are lm-eval's
(lm_eval/api/task.py, `process_results`):

    acc        argmax of the log-likelihoods
    acc_norm   argmax of log-likelihood / len(answer)                 (characters, no leading space)
    acc_bytes  argmax of log-likelihood / len(answer.encode("utf-8")) (bytes, no leading space)

ties going to the first answer, as numpy's argmax does.

Prompt styles:
  ours     the answer text itself is scored: multiple choice "Question: {q}\\nAnswer:" + " {option}";
           classification "Abstract: {c}\\nQuestion: {q}\\nAnswer:" + " yes" / " no" / " maybe".
  lm-eval  lm-eval's own tasks, prompt and targets character for character: `pubmedqa` (as ours),
           `medmcqa` and `medqa_4options` (options listed in the prompt, the letters " A".." D"
           scored) and `mmlu_<subject>` (its description line, then the question and lettered
           options). lm-eval has no BioASQ task.
k-shot prompts put k solved examples, each followed by a blank line, before the question (after
MMLU's description). Token split as lm-eval's `_encode_pair`: trailing whitespace of the context
moves to the answer, the whole string is encoded and the answer is what follows the context's
own encoding. Inputs longer than the model are cut from the left, so the end of the prompt and
the whole answer are always scored.
"""
import math

import torch
import torch.nn.functional as F

from megatron_biomed.errors import UsageError

PROMPT_STYLES = ("ours", "lm-eval")
LETTERS = "ABCDEFGH"


class Prompts:
    """Builds the (context, answers) of a task's examples in one prompt style."""

    def __init__(self, task, style="ours"):
        if style not in PROMPT_STYLES:
            raise UsageError(f"--prompt-style {style}: choose one of {', '.join(PROMPT_STYLES)}")
        if style == "lm-eval" and task == "bioasq":
            raise UsageError("--prompt-style lm-eval: lm-eval-harness has no BioASQ task; use --prompt-style ours")
        self.task, self.style = task, style

    def question(self, e):
        """The prompt of one example, up to and including "Answer:"."""
        if not e.is_multiple_choice:
            return f"Abstract: {e.context}\nQuestion: {e.question}\nAnswer:"
        if self.style == "ours":
            return f"Question: {e.question}\nAnswer:"
        listed = "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(e.options))
        if self.task == "medmcqa":
            return f"Question: {e.question}\nChoices:\n{listed}Answer:"
        if self.task == "mmlu":
            return f"{e.question.strip()}\n{listed}Answer:"
        return f"Question: {e.question}\n{listed}Answer:"  # medqa_4options

    def answers(self, e):
        """The answer strings, without the space that separates them from the prompt."""
        if not e.is_multiple_choice:
            return list(e.labels)
        if self.style == "ours":
            return list(e.options)
        if self.task in ("medqa", "mmlu", "medmcqa") and len(e.options) != 4:
            name = {"medqa": "medqa_4options"}.get(self.task, self.task)
            raise UsageError(f"--prompt-style lm-eval: lm-eval's {name} has 4 options; example {e.id} has "
                             f"{len(e.options)} (use the 4-option file, or --prompt-style ours)")
        return list(LETTERS[:len(e.options)])

    def description(self, e):
        if self.style == "lm-eval" and self.task == "mmlu":
            return f"The following are multiple choice questions (with answers) about {e.subject.replace('_', ' ')}.\n\n"
        return ""

    def context(self, e, shots=()):
        solved = "".join(f"{self.question(s)} {self.answers(s)[s.label]}\n\n" for s in shots)
        return self.description(e) + solved + self.question(e)


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) exactly as lm-eval's `_encode_pair` for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
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


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)  # the first of equal maxima, as numpy's


def score_example(model, tok, example, prompts, shots=()):
    """The log-likelihood of each answer."""
    context = prompts.context(example, shots)
    return [continuation_logprob(model, *encode_pair(tok, context, " " + a)) for a in prompts.answers(example)]


def prediction(example, answers, lls):
    """The prediction record of an example whose answers scored `lls`: pred (acc), pred_norm
    (acc_norm), pred_bytes (acc_bytes). Also what pretraining's --eval-tasks writes."""
    return {"id": example.id, "label": example.label, "pred": argmax(lls),
            "pred_norm": argmax([ll / len(a) for ll, a in zip(lls, answers)]),
            "pred_bytes": argmax([ll / len(a.encode("utf-8")) for ll, a in zip(lls, answers)]),
            "loglikelihoods": lls}


def predict(model, tok, example, prompts, shots=()):
    """One example's prediction record (prediction()), with the answers' probabilities."""
    lls = score_example(model, tok, example, prompts, shots)
    return dict(prediction(example, prompts.answers(example), lls), probs=_softmax(lls))


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


METRICS = {"acc": "pred", "acc_norm": "pred_norm", "acc_bytes": "pred_bytes"}


def summary(examples, predictions):
    return {name: metrics(examples, predictions, key) for name, key in METRICS.items()}


def evaluate(model, tok, examples, prompts, shots=()):
    predictions = [predict(model, tok, e, prompts, shots) for e in examples]
    return predictions, summary(examples, predictions)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]
