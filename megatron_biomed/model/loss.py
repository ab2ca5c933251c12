"""Cross entropy over (possibly vocab-sharded) logits, in row chunks, fp32 math per chunk.

`F.cross_entropy(logits.float())` materialises fp32 logits and an fp32 softmax for the whole
micro-batch: at seq 1024, micro-batch 8 and BioMedLM's 28,928 columns that is 0.95 GB each,
more than a transformer layer's activations. Here the logits stay in their compute dtype; each
chunk of rows is upcast, reduced to its log-sum-exp and target logit, and dropped. Backward
recomputes softmax chunk by chunk from the saved logits and the per-row log-sum-exp. With a
tensor-parallel group the logits are that rank's vocabulary shard and the row maxima and sums
are all-reduced (Megatron's vocab-parallel cross entropy), so full logits are never gathered.
"""
import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 25  # fp32 elements upcast at once (128 MiB)


def _rows(logits):
    return max(1, CHUNK_ELEMENTS // logits.shape[-1])


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, group):
        """Per-row loss of (rows, vocab shard) logits; targets index the full vocabulary.
        Columns at or past `vocab_size` (Megatron's padding) are left out."""
        n, width = logits.shape
        real = max(0, min(width, vocab_size - vocab_start))  # 0: a shard of padding only
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty(n, dtype=torch.float32, device=logits.device)
        local_index = (targets - vocab_start).clamp(0, max(real, 1) - 1)
        in_shard = (targets >= vocab_start) & (targets < vocab_start + real)
        step = _rows(logits)
        for i in range(0, n, step):
            rows = min(step, n - i)
            x = logits[i:i + rows, :real].float()
            m = x.max(dim=-1).values if real else x.new_full((rows,), float("-inf"))
            if group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            s = (x - m.unsqueeze(-1)).exp().sum(-1)
            t = (x.gather(-1, local_index[i:i + rows].unsqueeze(-1)).squeeze(-1) * in_shard[i:i + rows]
                 if real else torch.zeros_like(s))
            if group is not None:
                both = torch.stack([s, t])
                dist.all_reduce(both, group=group)
                s, t = both[0], both[1]
            lse[i:i + rows] = m + s.log()
            target_logit[i:i + rows] = t
        ctx.real = real
        ctx.save_for_backward(logits, lse, local_index, in_shard)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, local_index, in_shard = ctx.saved_tensors
        real = ctx.real
        grad = torch.zeros_like(logits) if real < logits.shape[1] else torch.empty_like(logits)
        step = _rows(logits)
        for i in range(0, logits.shape[0] if real else 0, step):
            sl = slice(i, i + step)
            p = (logits[sl, :real].float() - lse[sl].unsqueeze(-1)).exp()
            p.scatter_add_(-1, local_index[sl].unsqueeze(-1), -in_shard[sl].unsqueeze(-1).to(p.dtype))
            grad[sl, :real] = p * grad_loss[sl].unsqueeze(-1)
        return grad, None, None, None, None


def cross_entropy(logits, targets, vocab_size, group=None, vocab_start=0):
    """Per-token losses, shape of `targets`, fp32. `logits`: (..., padded vocab or its shard
    starting at column `vocab_start`); targets < 0 (IGNORE_INDEX) give 0."""
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    ignored = targets < 0  # IGNORE_INDEX; scored as column 0, then zeroed
    losses = ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1).clamp(min=0), vocab_start, vocab_size, group)
    return losses.view(targets.shape).masked_fill(ignored, 0.0)
