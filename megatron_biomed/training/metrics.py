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
    """Writes scalars to TensorBoard from rank 0 (every rank holds the same reduced values)."""

    def __init__(self, tensorboard_dir, rank, config_text=None):
        self.writer = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
            if config_text:
                self.writer.add_text("config", config_text)

    def scalars(self, step, **values):
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(name, value, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
