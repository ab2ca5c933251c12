"""Model and parallelism settings, presets, and the layout checks every entry point shares."""
import dataclasses
import math
from dataclasses import dataclass
from megatron_biomed.errors import UsageError


@dataclass
class GPTConfig:
    vocab_size: int = 28896           # real tokens; the embedding is padded (padded_vocab_size)
    seq_length: int = 1024            # learned absolute positions (n_positions)
    num_layers: int = 32
    hidden_size: int = 2560
    num_attention_heads: int = 20
    ffn_hidden_size: int = None       # 4 x hidden when None
    hidden_dropout: float = 0.1       # residual and embedding dropout (GPT-2's resid/embd_pdrop)
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    scale_attn_by_inverse_layer_idx: bool = True   # BioMedLM: scores / (layer_index + 1)
    init_method_std: float = 0.02
    activation: str = "gelu_new"      # gelu_new (tanh approximation, GPT-2) | gelu (exact erf)
    make_vocab_size_divisible_by: int = 128
    attention_backend: str = "auto"   # auto | flash | cudnn | sdpa | math (model/gpt.py)
    recompute_granularity: str = None  # None | full | selective

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size=1):
        """Megatron's padding: a multiple of make_vocab_size_divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


PRESETS = {
    # stanford-crfm/BioMedLM (see shared/DESIGN.md section 3)
    "biomedlm-2.7b": GPTConfig(),
    "gpt2-small": GPTConfig(vocab_size=50257, num_layers=12, hidden_size=768, num_attention_heads=12,
                            scale_attn_by_inverse_layer_idx=False),
    "gpt2-medium": GPTConfig(vocab_size=50257, num_layers=24, hidden_size=1024, num_attention_heads=16,
                             scale_attn_by_inverse_layer_idx=False),
    # tests and the CPU demo
    "tiny": GPTConfig(vocab_size=512, seq_length=64, num_layers=4, hidden_size=64, num_attention_heads=4),
    "tiny-8l": GPTConfig(vocab_size=512, seq_length=64, num_layers=8, hidden_size=64, num_attention_heads=4),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)


class LayoutError(UsageError, ValueError):
    """A parallel layout that cannot work; the message names the flag to change."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    num_layers_per_virtual_pipeline_stage: int = None
    pipeline_schedule: str = "1f1b"         # 1f1b | gpipe (interleaved when virtual stages are set)
    data_parallel_sharding: str = "none"     # none (DDP) | optimizer (FSDP2, ZeRO-2) | full (ZeRO-3)
    micro_batch_size: int = 1
    global_batch_size: int = None
    overlap_grad_reduce: bool = False        # DDP: reduce each gradient bucket during backward
    ddp_bucket_size: int = None              # gradient elements per bucket (Megatron's default: 40M)

    def data_parallel_size(self, world_size):
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def virtual_stages(self, num_layers):
        """Model chunks per pipeline rank (1 unless interleaved)."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return 1
        return num_layers // (self.pipeline_model_parallel_size * self.num_layers_per_virtual_pipeline_stage)

    def num_microbatches(self, world_size):
        dp = self.data_parallel_size(world_size)
        gbs = self.global_batch_size or self.micro_batch_size * dp
        return gbs // (self.micro_batch_size * dp)

    def validate(self, model, world_size):
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise LayoutError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if world_size % (tp * pp):
            raise LayoutError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
                              f"x --pipeline-model-parallel-size {pp}")
        if model.num_attention_heads % tp:
            raise LayoutError(f"--num-attention-heads {model.num_attention_heads} is not divisible by "
                              f"--tensor-model-parallel-size {tp}")
        if model.ffn_hidden_size % tp:
            raise LayoutError(f"--ffn-hidden-size {model.ffn_hidden_size} is not divisible by "
                              f"--tensor-model-parallel-size {tp}")
        if self.sequence_parallel and tp == 1:
            raise LayoutError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel and model.seq_length % tp:
            raise LayoutError(f"--seq-length {model.seq_length} is not divisible by "
                              f"--tensor-model-parallel-size {tp} (needed by --sequence-parallel)")
        if model.num_layers % pp:
            raise LayoutError(f"--num-layers {model.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}")
        v = self.num_layers_per_virtual_pipeline_stage
        if v is not None:
            if pp == 1:
                raise LayoutError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            if v < 1 or model.num_layers % (pp * v):
                raise LayoutError(f"--num-layers {model.num_layers} is not divisible by "
                                  f"--pipeline-model-parallel-size {pp} x --num-layers-per-virtual-pipeline-stage {v}")
        if self.data_parallel_sharding not in ("none", "optimizer", "full"):
            raise LayoutError(f"--data-parallel-sharding {self.data_parallel_sharding!r}: choose none, optimizer or full")
        dp = self.data_parallel_size(world_size)
        gbs = self.global_batch_size or self.micro_batch_size * dp
        if gbs % (self.micro_batch_size * dp):
            raise LayoutError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                              f"{self.micro_batch_size} x data-parallel size {dp}")
        if v is not None and self.num_microbatches(world_size) % pp:
            raise LayoutError(f"interleaved pipelining needs the number of micro-batches "
                              f"({self.num_microbatches(world_size)}) divisible by "
                              f"--pipeline-model-parallel-size {pp}")


def config_from_dict(d):
    """A GPTConfig from saved settings; keys it does not know (newer or older versions) are ignored."""
    fields = GPTConfig.__dataclass_fields__
    return GPTConfig(**{k: v for k, v in d.items() if k in fields})
