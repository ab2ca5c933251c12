"""Fine-tune a GPT classifier on a QA task with tensor and data parallelism (launch one process
per device with torchrun or srun, like pretraining): `python -m megatron_biomed.finetune.trainer`.

Protocol (BioMedLM's, via Hugging Face's Trainer): AdamW, linear warmup over --warmup-ratio of
the steps then linear decay to 0, a fixed number of epochs, the dev set scored after each epoch
and the best epoch kept (its weights in --save/best, its predictions and metrics in --save).
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from megatron_biomed.finetune import classifier as C
from megatron_biomed.finetune import patient_qa as PQ
from megatron_biomed.finetune import tasks as T
from megatron_biomed.finetune import zero_shot as Z
from megatron_biomed.finetune.loop import (build_optimizer, check_splits, fit_vocab_rows, load_model,
                                           lr_schedule, prepare_save_dir, reduce_and_clip, set_lr, write_text)
from megatron_biomed.utils import print0
from megatron_biomed.errors import UserError, add_debug_flag, entry_point, report


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune on MedMCQA, MedQA, PubMedQA, BioASQ or MMLU files with "
                                            "BioMedLM's heads (a linear layer on the last token).")
    p.add_argument("--load", default=None, help="our checkpoint or a Hugging Face directory (default: --model, "
                   "randomly initialised, for tests)")
    p.add_argument("--model", default="tiny", help="preset when there is no --load")
    p.add_argument("--task", required=True,
                   help="medmcqa, medqa, pubmedqa, bioasq, mmlu (classification heads) or patient_qa (generative: "
                        "learn to write the answers; question/answer, prompt/completion, Alpaca or chat JSON lines, "
                        "or MedQuAD's XML directory)")
    p.add_argument("--train-data", required=True)
    p.add_argument("--valid-data", required=True)
    p.add_argument("--test-data", default=None)
    p.add_argument("--split-file", default=None, help="PubMedQA: the official test PMIDs (train = the rest)")
    T.add_cop_base_argument(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.5, help="BioMedLM used 0.5")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--global-batch-size", type=int, default=32, help="questions per step")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per example; patient_qa skips (and counts) longer pairs instead of cutting answers")
    p.add_argument("--prompt-template", default=None,
                   help=f"patient_qa: how a question is put to the model, from its record's fields (default "
                        f"{PQ.DEFAULT_TEMPLATE!r}; prompt/completion files: the prompt as written)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="patient_qa: longest generated dev answer")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--hidden-dropout", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--attention-dropout", type=float, default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--save", required=True, help="output directory: best/ weights, predictions, metrics.json")
    return add_debug_flag(p)


class FineTuner:
    def __init__(self, args, examples_train, tok, cfg, weights=None, device=torch.device("cpu")):
        from megatron_biomed.parallel.mesh import build_mesh
        from megatron_biomed.config import ParallelConfig
        from megatron_biomed.model.gpt import GPT
        self.args, self.tok = args, tok
        world = dist.get_world_size()
        tp = args.tensor_model_parallel_size
        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        parallel.validate(cfg, world)
        self.device = device
        self.mesh = build_mesh(parallel, device.type)
        self.dp, self.dp_rank = self.mesh["dp"].size(), self.mesh["dp"].get_local_rank()
        if args.global_batch_size % self.dp:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the data-parallel "
                             f"size {self.dp}")
        first = examples_train[0]
        self.multiple_choice = first.is_multiple_choice
        self.num_choices = first.num_choices
        torch.manual_seed(args.seed)
        gpt = GPT(cfg, tensor_parallel_size=tp)
        if weights is not None:
            gpt.load_state_dict(fit_vocab_rows(weights, gpt.wte.weight.shape[0], cfg.vocab_size))
        # the same initial head on every rank and in every layout (the GPT's own initialization
        # above draws a TP-dependent number of values: its embedding is padded for TP)
        torch.manual_seed(args.seed)
        model = C.GPTClassifier(gpt, 1 if self.multiple_choice else self.num_choices).to(device)
        if tp > 1:
            from megatron_biomed.parallel.tensor_parallel import _replicate, apply_tensor_parallel
            apply_tensor_parallel(model.gpt, self.mesh["tp"])
            _replicate(model.head, self.mesh["tp"])
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, args)
        self.pad_id = tok.token_to_id("<|endoftext|>") or 0
        torch.manual_seed(args.seed + 1)  # dropout: the same stream on every rank of a step

    def _encode(self, examples):
        return [C.encode_example(self.tok, e, self.args.max_length) for e in examples]

    def _batch(self, encoded, examples):
        b = C.collate(encoded, [e.label for e in examples], self.pad_id, self.num_choices)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def _autocast(self):
        if self.args.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        import contextlib
        return contextlib.nullcontext()

    def train_epoch(self, examples, encoded, epoch, step, schedule):
        a = self.args
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(a.seed + epoch)).tolist()
        per = a.global_batch_size // self.dp
        losses = []
        self.model.train()
        for start in range(0, len(order) - a.global_batch_size + 1, a.global_batch_size):
            rows = order[start:start + a.global_batch_size][self.dp_rank * per:(self.dp_rank + 1) * per]
            batch = self._batch([encoded[i] for i in rows], [examples[i] for i in rows])
            step += 1
            set_lr(self.optimizer, schedule(step))
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, _ = C.loss_and_logits(self.model, batch)
            loss.backward()
            reduce_and_clip(self.params, self.mesh, self.dp, a.clip_grad, self.device)
            self.optimizer.step()
            value = loss.detach().clone()
            if self.dp > 1:
                dist.all_reduce(value, group=self.mesh["dp"].get_group())
                value /= self.dp
            losses.append(float(value))
        return step, losses

    @torch.no_grad()
    def predict(self, examples, encoded):
        """Every rank scores every example (dev sets are small); returns prediction dicts."""
        self.model.eval()
        out = []
        bs = self.args.eval_batch_size
        for start in range(0, len(examples), bs):
            ex, enc = examples[start:start + bs], encoded[start:start + bs]
            with self._autocast():
                _, logits = C.loss_and_logits(self.model, self._batch(enc, ex))
            probs = logits.float().softmax(-1)
            for e, p in zip(ex, probs):
                out.append({"id": e.id, "label": e.label, "pred": int(p.argmax()), "probs": p.tolist()})
        self.model.train()
        return out

    def state(self):
        return self.model.state_dict()


def run(args):
    import torch.distributed.checkpoint as dcp

    from megatron_biomed.parallel import mesh as M
    device = M.init_distributed()
    if args.task == "patient_qa":
        return PQ.run(args, device)
    t0 = time.time()
    train = T.read_task(args.task, args.train_data, args.split_file, "train", args.cop_base)
    valid = T.read_task(args.task, args.valid_data, args.split_file, "test", args.cop_base)
    test = T.read_task(args.task, args.test_data, args.split_file, "test", args.cop_base) if args.test_data else None
    if not train or not valid:
        raise T.TaskFormatError("no training or validation examples")
    prepare_save_dir(args)
    splits = {"train": (args.train_data, train), "valid": (args.valid_data or args.split_file, valid)}
    if test is not None:
        splits["test"] = (args.test_data, test)
    data_checks = check_splits(splits, lambda e: e.question)
    tok, cfg, weights = load_model(args)
    ft = FineTuner(args, train, tok, cfg, weights, device)
    enc_train, enc_valid = ft._encode(train), ft._encode(valid)
    steps_per_epoch = len(train) // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training examples are fewer than --global-batch-size {args.global_batch_size}")
    schedule, warmup = lr_schedule(args.lr, steps_per_epoch * args.epochs, args.warmup_ratio)
    print0(f"fine-tuning on {len(train)} {args.task} examples ({'multiple choice' if ft.multiple_choice else 'classification'}, "
            f"{ft.num_choices} choices): {args.epochs} epochs x {steps_per_epoch} steps, warmup {warmup}, "
            f"world {dist.get_world_size()} (tp {args.tensor_model_parallel_size}, dp {ft.dp})")
    m = Z.metrics(valid, ft.predict(valid, enc_valid))
    history = [{"epoch": 0, "valid": m}]
    print0(f" before fine-tuning | dev accuracy {m['accuracy']:.4f}")
    best, step = None, 0
    for epoch in range(1, args.epochs + 1):
        step, losses = ft.train_epoch(train, enc_train, epoch, step, schedule)
        preds = ft.predict(valid, enc_valid)
        m = Z.metrics(valid, preds)
        train_loss = sum(losses) / len(losses)
        history.append({"epoch": epoch, "train_loss": train_loss, "valid": m})
        print0(f" epoch {epoch}/{args.epochs} | train loss {train_loss:.4f} | "
                f"dev accuracy {m['accuracy']:.4f}" + (f" | dev macro-F1 {m['macro_f1']:.4f}" if "macro_f1" in m else ""))
        if best is None or m["accuracy"] > best["valid"]["accuracy"]:
            best = {"epoch": epoch, "valid": m}
            final = os.path.join(args.save, "best")
            tmp, old = final + ".tmp", final + ".old"
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            try:
                dcp.save(ft.state(), checkpoint_id=tmp)
            except BaseException:  # disk full, ...: no half-written best.tmp left behind
                if dist.get_rank() == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            dist.barrier()
            if dist.get_rank() == 0:  # never a moment without a complete best/ (or best.old)
                shutil.rmtree(old, ignore_errors=True)
                if os.path.exists(final):
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
                write_text(os.path.join(args.save, "valid_predictions.jsonl"),
                       "".join(json.dumps(p) + "\n" for p in preds))
    result = {"task": args.task, "best_epoch": best["epoch"], "valid": best["valid"], "history": history,
              "data_checks": data_checks}
    if test is not None:
        dcp.load(ft.state(), checkpoint_id=os.path.join(args.save, "best"))
        preds = ft.predict(test, ft._encode(test))
        result["test"] = Z.metrics(test, preds)
        if dist.get_rank() == 0:
            write_text(os.path.join(args.save, "test_predictions.jsonl"), "".join(json.dumps(p) + "\n" for p in preds))
        print0(f" test accuracy (best dev epoch {best['epoch']}): {result['test']['accuracy']:.4f}")
    if dist.get_rank() == 0:
        write_text(os.path.join(args.save, "metrics.json"), json.dumps(result, indent=2))
    print0(f"done in {time.time() - t0:.0f} s: best dev accuracy {best['valid']['accuracy']:.4f} at epoch "
            f"{best['epoch']}; {args.save}/metrics.json")
    return result


@entry_point
def main(argv=None):
    import gc
    args = build_parser().parse_args(argv)
    code = 0
    try:
        run(args)
    except (FileNotFoundError, ValueError, UserError) as e:  # raised on every rank alike: said once
        if not dist.is_initialized() or dist.get_rank() == 0:
            report(e)
        code = getattr(e, "exit_code", 1)
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
