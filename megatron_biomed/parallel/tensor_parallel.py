"""Megatron-style tensor (and sequence) parallelism applied to the plain GPT with DTensor plans.

QKV and fc1 are column-parallel, attention-out and fc2 row-parallel, the embedding and the tied
output layer vocab-parallel; the loss is a vocab-parallel cross entropy on each rank's logits
shard (model/loss.py), so full logits are never gathered. With sequence parallelism the LayerNorm/dropout
regions hold a 1/TP slice of the sequence.
"""
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from megatron_biomed.model.loss import cross_entropy
from megatron_biomed.parallel.pipeline import blocks_of


def _replicate(module, mesh):
    """Parameters as replicated DTensors, plain tensors in and out (so FSDP2 sees one kind)."""
    distribute_module(
        module, mesh,
        input_fn=lambda mod, inputs, m: tuple(
            DTensor.from_local(x, m, [Replicate()], run_check=False) if isinstance(x, torch.Tensor)
            and not isinstance(x, DTensor) else x for x in inputs),
        output_fn=lambda mod, out, m: out.to_local() if isinstance(out, DTensor) else out)


def apply_tensor_parallel(module, tp_mesh, sequence_parallel=False):
    """Shard a GPT (or pipeline stage of one) over `tp_mesh` in place."""
    seq = Shard(1) if sequence_parallel else Replicate()
    for block in blocks_of(module):
        plan = {
            "attn.c_attn": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=seq),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan.update({
                "ln_1": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "ln_2": SequenceParallel(),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
        if not sequence_parallel:
            _replicate(block.ln_1, tp_mesh)
            _replicate(block.ln_2, tp_mesh)
    if getattr(module, "wte", None) is not None:
        plan = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)}
        if sequence_parallel:
            # Positions are sharded like tokens so that the two embeddings add up slice by slice.
            plan["wpe"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
        parallelize_module(module, tp_mesh, plan)
        if not sequence_parallel:
            _replicate(module.wpe, tp_mesh)
    if getattr(module, "lm_head", None) is not None:
        if sequence_parallel:
            parallelize_module(module.ln_f, tp_mesh, SequenceParallel())
        else:
            _replicate(module.ln_f, tp_mesh)
        parallelize_module(module, tp_mesh, {"lm_head": ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=True)})
        if getattr(module, "wte", None) is not None:
            module.lm_head.weight = module.wte.weight  # both Shard(0) over the vocabulary: re-tie
    return module


IGNORE_INDEX = -100  # targets with this value (masked by the dataset's loss_mask) add no loss


def lm_loss(logits, targets, vocab_size, tp_group=None, tp_rank=0):
    """Mean cross entropy over the targets that are not IGNORE_INDEX, of (possibly
    vocab-sharded) logits; padded vocabulary columns are left out."""
    losses = cross_entropy(logits, targets, vocab_size, tp_group, tp_rank * logits.shape[-1]).flatten()
    valid = (targets != IGNORE_INDEX).flatten()
    if bool(valid.all()):
        return losses.mean()
    return losses.sum() / valid.sum().clamp(min=1)


def tensor_parallel_dropout_rng(module, tp_rank, sequence_parallel=False):
    """Give dropout inside tensor-parallel regions a different stream on each TP rank, as
    Megatron's model-parallel RNG does: attention dropout (each rank holds other heads) and,
    with sequence parallelism, the dropouts on each rank's slice of the sequence. Replicated
    activations keep the default stream, identical across TP ranks.

    The stream is seeded from a number drawn from the default generator, so activation
    recomputation (which restores the default generator) replays the same masks."""
    from megatron_biomed.model.gpt import CoreAttention
    saved = {}

    def enter(mod, args):
        seed = int(torch.randint(0, 2**62, (1,)).item())
        saved[id(mod)] = (torch.get_rng_state(),
                          torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        torch.manual_seed(seed + 2718 * (tp_rank + 1))

    def leave(mod, args, out):
        cpu, cuda = saved.pop(id(mod))
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    handles = []
    for name, m in module.named_modules():
        region = isinstance(m, CoreAttention) or (
            sequence_parallel and isinstance(m, torch.nn.Dropout) and m.p > 0)
        if region and (not isinstance(m, CoreAttention) or m.dropout > 0):
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
    return handles
