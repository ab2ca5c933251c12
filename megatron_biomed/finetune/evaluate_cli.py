"""tools/evaluate.py: score a checkpoint on a biomedical QA task zero-/few-shot (no fine-tuning)."""
import argparse
import json
import random
import sys


from megatron_biomed.finetune import tasks as T
from megatron_biomed.finetune import zero_shot as Z
from megatron_biomed.errors import add_debug_flag, entry_point
from megatron_biomed.utils import clean_stale_temps


def build_parser():
    p = argparse.ArgumentParser(
        description="Zero-/few-shot evaluation of our checkpoint (any layout) or a Hugging Face directory on "
                    "MedMCQA, MedQA, PubMedQA, BioASQ or MMLU files, by the log-likelihood of each answer: "
                    "acc, acc_norm (per character of the answer) and acc_bytes (per byte), with "
                    "lm-eval-harness 0.4's formulas. --prompt-style lm-eval reproduces lm-eval's own "
                    "pubmedqa, medmcqa, medqa_4options and mmlu_* prompts, so the numbers equal lm-eval's "
                    "on the same model and items.")
    p.add_argument("--load", required=True, help="our checkpoint root / iter dir, or a Hugging Face directory")
    p.add_argument("--task", required=True, help=f"one of {', '.join(sorted(T.TASKS))}")
    p.add_argument("--data", required=True, help="the task's file (e.g. MedMCQA dev.json, MMLU *_test.csv)")
    p.add_argument("--split-file", default=None, help="PubMedQA: the official test PMIDs")
    p.add_argument("--split", choices=["test", "train"], default="test", help="PubMedQA: which side of --split-file")
    T.add_cop_base_argument(p)
    p.add_argument("--prompt-style", choices=Z.PROMPT_STYLES, default="ours",
                   help="ours: the answer texts are scored after 'Question: ...\nAnswer:'; lm-eval: lm-eval's "
                        "task prompts, options listed and their letters scored (PubMedQA is the same in both)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--fewshot-data", default=None, help="file of solved examples to draw the shots from "
                   "(default: --data itself, never the example being scored)")
    p.add_argument("--seed", type=int, default=1234, help="which shots are drawn (MMLU with --prompt-style "
                   "lm-eval takes the first N, as lm-eval does from the dev file)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--output", default=None, help="predictions JSONL")
    p.add_argument("--metrics-file", default=None, help="metrics JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    from megatron_biomed.convert.storage import CheckpointFormatError
    from megatron_biomed.generation import load_for_inference
    from megatron_biomed.utils import atomic_output, progress
    args = build_parser().parse_args(argv)
    for out in (getattr(args, "output", None), getattr(args, "metrics_file", None)):
        if out and out != "-":
            clean_stale_temps(out)
    prompts = Z.Prompts(args.task, args.prompt_style)
    try:
        examples = T.read_task(args.task, args.data, args.split_file, args.split, args.cop_base)
        if args.limit:
            examples = examples[:args.limit]
        if not examples:
            raise T.TaskFormatError(f"{args.data}: no examples")
        pool = examples if not args.fewshot_data else \
            T.read_task(args.task, args.fewshot_data, args.split_file, args.split, args.cop_base)
        for e in examples[:1] + pool[:1]:
            prompts.answers(e)  # refuses a layout the style cannot score, before the model loads
        model, tok = load_for_inference(args.load, args.device, args.dtype, args.vocab_file, args.merge_file)
        rng = random.Random(args.seed)
        first_n = args.prompt_style == "lm-eval" and args.task == "mmlu"
        predictions = []
        bar = progress(total=len(examples), desc=f"{args.task} {args.num_fewshot}-shot", unit="q")
        for e in examples:
            others = [s for s in pool if s is not e]
            shots = (others[:args.num_fewshot] if first_n else rng.sample(others, args.num_fewshot)) \
                if args.num_fewshot else ()
            predictions.append(Z.predict(model, tok, e, prompts, shots))
            bar.update(1)
        bar.close()
        results = Z.summary(examples, predictions)
    except (T.TaskFormatError, CheckpointFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {"task": args.task, "data": args.data, "load": args.load, "prompt_style": args.prompt_style,
               "num_fewshot": args.num_fewshot, **results}
    if args.output:
        with atomic_output(args.output, "w", encoding="utf-8") as f:
            for e, p in zip(examples, predictions):
                f.write(json.dumps(dict(p, subject=e.subject), ensure_ascii=False) + "\n")
    if args.metrics_file:
        with atomic_output(args.metrics_file, "w") as f:
            json.dump(summary, f, indent=2)
    has_f1 = "macro_f1" in results["acc"]
    print(f"| task | n | shots | acc | acc_norm | acc_bytes |{' macro-F1 |' if has_f1 else ''}")
    print(f"|---|---|---|---|---|---|{'---|' if has_f1 else ''}")
    f1 = f" {results['acc']['macro_f1']:.4f} |" if has_f1 else ""
    print(f"| {args.task} | {results['acc']['n']} | {args.num_fewshot} | "
          + " | ".join(f"{results[m]['accuracy']:.4f}" for m in Z.METRICS) + f" |{f1}")
    for s, m in results["acc"].get("per_subject", {}).items():
        print(f"| {args.task}/{s} | {m['n']} | {args.num_fewshot} | "
              + " | ".join(f"{results[k]['per_subject'][s]['accuracy']:.4f}" for k in Z.METRICS)
              + f" |{'' if not f1 else ' |'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
