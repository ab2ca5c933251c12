"""A Megatron-LM user's command line: every flag of Megatron-LM core_v0.16.1's pretrain_gpt.py and
tools/preprocess_data.py is honoured, accepted or refused with a reason; the schedules behind
the flags equal megatron-core's own classes; the docs table is generated from the rules."""
import os
import subprocess
import sys
import types
import warnings

import pytest

from conftest import ROOT

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _parser(tool):
    if tool == "pretrain_gpt":
        from megatron_biomed.training.arguments import build_parser
    else:
        from megatron_biomed.data.preprocess import build_parser
    return build_parser()


def _sample_value(entry, action):
    """A value argparse takes for the flag (its first choice, else 1)."""
    choices = getattr(action, "choices", None) or entry["choices"]
    value = str(sorted(choices)[0] if action is not None and action.choices else (choices or ["1"])[0])
    n = entry["nargs"] if action is None else action.nargs
    if n == 0:
        return []
    if isinstance(n, int):
        return [value] * n
    return [value]


@pytest.mark.parametrize("tool", ["pretrain_gpt", "preprocess_data"])
def test_every_megatron_lm_flag_is_sorted_and_parses(tool):
    from megatron_biomed.compat import megatron_lm as M
    parser = _parser(tool)
    rules = M._REGISTERED[tool]
    pinned = M.pinned()[tool]
    assert len(pinned) == (651 if tool == "pretrain_gpt" else 28) and len(rules) == len(pinned)
    unsorted = [r.flag for r in rules.values() if r.kind != "honoured" and not r.why]
    assert not unsorted, f"Megatron-LM flags with no class: {unsorted}"
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    for e in pinned:
        for flag in e["flags"]:  # every one of Megatron's names parses: never "unrecognized arguments"
            action = by_flag.get(flag)
            assert action is not None, flag
            argv = [flag, *_sample_value(e, action)]
            if tool == "preprocess_data":  # its required flags
                required = {"--input": "x", "--output-prefix": "o", "--tokenizer-type": "GPT2BPETokenizer"}
                argv += [x for f, v in required.items() if f not in e["flags"] for x in (f, v)]
            known, unknown = parser.parse_known_args(argv)
            assert unknown == [], (flag, unknown)


def test_docs_table_is_generated_from_the_rules():
    from megatron_biomed.compat.megatron_lm import docs_page
    with open(os.path.join(ROOT, "docs", "megatron-lm-flags.md"), encoding="utf-8") as f:
        assert f.read() == docs_page(), "docs/megatron-lm-flags.md is stale: python -m megatron_biomed.compat.megatron_lm"


@pytest.mark.parametrize("flags, message", [
    (["--swiglu"], "error: --swiglu: Megatron-LM flag refused: not this architecture"),
    (["--untie-embeddings-and-output-weights"], "with tied input and output embeddings"),
    (["--num-experts", "8"], "error: --num-experts 8: Megatron-LM flag refused: not this architecture"),
    (["--transformer-impl", "transformer_engine"], "only local works here: Transformer Engine is not used"),
    (["--context-parallel-size", "2"], "only 1 works here: context parallelism is not built"),
    (["--position-embedding-type", "rope"], "error: --position-embedding-type rope: Megatron-LM flag refused"),
    (["--rotary-base", "500000"], "error: --rotary-base 500000: Megatron-LM flag refused"),
    (["--max-position-embeddings", "2048", "--seq-length", "1024"], "error: --max-position-embeddings 2048"),
])
def test_refused_flags_say_why_in_one_line(flags, message, capsys):
    from megatron_biomed.training.trainer import main  # pretrain_gpt's main, in this process
    assert main([*flags, "--train-iters", "1", "--lr", "1", "--data-path", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "unrecognized arguments" not in err


def test_a_refusal_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "megatron_biomed.pretrain_gpt", "--num-experts", "8", "--train-iters", "1",
                        "--lr", "1", "--data-path", "nowhere"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: --num-experts 8: Megatron-LM flag refused"), r.stderr


def test_accepted_flags_are_noted_under_debug(capsys):
    from megatron_biomed.training.arguments import parse_args
    from megatron_biomed.compat import megatron_lm as M
    flags = ["--transformer-impl", "local", "--no-masked-softmax-fusion", "--context-parallel-size", "1",
             "--rotary-base", "10000", "--use-mcore-models"]
    args = parse_args(["--train-iters", "1", "--lr", "1", "--data-path", "x", *flags])
    assert not any(k.startswith(M.DEST_PREFIX) for k in vars(args))
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    parse_args(["--train-iters", "1", "--lr", "1", "--data-path", "x", "--debug", *flags])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert sorted(notes) == sorted([
        "note: --transformer-impl local: accepted: what ours does",
        "note: --context-parallel-size 1: accepted: what ours does",
        "note: --rotary-base 10000: accepted: Megatron-LM's default, which changes nothing",
        "note: --no-masked-softmax-fusion: accepted, no effect here: a kernel fusion switch: ours runs PyTorch's own "
        "kernels (and torch.compile with --compile), with or without it",
        "note: --use-mcore-models: accepted, no effect here: ours is one PyTorch model; there are no legacy models to "
        "choose between"])


def test_megatron_aliases_are_honoured():
    from megatron_biomed.arguments import model_config, parallel_config
    from megatron_biomed.training.arguments import parse_args
    a = parse_args(["--train-iters", "1", "--lr", "1", "--data-path", "x", "--model", "tiny", "--norm-epsilon", "1e-6",
                    "--openai-gelu", "--recompute-activations", "--attention-backend", "unfused",
                    "--max-position-embeddings", "48", "--kv-channels", "16", "--use-distributed-optimizer"])
    cfg = model_config(a)
    assert (cfg.layernorm_epsilon, cfg.activation, cfg.recompute_granularity, cfg.attention_backend,
            cfg.seq_length) == (1e-6, "gelu_new", "selective", "math", 48)
    assert parallel_config(a).data_parallel_sharding == "optimizer"


# -- the schedules, against megatron-core 0.16's own classes ------------------------------------
def _megatron_lrs(args, gbs, batches):
    """The learning rate and weight decay Megatron-LM's training loop uses at each iteration:
    its get_optimizer_param_scheduler (training.py) over megatron-core's OptimizerParamScheduler,
    stepped by each iteration's batch."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    a = args
    if a.train_iters:
        decay = (a.lr_decay_iters or a.train_iters) * gbs
        wd_steps = a.train_iters * gbs
        wsd = a.lr_wsd_decay_iters * gbs if a.lr_wsd_decay_iters is not None else None
        warmup = a.lr_warmup_fraction * decay if a.lr_warmup_fraction is not None else a.lr_warmup_iters * gbs
    else:
        decay = a.lr_decay_samples or a.train_samples
        wd_steps, wsd = a.train_samples, a.lr_wsd_decay_samples
        warmup = a.lr_warmup_fraction * decay if a.lr_warmup_fraction is not None else a.lr_warmup_samples
    opt = torch.optim.SGD([{"params": [torch.zeros(2, 2)], "wd_mult": 1.0}], lr=0.0)
    start_wd = a.weight_decay if a.start_weight_decay is None else a.start_weight_decay
    end_wd = a.weight_decay if a.end_weight_decay is None else a.end_weight_decay
    s = OptimizerParamScheduler(opt, a.lr_warmup_init, a.lr, a.min_lr, warmup, decay, a.lr_decay_style, start_wd,
                                end_wd, wd_steps, a.weight_decay_incr_style, wsd_decay_steps=wsd,
                                lr_wsd_decay_style=a.lr_wsd_decay_style)
    out = []
    for b in batches:
        g = opt.param_groups[0]
        out.append((g["lr"], g["weight_decay"]))
        s.step(increment=b)
    return out


def _args(**kw):
    base = dict(train_iters=None, train_samples=None, lr=3e-4, min_lr=3e-5, lr_warmup_init=0.0, lr_decay_style="cosine",
                lr_wsd_decay_style="exponential", lr_warmup_iters=0, lr_warmup_fraction=None, lr_warmup_samples=0,
                lr_decay_iters=None, lr_decay_samples=None, lr_wsd_decay_iters=None, lr_wsd_decay_samples=None,
                weight_decay=0.1, start_weight_decay=None, end_weight_decay=None, weight_decay_incr_style="constant")
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("kw", [
    dict(train_iters=100, lr_warmup_iters=10, lr_decay_style="cosine"),
    dict(train_iters=100, lr_warmup_fraction=0.05, lr_decay_iters=80, lr_decay_style="linear"),
    dict(train_iters=100, lr_warmup_iters=5, lr_decay_style="inverse-square-root"),
    dict(train_iters=100, lr_warmup_iters=5, lr_decay_style="constant", lr_warmup_init=1e-5),
    dict(train_iters=100, lr_warmup_iters=5, lr_decay_style="WSD", lr_wsd_decay_iters=30, lr_wsd_decay_style="cosine"),
    dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=40, lr_wsd_decay_style="minus_sqrt"),
    dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=40),
    dict(train_samples=3000, lr_warmup_samples=200, lr_decay_samples=2500, start_weight_decay=0.0,
         end_weight_decay=0.1, weight_decay_incr_style="linear"),
    dict(train_samples=3000, lr_warmup_fraction=0.01, start_weight_decay=0.01, end_weight_decay=0.1,
         weight_decay_incr_style="cosine"),
], ids=["cosine-iters", "linear-fraction", "inverse-sqrt", "constant-init", "wsd-cosine", "wsd-minus-sqrt",
        "wsd-exponential", "samples-wd-linear", "samples-wd-cosine"])
@pytest.mark.parametrize("rampup", [None, (8, 8, 800)], ids=["constant batch", "ramp-up"])
def test_schedules_equal_megatron_core(kw, rampup):
    from megatron_biomed.training.schedule import BatchSchedule, LRSchedule
    gbs = 32
    args = _args(**kw)
    batches = BatchSchedule(gbs, 2, 2, rampup)
    iterations = args.train_iters or batches.iterations_for(args.train_samples)
    sizes = [batches.batch_size(batches.consumed(k)) for k in range(iterations)]
    theirs = _megatron_lrs(args, gbs, sizes)  # Megatron builds its scheduler before it sets train_iters
    args.train_iters = iterations
    ours_lr = LRSchedule(args, gbs)
    for k, (lr, wd) in enumerate(theirs):
        c = batches.consumed(k)
        assert ours_lr.lr(c) == pytest.approx(lr, rel=1e-12, abs=1e-15), (k, c)
        assert ours_lr.weight_decay(c) == pytest.approx(wd, rel=1e-12, abs=1e-15), (k, c)


@pytest.mark.parametrize("gbs, mbs, dp, ramp", [(32, 2, 2, (8, 8, 800)), (48, 1, 4, (4, 4, 1000)),
                                                (96, 4, 2, (16, 16, 5000)), (62, 2, 1, (2, 6, 300))])
def test_batch_ramp_equals_megatron_core(gbs, mbs, dp, ramp):
    """Batch sizes by consumed samples equal megatron-core's calculator; --train-samples gives
    the iterations Megatron-LM's update_train_iters gives."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
    from megatron_biomed.training.schedule import BatchSchedule
    ours = BatchSchedule(gbs, mbs, dp, ramp, decrease_if_needed=True)
    theirs = RampupBatchsizeNumMicroBatchesCalculator(gbs, mbs, dp, True, 0, *ramp)
    consumed = 0
    for k in range(400):
        theirs.update(consumed, consistency_check=False)
        size = theirs.get_current_running_global_batch_size()
        assert ours.consumed(k) == consumed and ours.batch_size(consumed) == size, k
        consumed += size
    for train_samples in (0, 50, ramp[2], ramp[2] + 7 * gbs + 3, 10 * ramp[2]):
        iterations, c = 0, 0  # training.py update_train_iters, core_v0.16.1
        while c <= ramp[2] and c <= train_samples:
            theirs.update(c, consistency_check=False)
            c += theirs.get_current_global_batch_size()
            iterations += 1
        if train_samples > c:
            iterations += (train_samples - c) // gbs
        assert BatchSchedule(gbs, mbs, dp, ramp).iterations_for(train_samples) == iterations


def test_ramp_batches_that_do_not_fit_the_layout_are_refused():
    from megatron_biomed.training.arguments import ConfigError
    from megatron_biomed.training.schedule import BatchSchedule
    with pytest.raises(ConfigError, match="must be the start plus a whole number of increments"):
        BatchSchedule(32, 2, 2, (6, 4, 100))
    with pytest.raises(ConfigError, match="not divisible by --micro-batch-size x data-parallel size"):
        BatchSchedule(32, 2, 2, (2, 2, 100)).batch_size(0)
    assert BatchSchedule(32, 2, 2, (2, 2, 100), decrease_if_needed=True).batch_size(0) == 4
