"""AdamW with Megatron's parameter groups, its learning-rate schedule, and fp16 loss scaling."""
import math

import torch


def build_optimizer(model, args, device):
    """AdamW over fp32 (master) parameters; no weight decay on biases and LayerNorm weights.
    torch's fused kernel on GPU, its multi-tensor (foreach) one on CPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    if device.type == "cuda":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(groups, **kw)


def init_optimizer_state(optimizer):
    """Create AdamW's state as its first step would (zeros), so a checkpoint can load into it."""
    fused = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def lr_at(iteration, args):
    """Megatron's schedule: linear warmup from 0, then constant / linear / cosine decay from
    --lr to --min-lr over --lr-decay-iters, then --min-lr."""
    max_lr, min_lr = args.lr, args.min_lr
    warmup = args.lr_warmup_iters
    if warmup > 0 and iteration < warmup:
        return max_lr * (iteration + 1) / warmup
    if args.lr_decay_style == "constant":
        return max_lr
    if iteration >= args.lr_decay_iters:
        return min_lr
    ratio = (iteration - warmup) / max(1, args.lr_decay_iters - warmup)
    if args.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class LossScaler:
    """fp16 loss scaling. Dynamic (Megatron's DynamicGradScaler): halve after `hysteresis`
    overflowing steps (which are skipped), double after `window` good ones. Static when
    `static` is given."""

    def __init__(self, initial=2.0 ** 32, min_scale=1.0, window=1000, hysteresis=2, static=None):
        self.scale = float(static if static is not None else initial)
        self.dynamic = static is None
        self.min_scale, self.window, self.hysteresis = min_scale, window, hysteresis
        self.good_steps, self.hysteresis_left = 0, hysteresis

    def update(self, found_inf):
        if not self.dynamic:
            return
        if found_inf:
            self.good_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self.good_steps += 1
            if self.good_steps % self.window == 0:
                self.scale *= 2.0
                self.hysteresis_left = self.hysteresis

    def state_tensor(self):
        return torch.tensor([self.scale, self.good_steps, self.hysteresis_left], dtype=torch.float64)

    def load_state_tensor(self, t):
        self.scale, self.good_steps, self.hysteresis_left = float(t[0]), int(t[1]), int(t[2])
