"""BioMedLM's fine-tuning heads on our GPT, and their inputs.

Multiple choice: each (question, option) pair is its own sequence; the final hidden state of its
last token goes through a linear layer to one score; the scores of a question's options are
softmaxed against each other (cross entropy over the options). Classification (PubMedQA,
BioASQ): context + question, the last token's hidden state through a linear layer to C logits.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_biomed.model.gpt import GPT


class GPTClassifier(nn.Module):
    def __init__(self, gpt: GPT, num_outputs):
        super().__init__()
        self.gpt = gpt
        multiple_choice = num_outputs == 1
        # Multiple choice: a constant added to every option's score cancels in the softmax across
        # options, so the head's bias and the final LayerNorm's bias have a zero gradient in exact
        # arithmetic; Adam would turn their round-off gradients into full-size random steps.
        self.head = nn.Linear(gpt.config.hidden_size, num_outputs, bias=not multiple_choice)
        nn.init.normal_(self.head.weight, std=gpt.config.init_method_std)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        if multiple_choice:
            gpt.ln_f.bias.requires_grad_(False)

    def forward(self, tokens, lengths):
        """tokens (N, T), right-padded; lengths (N,) -> (N, num_outputs)."""
        g = self.gpt
        x = g.ln_f(g.blocks(g.embed(tokens)))
        last = x[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.head(last)


def choice_logits(model, tokens, lengths, num_choices):
    """(questions, choices) logits: one score per option sequence (multiple choice, head of
    width 1), or the classifier's C logits (classification)."""
    out = model(tokens, lengths)
    if out.shape[-1] == 1:
        return out.view(-1, num_choices)
    return out


def loss_and_logits(model, batch):
    logits = choice_logits(model, batch["tokens"], batch["lengths"], batch["num_choices"])
    return F.cross_entropy(logits.float(), batch["labels"]), logits


def encode_example(tok, example, max_length):
    """Token lists to score for one example: one per option (multiple choice) or one. The
    context is cut from the left to fit; the question and the option are never cut."""
    def fit(prefix, keep):
        room = max_length - len(keep)
        if room < 0:
            raise ValueError(f"example {example.id}: question and answer take {len(keep)} tokens, more than "
                             f"--max-length {max_length}")
        return prefix[-room:] + keep if room else keep
    if example.is_multiple_choice:
        question = tok.encode(f"Question: {example.question}\nAnswer:").ids
        return [fit([], question + tok.encode(" " + o).ids) for o in example.options]
    context = tok.encode(f"Abstract: {example.context}\n").ids
    question = tok.encode(f"Question: {example.question}\nAnswer:").ids
    return [fit(context, question)]


def collate(encoded, labels, pad_id, num_choices):
    """encoded: list (per example) of lists of token lists -> a right-padded batch."""
    seqs = [s for per_example in encoded for s in per_example]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    return {"tokens": tokens, "lengths": torch.tensor([len(s) for s in seqs]),
            "labels": torch.tensor(labels), "num_choices": num_choices}
