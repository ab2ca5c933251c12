"""pretrain_gpt's settings: a YAML file (`--config`) overridden by Megatron-LM's flag names.

YAML keys are the flags without the leading dashes (`num-layers: 32` or `num_layers: 32`);
a key that is not a flag is an error naming the file and the key.
"""
import argparse
import json
import os

import yaml

from megatron_biomed.arguments import add_model_args, add_parallel_args
from megatron_biomed.errors import UsageError, add_debug_flag


class ConfigError(UsageError, ValueError):
    """A bad setting; the message names the flag or the file."""


def add_training_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps to train for (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train on instead of --train-iters (Megatron's sample-based training: the "
                        "learning-rate flags are then in samples)")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples, as Megatron-LM does")
    g.add_argument("--decrease-batch-size-if-needed", action="store_true",
                   help="with --rampup-batch-size: round a ramp batch down to a multiple of micro batch x "
                        "data-parallel size instead of refusing it")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="exponential", help="the anneal of --lr-decay-style WSD")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm up over this fraction of the decay (instead of --lr-warmup-iters/-samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the learning rate warmup starts from")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default: --train-samples")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--start-weight-decay", type=float, default=None, help="default: --weight-decay")
    g.add_argument("--end-weight-decay", type=float, default=None, help="default: --weight-decay")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled decay; not on biases or LayerNorm")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--deterministic-mode", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms); slower on GPUs")
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 parameters and gradients; fp32 main weights for the optimizer and checkpoints, "
                        "gradients accumulated and reduced in fp32")
    g.add_argument("--fp16", action="store_true",
                   help="float16 compute under autocast (fp32 parameters) with dynamic loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a static loss scale instead of dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000, help="good steps before the scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="overflows tolerated before the scale halves")
    g = parser.add_argument_group("speed")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional: compiled once, reused by every layer); "
                        "falls back to eager with a warning where inductor cannot run")
    g = parser.add_argument_group("data-parallel communication")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start each bucket's data-parallel gradient reduction during backward, as soon as its "
                        "gradients are final (FSDP2 layouts always overlap)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: FSDP2 gathers each block's parameters ahead of use "
                        "(always the case there)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="gradient elements per reduction bucket (default 40M, Megatron's)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=None,
                   help="how long a collective may wait before the job fails (default: PyTorch's, 10 for NCCL, "
                        "30 for gloo)")
    g.add_argument("--distributed-timeout-seconds-after-init", type=int, default=None,
                   help="after the first iteration, how long a collective may wait, in seconds (a node lost or a "
                        "rank stopped is then caught this fast; the first iteration, with its setup, keeps "
                        "--distributed-timeout-minutes)")
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefix, or weight prefix pairs to blend: 0.7 pubmed_text_document 0.3 pmc_text_document")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of each dataset")
    g.add_argument("--data-cache-path", default=None, help="where index caches go (default: beside the data)")
    g.add_argument("--vocab-file", default=None, help="the tokenizer's vocab.json: sets --vocab-size and the EOD id")
    g.add_argument("--merge-file", default=None, help="accepted for Megatron-LM compatibility; not needed to train")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predicting the EOD token")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="directory for checkpoints")
    g.add_argument("--load", default=None,
                   help="resume from the latest checkpoint in this run directory if there is one (falling back, "
                        "loudly, to the newest one that verifies), or from the iter_N directory named")
    g.add_argument("--no-verify-checkpoint", action="store_true",
                   help="load without checking the files against the checkpoint's manifest.json checksums")
    g.add_argument("--save-interval", type=int, default=None, help="save every this many iterations")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, metavar="N",
                   help="after each save, delete older checkpoints but the newest N (default: keep all); the "
                        "one latest_checkpointed_iteration.txt names is never deleted")
    g.add_argument("--keep-every", type=int, default=None, metavar="M",
                   help="with --keep-last-checkpoints: also keep every checkpoint whose iteration is a multiple of M")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's shape (layers, hidden, heads, vocabulary, ...) from the --load "
                        "checkpoint, e.g. one converted from Hugging Face")
    g.add_argument("--no-load-optim", action="store_true", help="load model weights only; start a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (no optimizer, RNG or data position)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit (resumable) once training has run this long")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit at this iteration")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="save and exit on --exit-signal (SIGTERM and SIGUSR1 are always handled here)")
    g.add_argument("--exit-signal", type=int, default=15, help="a further signal that saves and exits (default SIGTERM)")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="stop with an error when --load holds no checkpoint (instead of starting from scratch)")
    g.add_argument("--async-save", action="store_true",
                   help="stage each checkpoint in memory and write it in the background while training goes on "
                        "(made complete, and named in latest_checkpointed_iteration.txt, only once written)")
    g = parser.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches per evaluation (0: none)")
    g.add_argument("--eval-tasks", nargs="+", default=None, metavar="TASK=FILE",
                   help="downstream QA scored during training, e.g. medmcqa=dev.json pubmedqa=ori_pqal.json "
                        "mmlu=test.csv (the readers of tools/evaluate.py): accuracy and acc_norm in TensorBoard "
                        "(tasks/<task>/acc), per-item log-likelihoods in <save>/eval_tasks/")
    g.add_argument("--eval-tasks-interval", type=int, default=None,
                   help="iterations between task evaluations (default: --eval-interval)")
    g.add_argument("--eval-tasks-limit", type=int, default=200,
                   help="items scored per task, the first ones of each file (0: all)")
    g.add_argument("--eval-tasks-shots", type=int, default=0, help="solved examples before each question (k-shot)")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-params-norm", action="store_true", help="log the parameters' L2 norm")
    g.add_argument("--log-num-zeros-in-grad", action="store_true", help="log how many gradient entries are zero")
    g.add_argument("--wandb-project", default=None,
                   help="also log to Weights & Biases under this project (WANDB_MODE=offline works with no network)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B writes (default: <save>/wandb)")
    g.add_argument("--wandb-entity", default=None, help="the W&B team or user")
    g = parser.add_argument_group("profiling")
    g.add_argument("--profile", action="store_true",
                   help="record a torch.profiler trace of iterations --profile-step-start..--profile-step-end "
                        "(TensorBoard opens it: <tensorboard-dir>/profile, or <save>/profile)")
    g.add_argument("--use-pytorch-profiler", action="store_true", help="the profiler --profile uses (the only one here)")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", nargs="+", type=int, default=[0], help="global ranks that record")
    g.add_argument("--record-memory-history", action="store_true",
                   help="with --profile on a GPU: record CUDA allocations and dump them to --memory-snapshot-path")
    g.add_argument("--memory-snapshot-path", default="snapshot.pickle")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU; default: 989 on H100/H200 and 312 on A100 in bf16/fp16")
    return parser


def build_parser():
    from megatron_biomed.compat import megatron_lm
    parser = argparse.ArgumentParser(
        description="Pretrain a GPT (BioMedLM preset by default) on Megatron .bin/.idx datasets with "
                    "tensor, pipeline and data parallelism. Launch with torchrun or srun. Every Megatron-LM "
                    "pretrain_gpt.py flag is accepted or refused with a reason (docs/megatron-lm-flags.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of settings; flags given here override it")
    parser = add_debug_flag(add_training_args(add_parallel_args(add_model_args(parser))))
    return megatron_lm.register(parser, "pretrain_gpt")


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs():
    """The names `--config` finds in the package (examples/configs links to the same files)."""
    try:
        return sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))
    except OSError:
        return []


def resolve_config(path):
    """`path` as given when it exists; otherwise a packaged config by name (`tiny`, `tiny.yaml`)."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    name = name[:-5] if name.endswith(".yaml") else name
    if os.sep not in path and name in packaged_configs():
        return os.path.join(CONFIG_DIR, name + ".yaml")
    raise ConfigError(f"--config {path}: no such file, and not a packaged config "
                      f"({', '.join(packaged_configs())}); give a YAML file's path or one of those names")


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string"}


def _typed(action, value, where):
    """A YAML value for `action`, of exactly the kind the flag takes (never silently converted)."""
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not true or false; write true or false")
        if not isinstance(action.const, bool):  # --recompute-activations: true sets its value
            return action.const if value else None
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else str(value).split()
        bad = [v for v in values if isinstance(v, (list, dict))]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not a single value; give a list of names and numbers")
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise ConfigError(f"{where}: {value!r}: give {action.nargs} values")
        if action.type in (int, float):  # --rampup-batch-size, --profile-ranks
            single = argparse.Namespace(nargs=None, type=action.type, choices=None)
            return [_typed(single, v, where) for v in values]
        return [str(v) for v in values]
    typ = action.type
    if isinstance(value, (list, dict)) or (isinstance(value, bool) and typ in (int, float)):
        raise ConfigError(f"{where}: {value!r} is not {_TYPE_NAMES.get(typ, 'a single value')}; "
                          f"give one value of that kind")
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{where}: {value!r} is not a whole number; give one, e.g. 4")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {value!r} is not a number; give one, e.g. 3.0e-4") from None
        return float(value)
    if typ is None or typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and action.choices is None:
            return str(value)
        return value
    try:
        return typ(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {value!r}: {e}") from None


def _yaml_defaults(parser, path):
    path = resolve_config(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    by_name = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                by_name[opt[2:]] = action
    for action in parser._actions:  # a saved run's settings (config.yaml) are keyed by destination
        by_name.setdefault(action.dest.replace("_", "-"), action)
    out = {}
    for key, value in data.items():
        action = by_name.get(str(key).replace("_", "-"))
        if action is None or action.dest in ("config", "help"):
            raise ConfigError(f"--config {path}: unknown setting {key!r} (not a flag of {parser.prog})")
        value = _typed(action, value, f"--config {path}: {key}")
        if action.choices is not None and value is not None and value not in action.choices:
            raise ConfigError(f"--config {path}: {key}: {value!r} is not one of {list(action.choices)}")
        out[action.dest] = value
    return out


def parse_args(argv=None):
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, known.config))
    args = parser.parse_args(argv)
    from megatron_biomed.compat import megatron_lm
    from megatron_biomed.errors import debug_enabled
    megatron_lm.check(args, "pretrain_gpt", debug_print=print if (args.debug or debug_enabled(argv)) else None)
    finish(args)
    return args


def finish(args):
    """Fill derived settings and check the ones with no default."""
    if args.vocab_file:
        try:
            with open(args.vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--vocab-file {args.vocab_file}: {e}") from None
        args.vocab_size = args.vocab_size or len(vocab)
        args.eod_id = vocab.get("<|endoftext|>", len(vocab) - 1)
    else:
        args.eod_id = None
    for flag in ("lr", "data_path"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag.replace('_', '-')} is required (on the command line or in --config)")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give one of --train-iters and --train-samples (on the command line or in --config)")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive")
    _check_schedule_flags(args)
    args._derived = []  # filled in here, so left out of settings.yaml: a rerun derives them again
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError("--save-interval must be >= 1")
    if args.keep_last_checkpoints is not None and args.keep_last_checkpoints < 1:
        raise ConfigError("--keep-last-checkpoints must be >= 1 (leave it out to keep every checkpoint)")
    if args.keep_every is not None and (args.keep_every < 1 or args.keep_last_checkpoints is None):
        raise ConfigError("--keep-every needs --keep-last-checkpoints and must be >= 1")
    if args.log_interval < 1 or args.eval_interval < 1:
        raise ConfigError("--log-interval and --eval-interval must be >= 1")
    if args.load and not os.path.isdir(args.load) and args.load != args.save:
        raise ConfigError(f"--load {args.load}: no such directory")
    return args


def _check_schedule_flags(a):
    """Megatron-LM's rules: iteration flags with --train-iters, sample flags with --train-samples."""
    if a.train_iters is not None:
        for flag, value in (("lr_decay_samples", a.lr_decay_samples), ("lr_wsd_decay_samples", a.lr_wsd_decay_samples)):
            if value is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} is for --train-samples runs; with --train-iters give "
                                  f"--{flag.replace('_samples', '_iters').replace('_', '-')}")
        if a.lr_warmup_samples:
            raise ConfigError("--lr-warmup-samples is for --train-samples runs; with --train-iters give "
                              "--lr-warmup-iters or --lr-warmup-fraction")
    else:
        for flag, value in (("lr_decay_iters", a.lr_decay_iters), ("lr_wsd_decay_iters", a.lr_wsd_decay_iters)):
            if value is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} is for --train-iters runs; with --train-samples give "
                                  f"--{flag.replace('_iters', '_samples').replace('_', '-')}")
        if a.lr_warmup_iters:
            raise ConfigError("--lr-warmup-iters is for --train-iters runs; with --train-samples give "
                              "--lr-warmup-samples or --lr-warmup-fraction")
    if a.lr_warmup_fraction is not None and (a.lr_warmup_iters or a.lr_warmup_samples):
        raise ConfigError("give one of --lr-warmup-fraction and --lr-warmup-iters / --lr-warmup-samples")
    if a.profile and a.profile_step_end <= a.profile_step_start:
        raise ConfigError(f"--profile-step-end {a.profile_step_end} must be after --profile-step-start "
                          f"{a.profile_step_start}")


SETTINGS = "settings.yaml"  # in --save: the run's settings, written at its start
_NOT_SETTINGS = ("config", "debug", "eod_id")  # the file read, a switch, a value derived from --vocab-file


def run_settings(args, model):
    """The run's settings keyed by flag (destination names), the model resolved (preset plus
    overrides, or the checkpoint's shape): `--config` of them runs the same run again."""
    out = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and not k.startswith("_")}
    out.update({k: v for k, v in vars(model).items() if k in out})
    out.update({k: None for k in getattr(args, "_derived", [])})
    return dict(sorted(out.items()))


def effective_config(args):
    """The settings as a flat mapping (what is printed at start and saved with checkpoints)."""
    return {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")}
