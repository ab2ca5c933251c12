#!/bin/bash
# MedMCQA with BioMedLM's fine-tuning protocol for the 2.7B model, on one 8-GPU node: every
# (lr, epochs) point of the grid in turn, then the best by dev accuracy. On a Slurm cluster the
# same grid runs as an array job: slurm/finetune.sbatch (same variables).
#
#   LOAD=release/biomedlm-2.7b-hf MEDMCQA_DIR=/data/medmcqa bash examples/finetune_medmcqa.sh
#
# The paper reports 57.3% MedMCQA dev accuracy for BioMedLM after fine-tuning.
set -euo pipefail
LOAD=${LOAD:?set LOAD (our checkpoint or a Hugging Face directory of the pretrained model)}
MEDMCQA_DIR=${MEDMCQA_DIR:?set MEDMCQA_DIR (holding MedMCQA train.json and dev.json)}
LRS=${LRS:-"2e-6 5e-6 1e-5"}
EPOCHS_LIST=${EPOCHS_LIST:-"10 20"}
NPROC=${NPROC:-8}
TP=${TP:-2}
OUTPUT_ROOT=${OUTPUT_ROOT:-runs/finetune/medmcqa}
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for lr in $LRS; do
    for epochs in $EPOCHS_LIST; do
        out="$OUTPUT_ROOT/lr${lr}_ep${epochs}"
        "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" -m megatron_biomed.finetune.trainer \
            --load "$LOAD" --task medmcqa --train-data "$MEDMCQA_DIR/train.json" \
            --valid-data "$MEDMCQA_DIR/dev.json" --max-length 512 --bf16 --warmup-ratio 0.5 \
            --lr "$lr" --epochs "$epochs" --global-batch-size 32 --tensor-model-parallel-size "$TP" --save "$out"
    done
done
"$PYTHON" - "$OUTPUT_ROOT" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "metrics.json"))):
    m = json.load(open(path))
    rows.append((m["valid"]["accuracy"], os.path.basename(os.path.dirname(path)), m["best_epoch"]))
print("| run | best epoch | dev accuracy |\n|---|---|---|")
for acc, name, epoch in sorted(rows, reverse=True):
    print(f"| {name} | {epoch} | {acc:.4f} |")
PY
