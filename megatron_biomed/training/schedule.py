"""Megatron-LM's schedules in consumed samples: the global batch size (with --rampup-batch-size),
the learning rate and the weight decay (megatron/core/optimizer_param_scheduler.py,
num_microbatches_calculator.py and training.py's update_train_iters, core_v0.16.1).

Megatron counts its schedules in samples: iteration k (0-based) trains on the samples after
`consumed(k)` with the learning rate at `consumed(k)`, and the step then adds the batch it
trained on. With a constant batch, `consumed(k) = k x global batch`, and the iteration flags
(--lr-warmup-iters, --lr-decay-iters) are that many global batches.
"""
import math

from megatron_biomed.training.arguments import ConfigError


class BatchSchedule:
    """The global batch size of each iteration: `start + increment x steps` while fewer than
    `ramp_samples` samples are consumed, where a step is ramp_samples / ((gbs - start) /
    increment) samples; the full batch after that."""

    def __init__(self, global_batch_size, micro_batch_size, data_parallel_size, rampup=None,
                 decrease_if_needed=False):
        self.gbs, self.unit = global_batch_size, micro_batch_size * data_parallel_size
        self.decrease = decrease_if_needed
        self.start = self.increment = self.ramp_samples = None
        if rampup is not None:
            try:
                start, increment, samples = (int(x) for x in rampup)
            except (TypeError, ValueError):
                raise ConfigError(f"--rampup-batch-size {' '.join(map(str, rampup))}: give three whole numbers: "
                                  f"start batch size, increment, ramp-up samples") from None
            if start <= 0 or increment <= 0 or samples < 0:
                raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: the start and increment "
                                  f"must be positive and the samples non-negative")
            if start > global_batch_size or (global_batch_size - start) % increment:
                raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size "
                                  f"{global_batch_size} must be the start plus a whole number of increments")
            self.start, self.increment, self.ramp_samples = start, increment, samples
            steps = (global_batch_size - start) // increment
            self.per_increment = samples / steps if steps and samples else math.inf
        self._consumed = [0]  # consumed samples before each iteration, while the ramp lasts

    @property
    def ramping(self):
        return self.start is not None

    def batch_size(self, consumed):
        """The global batch the iteration starting at `consumed` samples trains on."""
        if not self.ramping or consumed > self.ramp_samples:
            size = self.gbs
        else:
            size = self.start + int(consumed / self.per_increment) * self.increment
        if size % self.unit:
            if not self.decrease:
                raise ConfigError(f"--rampup-batch-size: the global batch of {size} reached at {consumed} samples is "
                                  f"not divisible by --micro-batch-size x data-parallel size ({self.unit}); choose a "
                                  f"start and increment that are multiples of it, or pass "
                                  f"--decrease-batch-size-if-needed")
            size = max(self.unit, size // self.unit * self.unit)
        return size

    def consumed(self, iteration):
        """Samples consumed by iterations 0 .. iteration-1."""
        c = self._consumed
        while self.ramping and len(c) <= iteration and c[-1] <= self.ramp_samples:
            c.append(c[-1] + self.batch_size(c[-1]))
        if iteration < len(c):
            return c[iteration]
        return c[-1] + (iteration - len(c) + 1) * self.gbs  # the full batch from there on

    def sizes(self):
        """The distinct global batch sizes of the run (each must suit the layout)."""
        if not self.ramping:
            return [self.gbs]
        out, c = [], 0
        while True:
            size = self.batch_size(c)
            if size not in out:
                out.append(size)
            if size == self.gbs and c > self.ramp_samples:
                return out
            c += size

    def iterations_for(self, train_samples):
        """Megatron's update_train_iters: the iterations that --train-samples makes (a partial
        last batch is dropped)."""
        if not self.ramping:
            return train_samples // self.gbs
        iterations, consumed = 0, 0
        while consumed <= self.ramp_samples and consumed <= train_samples:
            consumed += self.batch_size(consumed)
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // self.gbs
        return iterations


class LRSchedule:
    """Megatron's OptimizerParamScheduler, its steps in samples."""

    def __init__(self, args, gbs):
        a = args
        if a.train_samples is None:  # iteration-based: the iteration flags are global batches
            self.decay = (a.lr_decay_iters or a.train_iters) * gbs
            self.wd_steps = a.train_iters * gbs
            self.wsd = a.lr_wsd_decay_iters * gbs if a.lr_wsd_decay_iters is not None else None
            self.warmup = (a.lr_warmup_fraction * self.decay if a.lr_warmup_fraction is not None
                           else a.lr_warmup_iters * gbs)
        else:
            self.decay = a.lr_decay_samples or a.train_samples
            self.wd_steps = a.train_samples
            self.wsd = a.lr_wsd_decay_samples
            self.warmup = (a.lr_warmup_fraction * self.decay if a.lr_warmup_fraction is not None
                           else a.lr_warmup_samples)
        self.init, self.max, self.min = a.lr_warmup_init, a.lr, a.min_lr
        self.style, self.wsd_style = a.lr_decay_style, a.lr_wsd_decay_style
        self.start_wd = a.weight_decay if a.start_weight_decay is None else a.start_weight_decay
        self.end_wd = a.weight_decay if a.end_weight_decay is None else a.end_weight_decay
        self.wd_style = a.weight_decay_incr_style
        if self.style == "WSD" and not self.wsd:
            raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")
        if self.wd_style == "constant" and self.start_wd != self.end_wd:
            raise ConfigError(f"--start-weight-decay {self.start_wd} and --end-weight-decay {self.end_wd} differ: "
                              f"give --weight-decay-incr-style linear or cosine")

    def lr(self, n):
        """The learning rate after `n` consumed samples (get_lr)."""
        if self.warmup > 0 and n <= self.warmup:
            return self.init + (self.max - self.init) * n / self.warmup
        if self.style == "constant":
            return self.max
        if n > self.decay:
            return self.min
        if self.style == "inverse-square-root":
            return max(self.min, self.max * max(self.warmup, 1) ** 0.5 / max(n, 1) ** 0.5)
        ratio = (n - self.warmup) / (self.decay - self.warmup)
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: constant, then anneal over the last wsd samples
            start = self.decay - self.wsd
            if n <= start:
                coeff = 1.0
            else:
                r = (n - start) / self.wsd
                coeff = {"linear": 1.0 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1.0),
                         "exponential": 2.0 * 0.5 ** r - 1.0, "minus_sqrt": 1.0 - math.sqrt(r)}[self.wsd_style]
        return self.min + coeff * (self.max - self.min)

    def weight_decay(self, n):
        """The weight decay after `n` consumed samples (get_wd)."""
        if n > self.wd_steps or self.wd_style == "constant":
            return self.end_wd
        r = n / self.wd_steps
        coeff = r if self.wd_style == "linear" else 0.5 * (math.cos(math.pi * (1 - r)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)
