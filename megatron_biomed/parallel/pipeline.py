"""Pipeline parallelism: split the GPT into stages by layer count, run torch's schedules."""
import torch.nn as nn

from megatron_biomed.model.gpt import GPT


def blocks_of(module):
    """The transformer blocks of a GPT (a ModuleList) or of a GPTStage (a ModuleDict)."""
    return module.h.values() if isinstance(module.h, nn.ModuleDict) else module.h


def stage_layers(num_layers, num_stages):
    """Layer indices of each stage: equal contiguous runs."""
    per = num_layers // num_stages
    return [list(range(s * per, (s + 1) * per)) for s in range(num_stages)]


def stages_of_rank(pp_rank, pp_size, virtual):
    """Stage indices held by a pipeline rank: pp_rank, pp_rank + pp, ... (interleaved loop)."""
    return [pp_rank + v * pp_size for v in range(virtual)]


class GPTStage(nn.Module):
    """A contiguous slice of a GPT: embedding on the first stage, final LayerNorm and the (tied)
    output layer on the last. Submodules keep their names in the full model (h.<i>...)."""

    def __init__(self, model, layers, first, last):
        super().__init__()
        self.config, self.padded_vocab_size = model.config, model.padded_vocab_size
        if first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.h = nn.ModuleDict({str(i): model.h[i] for i in layers})
        if last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head

    def forward(self, x):
        if hasattr(self, "wte"):
            x = GPT.embed(self, x)
        x = GPT.blocks(self, x, self.h.values())
        return GPT.head(self, x) if hasattr(self, "lm_head") else x


def build_schedule(stage_modules, stage_ids, num_stages, device, pp_group, n_microbatches, loss_fn, name):
    # imported here: half a second that runs without pipeline parallelism need not pay
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    stages = [PipelineStage(m, i, num_stages, device, group=pp_group) for m, i in zip(stage_modules, stage_ids)]
    if len(stages) > 1:
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[name]
    return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
