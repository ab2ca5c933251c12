#!/usr/bin/env python3
"""Fine-tune on a biomedical QA task; launch one process per device (torchrun / srun), e.g.
    torchrun --nproc_per_node 8 tools/finetune.py --load biomedlm-hf --task medmcqa \\
        --train-data medmcqa/train.json --valid-data medmcqa/dev.json --tensor-model-parallel-size 2 \\
        --max-length 512 --bf16 --warmup-ratio 0.5 --lr 2e-6 --epochs 10 --save runs/medmcqa
See `python tools/finetune.py --help`; the implementation is megatron_biomed.finetune.trainer."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_biomed.finetune.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
