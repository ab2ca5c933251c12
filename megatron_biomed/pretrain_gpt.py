"""Pretrain a GPT on Megatron .bin/.idx data: `python -m megatron_biomed.pretrain_gpt --help`.

Launch one process per device with torchrun or srun, e.g.
    torchrun --nproc_per_node 8 -m megatron_biomed.pretrain_gpt \\
        --config examples/configs/biomedlm-2.7b.yaml --tensor-model-parallel-size 2
"""
import sys

from megatron_biomed.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
