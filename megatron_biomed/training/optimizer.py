"""AdamW with Megatron's parameter groups, and fp16 loss scaling (the schedules: schedule.py)."""
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


def set_lr(optimizer, lr, weight_decay=None):
    """The learning rate of every group; `weight_decay` for the groups that decay (Megatron's
    --start-weight-decay .. --end-weight-decay schedule)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if weight_decay is not None and i == 0:  # build_optimizer's first group is the one that decays
            group["weight_decay"] = weight_decay


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
