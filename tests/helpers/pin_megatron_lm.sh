#!/bin/bash
# Regenerates tests/data/megatron_lm/expected.json: the SHA-256 of the .bin/.idx files that
# Megatron-LM's own tools/preprocess_data.py (core_v0.16.1, --legacy-tokenizer) writes for the
# inputs of tests/helpers/megatron_edge_cases.py. CI cannot fetch Megatron-LM; run this by hand:
#
#   git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1
#   tests/helpers/pin_megatron_lm.sh Megatron-LM
#
# It needs `six` importable (Megatron's tokenizer package imports it). Megatron's training
# package imports triton at module level for a kernel preprocessing never uses; on a machine
# without triton the copy made here has that one import line replaced.
set -euo pipefail
MLM=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DATA=$ROOT/tests/data/megatron_lm
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/mlm"
cp -r "$MLM/megatron" "$MLM/tools" "$WORK/mlm/"
"$PY" -c "import triton" 2>/dev/null || sed -i \
  's/^from megatron.core.transformer.custom_layers.batch_invariant_kernels import enable_batch_invariant_mode/enable_batch_invariant_mode = None/' \
  "$WORK/mlm/megatron/training/initialize.py"
"$PY" "$ROOT/tests/helpers/megatron_edge_cases.py" "$WORK/in"
TOK=(--tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/tokenizer/vocab.json"
     --merge-file "$DATA/tokenizer/merges.txt" --legacy-tokenizer)
# Megatron finds NLTK's Punkt model through nltk's default search path only when NLTK_DATA is
# unset (with NLTK_DATA it asks for a pickle that nltk >= 3.9 no longer loads): use a HOME whose
# nltk_data is ours.
export HOME=$WORK/home
mkdir -p "$HOME" && cp -r "$DATA/nltk_data" "$HOME/nltk_data"
unset NLTK_DATA

run() {  # run CASE INPUT FLAGS...: Megatron-LM on a private copy of INPUT (it writes beside it)
  local case=$1 input=$2; shift 2
  mkdir -p "$WORK/$case"
  cp "$input" "$WORK/$case/"
  local in
  in="$WORK/$case/$(basename "$input")"
  for _ in 1 2; do  # with --split-sentences and one partition, Megatron's first run only splits
    (cd "$WORK/mlm" && PYTHONPATH="$WORK/mlm${PYTHONPATH:+:$PYTHONPATH}" "$PY" tools/preprocess_data.py --input "$in" \
       --output-prefix "$WORK/$case/out" "${TOK[@]}" "$@" >>"$WORK/$case/log" 2>&1)
    ls "$WORK/$case"/out*_text_*.idx >/dev/null 2>&1 && break
  done
}
run edge "$WORK/in/edge.jsonl" --workers 1
run edge_eod "$WORK/in/edge.jsonl" --workers 1 --append-eod
run edge_partitions "$WORK/in/edge.jsonl" --workers 2 --partitions 2 --append-eod
run edge_partitions_sequential "$WORK/in/edge.jsonl" --workers 2 --partitions 2 --append-eod --keep-sequential-samples
run sentences "$WORK/in/sentences.jsonl" --workers 1 --append-eod --split-sentences --lang english
run sentences_keep_newlines "$WORK/in/sentences.jsonl" --workers 1 --append-eod --split-sentences --lang english --keep-newlines
run sentences_default_lang "$WORK/in/sentences.jsonl" --workers 1 --append-eod --split-sentences
run cr_line_ends "$WORK/in/cr.jsonl" --workers 1 --append-eod
run mixed_line_ends_partitions "$WORK/in/mixed.jsonl" --workers 2 --partitions 2 --append-eod
run tokenizer_flags "$WORK/in/edge.jsonl" --workers 1 --append-eod --vocab-size 50257 --padded-vocab-size 50304 \
  --vocab-extra-ids 0 --tokenizer-hf-use-fast
# Megatron's own sentence-split output (text as a list of sentences) is an input case too.
cp "$WORK/sentences/sentences_ss.jsonl" "$DATA/sentences_ss.jsonl"

"$PY" - "$WORK" "$DATA/expected.json" <<'PY'
import glob, hashlib, json, os, sys
work, out = sys.argv[1:]
pins = {}
for case in ["edge", "edge_eod", "edge_partitions", "edge_partitions_sequential", "sentences",
             "sentences_keep_newlines", "sentences_default_lang", "cr_line_ends", "mixed_line_ends_partitions",
             "tokenizer_flags"]:
    files = sorted(glob.glob(os.path.join(work, case, "out_text_*.bin")) + glob.glob(os.path.join(work, case, "out_text_*.idx")))
    assert len(files) == 2, (case, files, open(os.path.join(work, case, "log")).read()[-2000:])
    pins[case] = {os.path.basename(f)[len("out"):]: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
json.dump({"megatron_lm": "core_v0.16.1", "tokenizer": "--legacy-tokenizer GPT2BPETokenizer", "cases": pins},
          open(out, "w"), indent=1)
print(json.dumps(pins, indent=1))
PY
