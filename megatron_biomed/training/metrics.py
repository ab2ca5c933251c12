"""Throughput, MFU and memory numbers for the log line, and the TensorBoard writer."""
import math
import os

import torch

# Dense bf16/fp16 tensor-core peaks per device, TFLOP/s (vendor data sheets, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda" and (args.bf16 or args.fp16):
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gb(device):
    """Peak GPU memory allocated by torch, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


class Metrics:
    """Writes scalars to TensorBoard, and to Weights & Biases with `wandb` (wandb.init's project,
    name, dir, entity, config), from rank 0 (every rank holds the same reduced values)."""

    def __init__(self, tensorboard_dir, rank, config_text=None, wandb=None):
        self.writer = self.wandb = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
            if config_text:
                self.writer.add_text("config", config_text)
        if wandb and rank == 0:
            self.wandb = start_wandb(**wandb)

    def scalars(self, step, **values):
        values = {k: v for k, v in values.items()
                  if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(project, name, dir, entity, config):
    """A W&B run, or one line that says why not. WANDB_MODE=offline logs to `dir` with no network
    (`wandb sync` uploads it later)."""
    from megatron_biomed.training.arguments import ConfigError
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb-project: the wandb package is not installed; pip install wandb "
                          "(or megatron-biomed[wandb])") from None
    os.makedirs(dir, exist_ok=True)
    try:
        return wandb.init(project=project, name=name, dir=dir, entity=entity, config=config, reinit="create_new")
    except Exception as e:  # noqa: BLE001 - wandb raises its own types (no API key, no network)
        raise ConfigError(f"--wandb-project {project}: W&B could not start: {' '.join(str(e).split())[:300]}; "
                          f"run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to log to "
                          f"{dir} and `wandb sync` it later") from None
