"""Memory and time of a training run before it is submitted: per-GPU memory of each tensor/
pipeline/data-parallel layout, micro-batch size and recompute setting, and the hours a run takes.

The memory model counts what this code base keeps, tensor by tensor (checked against peak
memory measured on CPU in the tests and on an H100/H200, README "GPU speed"):

  weights   bf16: 2 B bf16 parameter + 4 B fp32 main copy + 4 B fp32 main gradient + 8 B AdamW
            state per parameter; fp32/fp16: 4 + 4 + 8. FSDP2 (--data-parallel-sharding) keeps
            the fp32 16 B sharded over data parallelism, plus the gathered blocks in use.
  activations, per token and layer, in the compute dtype (e bytes): LayerNorm inputs (2 h),
            QKV and fc1 inputs (2 h), q/k/v (3 h), attention output (h), GELU input and
            output (8 h) = 16 h e, plus 2 h bytes of dropout masks. Tensor
            parallelism divides what is sharded; sequence parallelism the rest but the gathered
            QKV/fc1 inputs. Flash/cuDNN attention keeps no T x T scores; the math backend does.
            Full recompute keeps each layer's input and one layer's activations at a time.
  pipeline  1F1B: the first stage holds min(pp, micro-batches) micro-batches (GPipe: all of
            them; interleaved: x (1 + (pp - 1) / (pp v))).
  loss      the last stage's logits and their gradient (vocab / tp columns) and the chunked
            cross entropy's fp32 chunks.
"""
import dataclasses
import sys
from dataclasses import dataclass

from megatron_biomed.errors import entry_point
from megatron_biomed.model.loss import CHUNK_ELEMENTS

GIB = 2 ** 30

# name: (memory in GiB as the card reports it, dense bf16 TFLOP/s from the vendor's data sheet)
GPUS = {
    "h100": (79.6, 989.0), "h200": (139.8, 989.0), "h100-nvl": (93.0, 835.0),
    "a100": (79.2, 312.0), "a100-80gb": (79.2, 312.0), "a100-40gb": (39.4, 312.0),
    "l40s": (44.4, 362.0), "a10g": (22.0, 70.0), "cpu": (float("inf"), None),
}
# Outside torch's allocator: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers, fragmentation.
RESERVED_GIB = 3.0


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    vpp: int = None                  # layers per virtual pipeline stage
    schedule: str = "1f1b"
    sharding: str = "none"           # none | optimizer | full
    micro_batch_size: int = 1
    global_batch_size: int = 1
    recompute: str = None            # None | selective | full
    precision: str = "bf16"          # bf16 | fp16 | fp32

    @property
    def num_microbatches(self):
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @classmethod
    def of(cls, parallel, dp, global_batch_size, recompute, precision):
        """The layout of a run's ParallelConfig (config.py) with `dp` data-parallel ranks."""
        return cls(tp=parallel.tensor_model_parallel_size, pp=parallel.pipeline_model_parallel_size, dp=dp,
                   sequence_parallel=parallel.sequence_parallel, vpp=parallel.num_layers_per_virtual_pipeline_stage,
                   schedule=parallel.pipeline_schedule, sharding=parallel.data_parallel_sharding,
                   micro_batch_size=parallel.micro_batch_size, global_batch_size=global_batch_size,
                   recompute=recompute, precision=precision)


def precision_of(args):
    """pretrain_gpt's --bf16 / --fp16 as the planner's precision."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def layer_params(cfg, tp):
    """(sharded over TP, replicated) parameter counts of one transformer block."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    sharded = (h * 3 * h + 3 * h) + h * h + (h * f + f) + f * h
    return sharded // tp, 2 * h + 4 * h  # row-parallel biases, two LayerNorms


def stage_params(cfg, lay, first, last):
    """Parameters held by the most loaded rank of a first/last pipeline stage."""
    v = cfg.padded_vocab_size(lay.tp)
    sharded, replicated = layer_params(cfg, lay.tp)
    n = (cfg.num_layers // lay.pp) * (sharded + replicated)
    if first:
        n += v * cfg.hidden_size // lay.tp + cfg.seq_length * cfg.hidden_size // (lay.tp if lay.sequence_parallel else 1)
    if last:
        n += 2 * cfg.hidden_size + (0 if first else v * cfg.hidden_size // lay.tp)  # ln_f; the tied head's copy
    return n


def _elem(lay):
    return 4 if lay.precision == "fp32" else 2


def layer_activation_bytes(cfg, lay, tokens):
    """Bytes one layer keeps for backward for `tokens` tokens (one micro-batch), per TP rank."""
    h, f, a, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, _elem(lay)
    tp = lay.tp
    sp = tp if lay.sequence_parallel else 1
    masks = 2 * h // sp if cfg.hidden_dropout > 0 else 0
    per_token = (2 * h * e // sp          # LayerNorm inputs
                 + 2 * h * e              # QKV and fc1 inputs (gathered under SP)
                 + 3 * h * e // tp        # q, k, v
                 + h * e // tp            # attention output (the out-projection's input is a view of it)
                 + 2 * f * e // tp        # GELU input and output
                 + masks)
    if cfg.attention_backend == "math" and lay.recompute != "selective":
        # T x T probabilities, their dropped copy and the dropout mask; selective recompute
        # (which checkpoints the attention core) drops exactly these
        per_token += a * cfg.seq_length * (2 * e + 1) // tp
    return per_token * tokens


def memory(cfg, lay):
    """{component: bytes} for the most loaded GPU of the layout (first or last stage)."""
    e = _elem(lay)
    tokens = lay.micro_batch_size * cfg.seq_length
    n_mb = max(1, lay.num_microbatches)
    v_cols = cfg.padded_vocab_size(lay.tp) // lay.tp
    worst = None
    for first, last in ({(True, True)} if lay.pp == 1 else {(True, False), (False, True)}):
        n = stage_params(cfg, lay, first, last)
        out = {}
        if lay.sharding == "none":
            out["parameters"] = n * (2 if lay.precision == "bf16" else 4)
            out["fp32 main weights"] = n * 4 if lay.precision == "bf16" else 0
            out["gradients"] = n * 4
            out["optimizer states"] = n * 8
        else:  # FSDP2: fp32 shards, plus the blocks gathered for compute
            layer_n = sum(layer_params(cfg, lay.tp))
            gathered_layers = cfg.num_layers // lay.pp if lay.sharding == "optimizer" else 2
            out["parameters"] = n * 4 // lay.dp + gathered_layers * layer_n * e
            out["fp32 main weights"] = 0
            out["gradients"] = n * 4 // lay.dp + 2 * layer_n * 4
            out["optimizer states"] = n * 8 // lay.dp
        layers = cfg.num_layers // lay.pp
        if lay.pp == 1:
            inflight = 1.0
        elif lay.schedule == "gpipe" and not lay.vpp:
            inflight = float(n_mb)
        else:
            inflight = float(min(lay.pp, n_mb))
            if lay.vpp:
                chunks = cfg.num_layers // (lay.pp * lay.vpp)
                inflight *= 1 + (lay.pp - 1) / (lay.pp * chunks)
        if not first:
            inflight = 1.0  # the last stage runs each micro-batch's backward right after its forward
        if lay.recompute == "full":
            sp = lay.tp if lay.sequence_parallel else 1
            act = layers * inflight * tokens * cfg.hidden_size * e // sp + layer_activation_bytes(
                cfg, dataclasses.replace(lay, recompute=None), tokens)
        else:
            act = layers * inflight * layer_activation_bytes(cfg, lay, tokens)
        if first:
            act += inflight * tokens * cfg.hidden_size * (1 if cfg.hidden_dropout > 0 else 0)
        out["activations"] = int(act)
        if last:
            logits = tokens * v_cols * e
            chunk = 4 * min(CHUNK_ELEMENTS, tokens * v_cols)
            # logits and their gradient, the fp32 chunk and two temporaries of its size
            out["logits and loss"] = 2 * logits + 3 * chunk + 2 * tokens * cfg.hidden_size * e
        total = sum(out.values())
        if worst is None or total > worst[0]:
            worst = (total, out)
    return worst[1]


def iteration_flops(cfg, lay):
    from megatron_biomed.model.gpt import flops_per_token
    return flops_per_token(cfg) * lay.global_batch_size * cfg.seq_length


def run_time(cfg, lay, gpus, peak_tflops, mfu, train_iters):
    """(seconds, GPU-hours): model FLOPs at `mfu`, plus one more forward under full recompute
    and the pipeline bubble (pp - 1) / (micro-batches x virtual stages)."""
    seconds = iteration_flops(cfg, lay) * train_iters / (gpus * peak_tflops * 1e12 * mfu)
    if lay.recompute == "full":
        seconds *= 4 / 3
    if lay.pp > 1:
        chunks = cfg.num_layers // (lay.pp * lay.vpp) if lay.vpp else 1
        seconds *= 1 + (lay.pp - 1) / (max(1, lay.num_microbatches) * chunks)
    return seconds, seconds * gpus / 3600


def candidate_layouts(cfg, gpus, global_batch_size, gpus_per_node=8, precision="bf16"):
    """Every tp (within a node, dividing the heads) x pp (dividing the layers) x dp; micro-batch
    sizes that divide the global batch; recompute none/full; DDP and FSDP2."""
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node and cfg.num_attention_heads % t == 0):
        for pp in (p for p in (1, 2, 4, 8, 16) if cfg.num_layers % p == 0):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for mbs in (1, 2, 4, 8, 16, 32):
                if global_batch_size % (mbs * dp):
                    continue
                for recompute in (None, "full"):
                    for sharding in ("none", "optimizer", "full") if dp > 1 else ("none",):
                        yield Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=tp > 1, micro_batch_size=mbs,
                                     global_batch_size=global_batch_size, recompute=recompute,
                                     sharding=sharding, precision=precision)


def gib(n):
    return n / GIB


# -- tools/plan_run.py ----------------------------------------------------------------------------
def _describe(lay):
    parts = [f"TP{lay.tp}" + ("+SP" if lay.sequence_parallel else ""), f"PP{lay.pp}", f"DP{lay.dp}",
             f"micro-batch {lay.micro_batch_size}", f"recompute {lay.recompute or 'none'}"]
    if lay.sharding != "none":
        parts.append(f"FSDP2 ({lay.sharding})")
    return ", ".join(parts)


def _duration(seconds):
    return f"{seconds / 86400:.2f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def build_parser():
    import argparse

    from megatron_biomed.errors import add_debug_flag
    p = argparse.ArgumentParser(
        description="Memory per GPU and run time of a pretraining run, before submitting it: the --config's "
                    "layout with its memory broken down, then the layouts (TP/PP/DP, micro-batch, recompute, "
                    "FSDP2) that fit, fastest first. Any pretrain_gpt flag (e.g. --micro-batch-size 8) "
                    "overrides the config.",
        epilog="example: python tools/plan_run.py --config examples/configs/biomedlm-2.7b.yaml --gpus 128 "
               "--gpu a100-40gb --mfu 0.23")
    p.add_argument("--config", default=None, help="a pretrain_gpt YAML file (model, batch, layout, train-iters)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the GPU model (memory and bf16 peak)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, overriding --gpu's")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s per GPU, overriding --gpu's")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node")
    p.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilisation to expect (default: 0.50 on H100/H200, as measured by "
                        "benchmarks/train_throughput.py; 0.40 elsewhere)")
    p.add_argument("--top", type=int, default=10, help="layouts to list")
    return add_debug_flag(p)


def _settings(config, overrides):
    """pretrain_gpt's settings from the YAML and flags, without its data/lr checks."""
    from megatron_biomed.training import arguments as A
    parser = A.build_parser()
    if config:
        parser.set_defaults(**A._yaml_defaults(parser, config))
    args, unknown = parser.parse_known_args(overrides)
    if unknown:
        raise A.ConfigError(f"{unknown[0]}: not a flag of pretrain_gpt or plan_run")
    return args


def plan(args, overrides=()):
    from megatron_biomed.arguments import model_config, parallel_config
    from megatron_biomed.config import LayoutError
    from megatron_biomed.model.gpt import flops_per_token
    s = _settings(args.config, list(overrides))
    cfg = model_config(s)
    mem_gib, peak = GPUS[args.gpu]
    mem_gib = args.gpu_memory or mem_gib
    peak = args.peak_tflops or peak
    if peak is None:
        raise LayoutError(f"--gpu {args.gpu}: no bf16 peak known; give --peak-tflops for the time estimate")
    mfu = args.mfu or (0.50 if args.gpu in ("h100", "h200", "h100-nvl") else 0.40)
    precision = precision_of(s)
    parallel = parallel_config(s)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if args.gpus % (tp * pp):
        raise LayoutError(f"--gpus {args.gpus}: not divisible by tensor x pipeline parallel size {tp} x {pp}; "
                          f"give a multiple of {tp * pp} or change the layout")
    parallel.validate(cfg, args.gpus)  # heads, layers and the batch divisible, as training checks them
    dp = parallel.data_parallel_size(args.gpus)
    gbs = s.global_batch_size or s.micro_batch_size * dp
    iters = s.train_iters
    n_params = stage_params(cfg, Layout(), True, True)
    lines = [f"model: {s.model}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {n_params / 1e9:.2f}B parameters, "
             f"{flops_per_token(cfg) / 1e9:.1f} GFLOP per token (seq {cfg.seq_length}); global batch {gbs}; "
             f"{precision}",
             f"GPUs: {args.gpus} x {args.gpu} ({mem_gib:.1f} GiB, {peak:.0f} TFLOP/s dense bf16); expected MFU "
             f"{100 * mfu:.0f}%; {RESERVED_GIB:.0f} GiB per GPU kept for CUDA, NCCL and fragmentation", ""]
    usable = mem_gib - RESERVED_GIB
    mine = Layout.of(parallel, dp, gbs, cfg.recompute_granularity, precision)
    parts = memory(cfg, mine)
    total = gib(sum(parts.values()))
    lines.append(f"the config's layout: {_describe(mine)}")
    for name, b in parts.items():
        if b:
            lines.append(f"  {name:<20} {gib(b):8.2f} GiB")
    verdict = "fits" if total <= usable else "does NOT fit"
    lines.append(f"  {'total':<20} {total:8.2f} GiB  ({verdict} in {usable:.1f} GiB)")
    if iters:
        seconds, hours = run_time(cfg, mine, args.gpus, peak, mfu, iters)
        lines.append(f"  {iters:,} iterations ({iters * gbs * cfg.seq_length / 1e9:,.1f}B tokens): "
                     f"{_duration(seconds)}, {hours:,.0f} GPU-hours")
    rows = []
    for lay in candidate_layouts(cfg, args.gpus, gbs, args.gpus_per_node, precision):
        t = gib(sum(memory(cfg, lay).values()))
        if t <= usable:
            seconds, hours = run_time(cfg, lay, args.gpus, peak, mfu, iters or 1)
            rows.append((seconds, lay.tp * lay.pp, lay.sharding != "none", -lay.micro_batch_size, t, lay, hours))
    # Equal times: less model parallelism and no sharding (less communication), then bigger
    # micro-batches (measured on H100/H200: micro-batch 2 runs at 0.75x the tokens/s of 8).
    rows.sort(key=lambda r: r[:5])
    lines += ["", f"layouts that fit, fastest first ({min(args.top, len(rows))} of {len(rows)}; time "
                  f"{'for ' + format(iters, ',') + ' iterations' if iters else 'per iteration'}, with full "
                  f"recompute's extra forward and the pipeline bubble; TP/PP communication not modelled):",
              "| TP | PP | DP | micro-batch | recompute | sharding | GiB per GPU | time | GPU-hours |",
              "|---|---|---|---|---|---|---|---|---|"]
    for seconds, _, _, _, t, lay, hours in rows[:args.top]:
        lines.append(f"| {lay.tp} | {lay.pp} | {lay.dp} | {lay.micro_batch_size} | {lay.recompute or 'none'} | "
                     f"{lay.sharding} | {t:.1f} | {_duration(seconds) if iters else f'{seconds:.2f} s'} | "
                     f"{hours:,.0f} |")
    if not rows:
        lines.append("| (none: use more GPUs, a smaller global batch or a bigger GPU) |||||||||")
    return "\n".join(lines)


@entry_point
def main(argv=None):
    args, rest = build_parser().parse_known_args(argv)
    print(plan(args, rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
