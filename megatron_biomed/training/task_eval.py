"""Downstream QA scored during pretraining (--eval-tasks), as OLMo's trainer does and
Megatron-LM does not: accuracy and acc_norm of multiple-choice and yes/no tasks every
--eval-tasks-interval iterations, in TensorBoard (tasks/<name>/acc, tasks/<name>/acc_norm)
beside the loss.

The items are scored exactly as tools/evaluate.py scores them (finetune/zero_shot.py: each
answer a continuation of the prompt, lm-eval's token split and metrics), but with the model as
it is in memory, in whatever layout it trains: every answer is one row, right-padded to the
sequence length with only its answer tokens as targets; the data-parallel ranks share the rows,
each model replica scores its share with one forward (tensor and pipeline parallel as in
training), and the per-token losses summed over an answer are minus its log-likelihood. Rank 0
also writes each item's log-likelihoods to <save>/eval_tasks/iter_<N>.jsonl.
"""
import json
import os
import random

import torch
import torch.distributed as dist

from megatron_biomed.errors import UsageError
from megatron_biomed.finetune import tasks as T
from megatron_biomed.finetune import zero_shot as Z
from megatron_biomed.parallel.tensor_parallel import IGNORE_INDEX
from megatron_biomed.utils import atomic_output


def parse_specs(specs):
    """["medmcqa=FILE", ...] -> [(task, path)], refusing unknown tasks and missing files."""
    out = []
    for spec in specs or []:
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise UsageError(f"--eval-tasks {spec!r}: give TASK=FILE, e.g. medmcqa=dev.json")
        if task not in T.TASKS:
            raise UsageError(f"--eval-tasks {spec!r}: unknown task {task!r}; known: {', '.join(sorted(T.TASKS))}")
        if not os.path.isfile(path):
            raise UsageError(f"--eval-tasks {spec!r}: {path}: no such file")
        if task in dict(out):
            raise UsageError(f"--eval-tasks {spec!r}: {task} is given twice")
        out.append((task, path))
    return out


class TaskEval:
    def __init__(self, specs, tokenizer, seq_length, limit, shots, seed=1234, prompt_style="ours"):
        self.seq_length = seq_length
        self.tasks = []  # (name, examples, prompts, [(example index, answer index, ctx ids, cont ids)])
        for task, path in parse_specs(specs):
            examples = T.read_task(task, path)
            if limit:
                examples = examples[:limit]
            if not examples:
                raise UsageError(f"--eval-tasks {task}={path}: no examples")
            prompts = Z.Prompts(task, prompt_style)
            rng = random.Random(seed)
            rows = []
            for i, e in enumerate(examples):
                others = [s for s in examples if s is not e]
                context = prompts.context(e, rng.sample(others, min(shots, len(others))) if shots else ())
                for j, a in enumerate(prompts.answers(e)):
                    ctx, cont = Z.encode_pair(tokenizer, context, " " + a)
                    if len(cont) >= seq_length + 1:
                        raise UsageError(f"--eval-tasks {task}={path}: example {e.id}: an answer of {len(cont)} "
                                         f"tokens does not fit --seq-length {seq_length}")
                    rows.append((i, j, ctx, cont))
            self.tasks.append((task, examples, prompts, rows))

    def _batch(self, rows):
        """Right-padded (tokens, targets) of rows, as zero_shot.continuation_logprob cuts them."""
        n = len(rows)
        tokens = torch.zeros((n, self.seq_length), dtype=torch.long)
        targets = torch.full((n, self.seq_length), IGNORE_INDEX, dtype=torch.long)
        for r, (_, _, ctx, cont) in enumerate(rows):
            ids = (ctx + cont)[-(self.seq_length + 1):]
            x, y = ids[:-1], ids[1:]
            tokens[r, :len(x)] = torch.tensor(x)
            k = len(cont)
            targets[r, len(y) - k:len(y)] = torch.tensor(y[-k:])
        return tokens, targets

    @torch.no_grad()
    def run(self, model, dp_rank, dp, micro_batch_size, device):
        """{task: (summary, predictions)} on every rank (collective over the whole job)."""
        results = {}
        for task, examples, prompts, rows in self.tasks:
            mine = rows[dp_rank::dp]
            per_rank = -(-len(rows) // dp)  # every rank runs the same number of micro-batches
            n = -(-per_rank // micro_batch_size) * micro_batch_size
            padded = mine + [(None, None, [0], [0])] * (n - len(mine))
            tokens, targets = self._batch(padded)
            losses = model.token_losses(tokens.to(device), targets.to(device)).sum(-1).cpu()
            scored = [(i, j, -float(losses[r])) for r, (i, j, _, _) in enumerate(mine)]
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, scored)
            lls = [[None] * len(prompts.answers(e)) for e in examples]
            for part in everyone:  # tensor/pipeline ranks of one replica send the same rows: any copy
                for i, j, ll in part:
                    lls[i][j] = ll
            predictions = [Z.prediction(e, prompts.answers(e), ll) for e, ll in zip(examples, lls)]
            results[task] = (Z.summary(examples, predictions), predictions)
        return results

    @staticmethod
    def scalars(results):
        return {f"tasks/{task}/{m}": s[m]["accuracy"] for task, (s, _) in results.items() for m in ("acc", "acc_norm")}

    @staticmethod
    def write(results, save, iteration):
        path = os.path.join(save, "eval_tasks", f"iter_{iteration:07d}.jsonl")
        with atomic_output(path, "w", encoding="utf-8") as f:
            for task, (_, predictions) in results.items():
                for p in predictions:
                    f.write(json.dumps(dict(p, task=task), ensure_ascii=False) + "\n")
        return path
