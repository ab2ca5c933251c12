"""From a checkpoint to a directory ready to upload: `megatron-biomed-release --help`.

The weights are written portable (BioMedLM's per-layer attention scale folded into the query
projection, convert/portable.py), so transformers, vLLM and CTranslate2 all compute the same
function; with the tokenizer, generation_config.json, and a model card (README.md) whose every
figure is read from the run: its checkpoint's config.json, its TensorBoard events, its datasets'
.idx files, the metrics files of its evaluations. Nothing is typed in: what the run does not
record, the card says it does not know.
"""
import argparse
import json
import os
import shutil
import sys
import time

from megatron_biomed.errors import UsageError, add_debug_flag, entry_point

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# task -> (dataset name on the card, its id, how it is scored)
TASKS = {"medmcqa": ("MedMCQA", "medmcqa", "multiple-choice"), "medqa": ("MedQA", "medqa", "multiple-choice"),
         "pubmedqa": ("PubMedQA", "pubmedqa", "text-classification"),
         "bioasq": ("BioASQ", "bioasq", "text-classification"), "mmlu": ("MMLU (medical)", "mmlu", "multiple-choice"),
         "patient_qa": ("Patient questions", "patient_qa", "text-generation")}
MEDICAL_NOTE = ("Research use only. It is not a medical device: its answers to patient questions are not "
                "medical advice, may be wrong or harmful, and need review by a clinician before anyone relies "
                "on them.")


def build_parser():
    p = argparse.ArgumentParser(
        description="Release a checkpoint (a pretraining run, an iter_N directory, or a fine-tuning run's best/) "
                    "as a Hugging Face directory ready to upload: portable safetensors, tokenizer, "
                    "generation_config.json and a model card drawn from the run's own records.")
    p.add_argument("--load", required=True, help="our checkpoint: a run directory, an iter_N directory, or best/")
    p.add_argument("--save", required=True, help="the release directory to write")
    p.add_argument("--iteration", type=int, default=None, help="which checkpoint of a run directory (default: latest)")
    p.add_argument("--dtype", default="bf16", help=f"the weights' dtype: {', '.join(sorted(DTYPES))}")
    p.add_argument("--metrics", action="append", default=[], metavar="FILE",
                   help="an evaluation's metrics.json (megatron-biomed-evaluate --metrics-file, or a fine-tuning "
                        "run's metrics.json; a best/'s own run is found by itself); repeatable")
    p.add_argument("--tensorboard-dir", default=None,
                   help="the run's TensorBoard events (default: the directory its settings name)")
    p.add_argument("--decontamination-report", default=None, metavar="FILE",
                   help="megatron-biomed-decontaminate's --report, summarised on the card")
    p.add_argument("--model-name", default=None, help="the name on the card (default: the --save directory's)")
    p.add_argument("--license", default="apache-2.0", help="the Hub's license id for the card")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--force", action="store_true", help="replace an earlier release in --save")
    return add_debug_flag(p)


# -- what the run recorded ----------------------------------------------------------------------
def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({e.strerror}); check the path") from None
    except ValueError as e:
        raise UsageError(f"{path}: the {what} is not JSON ({e}); give the file the tool wrote") from None


def evaluation_results(path):
    """[(task, split, metric, value, how)] from one metrics file, whichever tool wrote it."""
    m = _read_json(path, "metrics file")
    task = m.get("task") if isinstance(m, dict) else None
    if task not in TASKS:
        raise UsageError(f"{path}: not a metrics file of megatron-biomed-evaluate or -finetune (task "
                         f"{task!r}); give the --metrics-file or the fine-tuning run's metrics.json")
    out = []
    if "acc" in m:  # megatron-biomed-evaluate
        shots = m.get("num_fewshot", 0)
        out.append((task, "evaluation", "accuracy", m["acc"]["accuracy"], f"{shots}-shot, option log-likelihood"))
    elif task == "patient_qa":
        for split in ("valid", "test"):
            if split in m:
                out.append((task, split, "rougeL", m[split]["rougeL"], "fine-tuned, greedy answers, ROUGE-L F1"))
    else:
        for split in ("valid", "test"):
            if split in m:
                out.append((task, split, "accuracy", m[split]["accuracy"], "fine-tuned (BioMedLM's heads)"))
    if not out:
        raise UsageError(f"{path}: holds no result (no acc, valid or test); give a finished run's metrics file")
    return out


def dataset_tokens(data_path):
    """[(weight or None, prefix, tokens or None)] of a run's --data-path."""
    from megatron_biomed.data.indexed import read_index
    from megatron_biomed.training.data import parse_blend
    prefixes, weights = parse_blend(list(data_path))
    rows = []
    for i, prefix in enumerate(prefixes):
        try:
            _, lengths, _, _ = read_index(prefix + ".idx")
            tokens = int(lengths.astype("int64").sum())
        except (OSError, ValueError):
            tokens = None
        rows.append((weights[i] if weights else None, prefix, tokens))
    return rows


def loss_curves(tb_dir, png):
    """Training and validation loss from the run's TensorBoard events, drawn to `png`; the number
    of points drawn (0: no events, nothing written)."""
    import glob
    if not tb_dir or not glob.glob(os.path.join(tb_dir, "events.*")):
        return 0
    from megatron_biomed.plot_run import read_scalars
    series = read_scalars(tb_dir, ("train/loss", "validation/loss"))
    if not series:
        return 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for tag, label, style in (("train/loss", "training", "-"), ("validation/loss", "validation", "o-")):
        if tag in series:
            steps = sorted(series[tag])
            ax.plot(steps, [series[tag][s] for s in steps], style, label=label, linewidth=1, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("language-model loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return sum(len(v) for v in series.values())


# -- the card -----------------------------------------------------------------------------------
def model_card(name, license_id, cfg, meta, results, datasets, curves, contamination, source_dir):
    import yaml
    settings = meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}
    front = {"license": license_id, "language": ["en"], "library_name": "transformers",
             "pipeline_tag": "text-generation",
             "tags": ["biomedical", "pubmed", "gpt2", "megatron_biomed"] + (["medical-qa"] if results else [])}
    if results:
        index = []
        for task, split, metric, value, how in results:
            ds_name, ds_type, task_type = TASKS[task]
            index.append({"task": {"type": task_type},
                          "dataset": {"name": ds_name, "type": ds_type, "split": split},
                          "metrics": [{"type": metric, "value": round(float(value), 4), "name": f"{metric} ({how})"}]})
        front["model-index"] = [{"name": name, "results": index}]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    params = _parameters(cfg)
    lines += [f"A GPT-2-architecture language model ({params / 1e6:,.1f}M parameters: {cfg.num_layers} layers, "
              f"hidden size {cfg.hidden_size}, {cfg.num_attention_heads} heads, {cfg.seq_length} positions, "
              f"vocabulary {cfg.vocab_size:,}) trained with megatron_biomed on biomedical text. The weights are "
              f"portable: the per-layer attention scale of BioMedLM's architecture is folded into the query "
              f"projection, so the config is plain GPT-2 and transformers, vLLM and CTranslate2 compute the same "
              f"function.", ""]
    lines += ["## Training", ""]
    iteration, consumed = meta.get("iteration"), meta.get("consumed_samples")
    seq = cfg.seq_length
    facts = [("checkpoint", f"`{source_dir}`")]
    if iteration is not None:
        facts.append(("iterations", f"{iteration:,}"))
    if consumed:
        facts.append(("tokens seen", f"{consumed * seq:,} ({consumed:,} sequences of {seq} tokens)"))
    layout = meta.get("layout") or settings.get("layout")
    if isinstance(layout, dict):
        facts.append(("parallel layout", ", ".join(f"{k}={v}" for k, v in layout.items() if v not in (None, False))))
    for key, label in (("global_batch_size", "global batch (sequences)"), ("lr", "peak learning rate"),
                       ("train_iters", "planned iterations")):
        if settings.get(key) is not None:
            facts.append((label, f"{settings[key]}"))
    precision = "bf16" if settings.get("bf16") else "fp16" if settings.get("fp16") else \
        ("fp32" if "bf16" in settings else None)
    if precision:
        facts.append(("precision", precision))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]
    if datasets:
        lines += ["Datasets (`--data-path`):", "", "| weight | dataset | tokens |", "|---|---|---|"]
        for weight, prefix, tokens in datasets:
            lines.append(f"| {weight if weight is not None else 1.0} | `{os.path.basename(prefix)}` | "
                         f"{f'{tokens:,}' if tokens is not None else 'not found where the run read it'} |")
        lines.append("")
    else:
        lines += ["The run's datasets are not recorded in this checkpoint (a fine-tuned or converted model).", ""]
    if curves:
        lines += ["![training and validation loss](loss_curves.png)", "",
                  f"Loss curves drawn from the run's TensorBoard events ({curves:,} points).", ""]
    else:
        lines += ["No TensorBoard events were found for this run, so there are no loss curves here.", ""]
    if contamination is not None:
        n = contamination["ngram"]
        lines += ["### Decontamination", "",
                  f"Evaluation sets checked against the training corpus `{os.path.basename(contamination['corpus'])}` "
                  f"({contamination['corpus_documents']:,} documents) by megatron-biomed-decontaminate: "
                  f"{n}-word overlaps and the PMIDs items are built from. "
                  f"{contamination['contaminated_documents']:,} documents were flagged.", "",
                  f"| evaluation set | items | contaminated | by {n}-gram | by PMID |", "|---|---|---|---|---|"]
        for name_, r in contamination["sets"].items():
            lines.append(f"| {name_} | {r['items']} | {r['contaminated']} | {r['by_ngram']} | {r['by_pmid']} |")
        lines.append("")
    lines += ["## Evaluation", ""]
    if results:
        lines += ["| task | split | metric | value | how |", "|---|---|---|---|---|"]
        for task, split, metric, value, how in results:
            lines.append(f"| {TASKS[task][0]} | {split} | {metric} | {float(value):.4f} | {how} |")
        lines.append("")
    else:
        lines += ["No evaluation results were given with this release (`--metrics`), so none are reported: "
                  "evaluate it (megatron-biomed-evaluate) before relying on it for any task.", ""]
    lines += ["## Use", "", "```python", "from transformers import pipeline",
              "generate = pipeline(\"text-generation\", model=\"" + name + "\")",
              "print(generate(\"Question: What causes anemia?\\nAnswer:\", max_new_tokens=64)[0][\"generated_text\"])",
              "```", "",
              "It also runs unchanged in vLLM (`vllm serve <dir>`) and, converted with "
              "`ct2-transformers-converter --model <dir> --output_dir <ct2 dir> --quantization int8`, in "
              "CTranslate2 on a CPU.", "",
              "## Intended use and limits", "", MEDICAL_NOTE, "",
              "Answers meant for patients should be rated by clinicians before use: "
              "`megatron-biomed-review-sheet` builds a blind side-by-side review sheet of several models' answers. "
              "The model was trained on biomedical literature only; it can state falsehoods fluently, reproduce "
              "biases of that literature, and knows nothing published after its data was collected.", ""]
    return "\n".join(lines)


def _parameters(cfg):
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    return cfg.num_layers * per_layer + cfg.vocab_size * h + cfg.seq_length * h + 2 * h


# -- the command --------------------------------------------------------------------------------
def release(args):
    from megatron_biomed.checkpoint.layout import detect_format
    from megatron_biomed.convert.cli import check_save, publish_output, start_output
    from megatron_biomed.convert.hf import write_hf
    from megatron_biomed.convert.ours import OursSource, verified_reads
    from megatron_biomed.convert.portable import PortableSource
    from megatron_biomed.data.tokenizer import load_tokenizer
    import torch
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: a release cannot be written in it; choose "
                         f"{', '.join(sorted(DTYPES))} (int8 is CTranslate2's own conversion of a release)")
    check_save(args)  # apart from --load; replaced only with --force, and only an earlier output
    save = os.path.abspath(args.save)
    if not os.path.isdir(args.load):
        raise UsageError(f"--load {args.load}: no such directory; give a run directory, an iter_N directory or best/")
    fmt = detect_format(args.load)
    if fmt != "megatron_biomed":
        raise UsageError(f"--load {args.load}: is a {'Hugging Face' if fmt == 'hf' else 'Megatron-LM'} directory; "
                         f"release our checkpoints (convert it first with megatron-biomed-convert)")
    metrics = list(args.metrics)
    results = []
    source = OursSource(args.load, args.iteration, verify="background")
    if os.path.basename(os.path.normpath(source.root)) == "best":  # a fine-tuning run: its own metrics
        own = os.path.join(os.path.dirname(source.root), "metrics.json")
        if os.path.isfile(own) and os.path.abspath(own) not in map(os.path.abspath, metrics):
            metrics.insert(0, own)
    for path in metrics:
        results += evaluation_results(path)
    contamination = None
    if args.decontamination_report:
        contamination = _read_json(args.decontamination_report, "decontamination report")
        if not isinstance(contamination, dict) or not {"ngram", "corpus", "sets"} <= set(contamination):
            raise UsageError(f"--decontamination-report {args.decontamination_report}: not a report of "
                             f"megatron-biomed-decontaminate (its --report); give that file")
    if args.vocab_file or args.merge_file:
        tok = load_tokenizer("GPT2BPETokenizer", args.vocab_file, args.merge_file)
    else:
        tok = source.tokenizer()
    if tok is None:
        raise UsageError(f"--load {args.load}: no tokenizer is recorded with it; give --vocab-file and --merge-file")
    settings = source.meta.get("config", {}) if isinstance(source.meta.get("config"), dict) else {}
    datasets = dataset_tokens(settings["data_path"]) if settings.get("data_path") else []
    tb_dir = args.tensorboard_dir or settings.get("tensorboard_dir")
    name = args.model_name or os.path.basename(save)
    tmp = start_output(save)
    try:
        with verified_reads(source):
            write_hf(PortableSource(source), tmp, getattr(torch, DTYPES[args.dtype]), tokenizer=tok)
        curves = loss_curves(tb_dir, os.path.join(tmp, "loss_curves.png"))
        card = model_card(name, args.license, source.config, source.meta, results, datasets, curves,
                          contamination, source.directory)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        publish_output(tmp, save, args.load, "release")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name, results, curves


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    name, results, curves = release(args)
    print(f"released {args.load} -> {args.save} ({args.dtype}, portable) in {time.time() - t0:.1f} s: "
          f"{len(results)} evaluation result(s) on the card"
          f"{'' if results else ' (none given: the card says so)'}, "
          f"{'loss curves drawn' if curves else 'no TensorBoard events found'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
