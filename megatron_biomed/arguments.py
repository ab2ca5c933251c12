"""Megatron-LM's command-line flags for the model and the parallel layout."""
import argparse

from megatron_biomed.config import PRESETS, LayoutError, ParallelConfig, preset

_MODEL_FLAGS = {  # flag -> GPTConfig field
    "--num-layers": ("num_layers", int), "--hidden-size": ("hidden_size", int),
    "--num-attention-heads": ("num_attention_heads", int), "--seq-length": ("seq_length", int),
    "--ffn-hidden-size": ("ffn_hidden_size", int), "--vocab-size": ("vocab_size", int),
    "--hidden-dropout": ("hidden_dropout", float), "--attention-dropout": ("attention_dropout", float),
    "--layernorm-epsilon": ("layernorm_epsilon", float), "--init-method-std": ("init_method_std", float),
    "--norm-epsilon": ("layernorm_epsilon", float),
    "--make-vocab-size-divisible-by": ("make_vocab_size_divisible_by", int),
}


# Megatron-LM's --attention-backend values, as ours names the same kernels
_MEGATRON_BACKENDS = {"fused": "cudnn", "unfused": "math", "local": "math"}


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="biomedlm-2.7b", choices=sorted(PRESETS), help="preset to start from")
    names = {}
    for flag, (field, typ) in _MODEL_FLAGS.items():
        names.setdefault(field, (typ, []))[1].append(flag)
    for field, (typ, flags) in names.items():  # --norm-epsilon is Megatron-LM's newer name
        g.add_argument(*flags, dest=field, type=typ, default=None, help=f"override the preset's {field}")
    g.add_argument("--attention-backend", choices=["auto", "flash", "cudnn", "sdpa", "math"] + sorted(_MEGATRON_BACKENDS),
                   default=None, type=lambda v: _MEGATRON_BACKENDS.get(v, v),
                   help="auto: flash-attn if installed, else SDPA pinned to its cuDNN/FlashAttention kernels "
                        "on a GPU in bf16/fp16; flash / cudnn: that kernel only; sdpa: SDPA's own choice; "
                        "math: the fp32-softmax reference. Megatron-LM's names: fused = cudnn, unfused and "
                        "local = math")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-activations", dest="recompute_granularity", action="store_const", const="selective",
                   help="Megatron-LM's name for --recompute-granularity selective")
    g.add_argument("--checkpoint-activations", dest="recompute_granularity", action="store_const", const="full",
                   help="Megatron-LM's old name for --recompute-granularity full")
    g.add_argument("--activation", choices=["gelu_new", "gelu"], default=None,
                   help="MLP activation: gelu_new (GPT-2/BioMedLM, tanh approximation) or exact gelu")
    g.add_argument("--openai-gelu", dest="activation", action="store_const", const="gelu_new",
                   help="Megatron-LM's name for --activation gelu_new")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="learned positions: must equal --seq-length (sets it when that is not given)")
    g.add_argument("--kv-channels", type=int, default=None, help="must equal --hidden-size / --num-attention-heads")
    g.add_argument("--no-scale-attn-by-inverse-layer-idx", dest="scale_attn_by_inverse_layer_idx",
                   action="store_false", default=None, help="plain GPT-2 attention scaling")
    return parser


def add_parallel_args(parser):
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--pipeline-schedule", choices=["1f1b", "gpipe"], default="1f1b")
    g.add_argument("--data-parallel-sharding", choices=["none", "optimizer", "full"], default="none",
                   help="none: DDP; optimizer: FSDP2 keeping parameters between forward and backward; "
                        "full: FSDP2 (ZeRO-3)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron-LM's sharded optimizer: here --data-parallel-sharding optimizer (FSDP2, parameters "
                        "kept between forward and backward, gradients and optimizer states sharded)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    return parser


def model_config(args):
    if getattr(args, "max_position_embeddings", None) is not None and getattr(args, "seq_length", None) is None:
        args.seq_length = args.max_position_embeddings
    overrides = {f: getattr(args, f) for f, _ in _MODEL_FLAGS.values() if getattr(args, f, None) is not None}
    for f in ("attention_backend", "recompute_granularity", "scale_attn_by_inverse_layer_idx", "activation"):
        if getattr(args, f, None) is not None:
            overrides[f] = getattr(args, f)
    if "hidden_size" in overrides and "ffn_hidden_size" not in overrides:
        overrides["ffn_hidden_size"] = 4 * overrides["hidden_size"]
    config = preset(args.model, **overrides)
    mpe, kv = getattr(args, "max_position_embeddings", None), getattr(args, "kv_channels", None)
    if mpe is not None and mpe != config.seq_length:
        raise LayoutError(f"--max-position-embeddings {mpe}: the learned position table has --seq-length "
                          f"({config.seq_length}) rows here; give them equal")
    if kv is not None and kv != config.head_dim:
        raise LayoutError(f"--kv-channels {kv}: heads here are --hidden-size / --num-attention-heads = "
                          f"{config.head_dim} wide; leave it out or give {config.head_dim}")
    return config


def parallel_config(args):
    if getattr(args, "use_distributed_optimizer", False) and args.data_parallel_sharding == "none":
        args.data_parallel_sharding = "optimizer"
    return ParallelConfig(**{f: getattr(args, f) for f in (
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
        "num_layers_per_virtual_pipeline_stage", "pipeline_schedule", "data_parallel_sharding",
        "micro_batch_size", "global_batch_size")},
        **{f: getattr(args, f) for f in ("overlap_grad_reduce", "ddp_bucket_size") if hasattr(args, f)})


def build_parser(description=None):
    return add_parallel_args(add_model_args(argparse.ArgumentParser(description=description)))
