"""The command-line tools, in pipeline order: one table behind the console commands
(`megatron-biomed-<name>`, pyproject.toml), `python -m megatron_biomed <name>`, and the
Megatron-style `tools/*.py` shims. tests/test_install.py checks that the three agree."""
import importlib

# name -> (module whose main(argv=None) runs it, the tools/ shim, one line for the listing)
COMMANDS = {
    "pubmed-to-jsonl": ("megatron_biomed.data.documents", "pubmed_to_jsonl.py",
                        "PubMed baseline / PMC OA XML -> clean JSONL documents"),
    "train-tokenizer": ("megatron_biomed.data.train_tokenizer", "train_tokenizer.py",
                        "a byte-level BPE tokenizer (and sentence splitter) from JSONL"),
    "decontaminate": ("megatron_biomed.data.decontaminate", "decontaminate.py",
                      "drop training documents that overlap evaluation sets"),
    "dedup": ("megatron_biomed.data.dedup", "dedup.py", "exact and near-duplicate removal"),
    "preprocess": ("megatron_biomed.data.preprocess", "preprocess_data.py",
                   "JSONL -> Megatron .bin/.idx (Megatron-LM's tools/preprocess_data.py)"),
    "merge-datasets": ("megatron_biomed.data.merge", "merge_datasets.py", "concatenate .bin/.idx datasets"),
    "plan": ("megatron_biomed.planner", "plan_run.py", "memory per GPU and run time before submitting"),
    "preflight": ("megatron_biomed.preflight", None,
                  "before training on a cluster: links, bandwidth, a shared filesystem (slurm/preflight.sbatch)"),
    "pretrain": ("megatron_biomed.training.trainer", None,
                 "pretrain a GPT (python -m megatron_biomed.pretrain_gpt; launch with torchrun or srun)"),
    "plot-run": ("megatron_biomed.plot_run", "plot_run.py",
                 "a run's curves (loss, perplexity, lr, throughput, MFU, task accuracy) as PNG and HTML"),
    "trace-samples": ("megatron_biomed.training.trace_samples", "trace_samples.py",
                      "the documents behind a training batch"),
    "convert": ("megatron_biomed.convert.cli", "convert_checkpoint.py",
                "checkpoints: ours <-> Hugging Face, resharding, Megatron-LM import"),
    "finetune": ("megatron_biomed.finetune.trainer", "finetune.py", "fine-tune on biomedical QA"),
    "evaluate": ("megatron_biomed.finetune.evaluate_cli", "evaluate.py", "zero-/few-shot QA accuracy"),
    "generate": ("megatron_biomed.generation", "generate.py", "generate text from a checkpoint"),
    "release": ("megatron_biomed.release", "release.py",
                "a checkpoint -> a Hugging Face directory ready to upload (portable weights, model card)"),
    "review-sheet": ("megatron_biomed.review_sheet", "review_sheet.py",
                     "a blinded side-by-side sheet of models' answers for clinicians"),
}

PREFIX = "megatron-biomed-"


def main_of(name):
    return importlib.import_module(COMMANDS[name][0]).main
