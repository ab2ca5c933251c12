#!/usr/bin/env bash
# The whole pipeline on the bundled sample, on CPU: PubMed/PMC XML -> JSONL -> tokenizer ->
# Megatron .bin/.idx, a read-back through megatron-core, then a short tensor-parallel
# pretraining run of the tiny model, conversion to Hugging Face and generation, multiple-choice
# fine-tuning, generative fine-tuning on patient questions, and a release of that model answered
# by CTranslate2. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-demo_output}
rm -rf "$OUT"; mkdir -p "$OUT"

echo "== 1. PubMed + PMC XML -> JSONL documents"
"$PYTHON" tools/pubmed_to_jsonl.py examples/sample_data --output "$OUT/documents.jsonl" \
    --workers 2 --languages eng --min-chars 200

echo "== 2. BioMedLM tokenizer (byte-level BPE) + offline sentence splitter"
"$PYTHON" tools/train_tokenizer.py --input "$OUT/documents.jsonl" --output-dir "$OUT/tokenizer"

echo "== 3. JSONL -> Megatron indexed dataset (2 workers, 2 partitions keeping the input order)"
"$PYTHON" tools/preprocess_data.py --input "$OUT/documents.jsonl" --output-prefix "$OUT/data/pubmed" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer" --append-eod \
    --workers 2 --partitions 2 --keep-sequential-samples --chunk-size-mb 0.25
"$PYTHON" tools/preprocess_data.py --input "$OUT/documents.jsonl" --output-prefix "$OUT/data/pubmed" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" \
    --merge-file "$OUT/tokenizer/merges.txt" --split-sentences --sentence-splitter "$OUT/tokenizer/sentence_splitter.json" \
    --append-eod --no-progress

echo "== 4. read back with megatron-core's IndexedDataset"
"$PYTHON" - "$OUT" <<'PY'
import sys, warnings
warnings.filterwarnings("ignore")
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import GPT2TokenizerFast
out = sys.argv[1]
tok = GPT2TokenizerFast.from_pretrained(f"{out}/tokenizer")
for level in ("document", "sentence"):
    ds = IndexedDataset(f"{out}/data/pubmed_text_{level}")
    ids = open(f"{out}/data/pubmed_text_{level}.ids").read().split()
    print(f"pubmed_text_{level}: {len(ds.document_indices) - 1} documents, {len(ds)} sequences, "
          f"{int(ds.sequence_lengths.sum())} tokens, dtype {ds.index.dtype.__name__}")
    print(f"  first sequence ({ids[0]}): {tok.decode(ds[0][:40])!r}...")
PY
echo "== 5. pretrain the tiny GPT on it: 2 processes, tensor parallel, checkpoints + TensorBoard"
"$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_port "${DEMO_PORT:-29533}" \
    -m megatron_biomed.pretrain_gpt --config examples/configs/tiny.yaml --tensor-model-parallel-size 2 \
    --vocab-file "$OUT/tokenizer/vocab.json" --data-path "$OUT/data/pubmed_text_document" \
    --data-cache-path "$OUT/data/index-cache" --save "$OUT/checkpoints" --tensorboard-dir "$OUT/tensorboard" \
    | tee "$OUT/train.log" | grep -E "^ (iteration|validation|test)|saved|error"
"$PYTHON" - "$OUT/train.log" <<'PY'
import re, sys
losses = [float(x) for x in re.findall(r"^ iteration .*?lm loss: (\S+)", open(sys.argv[1]).read(), re.M)]
print(f"training loss fell from {losses[0]:.3f} to {losses[-1]:.3f}")
assert losses[-1] < losses[0], "the loss did not fall"
PY

echo "== 6. convert the trained model to Hugging Face and generate with it"
"$PYTHON" tools/convert_checkpoint.py --load "$OUT/checkpoints" --save "$OUT/hf" --target-format hf \
    --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" --force
"$PYTHON" - "$OUT/hf" <<'PY'
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM
from megatron_biomed.convert.ours import OursSource, build_model
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ours = build_model(OursSource(sys.argv[1].replace("/hf", "/checkpoints")))
x = torch.randint(0, hf.config.vocab_size, (1, 64))
with torch.no_grad():
    diff = (hf(x).logits - ours(x)[..., :hf.config.vocab_size]).abs().max().item()
print(f"transformers loads it: max |logits difference| vs our checkpoint = {diff:.2e}")
assert diff <= 1e-4
PY
"$PYTHON" tools/generate.py --load "$OUT/hf" --prompt "The patients were randomized to" \
    --max-new-tokens 24 --greedy --output "$OUT/completions.jsonl"
"$PYTHON" -c "import json,sys; r=json.loads(open(sys.argv[1]).read()); print(repr(r['prompt']), '->', repr(r['completion']))" \
    "$OUT/completions.jsonl"

echo "== 7. fine-tune on a small synthetic multiple-choice set in MedMCQA's format, then evaluate"
"$PYTHON" - "$OUT/mc" <<'PY'
import json, os, sys
from megatron_biomed.data import synthetic
os.makedirs(sys.argv[1], exist_ok=True)
for name, n, seed in (("train.json", 256, 1), ("dev.json", 64, 2)):
    with open(os.path.join(sys.argv[1], name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in synthetic.medmcqa_like(n, seed))
PY
"$PYTHON" tools/evaluate.py --load "$OUT/hf" --task medmcqa --data "$OUT/mc/dev.json" \
    --metrics-file "$OUT/mc/zero_shot.json" > /dev/null
"$PYTHON" tools/finetune.py --load "$OUT/checkpoints" --vocab-file "$OUT/tokenizer/vocab.json" \
    --merge-file "$OUT/tokenizer/merges.txt" --task medmcqa --train-data "$OUT/mc/train.json" \
    --valid-data "$OUT/mc/dev.json" --epochs 8 --lr 3e-3 --warmup-ratio 0.1 --global-batch-size 16 \
    --max-length 64 --hidden-dropout 0 --attention-dropout 0 --save "$OUT/finetune" | grep -E "^ (epoch|before)|done"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
zero = json.load(open(f"{out}/mc/zero_shot.json"))
ft = json.load(open(f"{out}/finetune/metrics.json"))
print("| synthetic MedMCQA-format dev (64 questions, 4 options) | accuracy |")
print("|---|---|")
print(f"| chance | 0.2500 |")
print(f"| zero-shot (option log-likelihood) | {zero['acc']['accuracy']:.4f} |")
print(f"| fine-tuned head, before training | {ft['history'][0]['valid']['accuracy']:.4f} |")
print(f"| fine-tuned, best epoch ({ft['best_epoch']}) | {ft['valid']['accuracy']:.4f} |")
PY

echo "== 8. patient questions: fine-tune the model to write answers (synthetic consumer-health pairs)"
"$PYTHON" - "$OUT/qa" <<'PY'
import json, os, sys
from megatron_biomed.data import synthetic
os.makedirs(sys.argv[1], exist_ok=True)
for name, n, seed in (("train.jsonl", 320, 1), ("dev.jsonl", 32, 2)):
    with open(os.path.join(sys.argv[1], name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in synthetic.patient_qa_like(n, seed))
PY
"$PYTHON" tools/finetune.py --load "$OUT/hf" --task patient_qa --train-data "$OUT/qa/train.jsonl" \
    --valid-data "$OUT/qa/dev.jsonl" --epochs 10 --lr 3e-3 --warmup-ratio 0.1 --global-batch-size 16 \
    --max-length 64 --max-new-tokens 24 --hidden-dropout 0 --attention-dropout 0 --save "$OUT/patient_qa" \
    | grep -E "^ (epoch|before)|done"
"$PYTHON" - "$OUT/patient_qa" <<'PY'
import json, sys
out = sys.argv[1]
before = [json.loads(x) for x in open(f"{out}/valid_generations_before.jsonl")]
after = [json.loads(x) for x in open(f"{out}/valid_generations.jsonl")]
metrics = json.load(open(f"{out}/metrics.json"))
for b, a in list(zip(before, after))[:3]:
    print(f"Q: {b['question']}\n   reference: {b['reference']}\n   before:    {b['generated'][:90]!r}\n"
          f"   after:     {a['generated']!r}")
print(f"dev ROUGE-L: {metrics['history'][0]['valid']['rougeL']:.3f} before fine-tuning, "
      f"{metrics['valid']['rougeL']:.3f} after (best epoch {metrics['best_epoch']})")
assert metrics["valid"]["rougeL"] > metrics["history"][0]["valid"]["rougeL"]
PY
"$PYTHON" tools/review_sheet.py --answers before="$OUT/patient_qa/valid_generations_before.jsonl" \
    --answers after="$OUT/patient_qa/valid_generations.jsonl" --output "$OUT/patient_qa/review.html"

echo "== 9. release the patient-QA model (portable weights, model card) and answer with CTranslate2"
"$PYTHON" tools/release.py --load "$OUT/patient_qa/best" --save "$OUT/release" --dtype fp32
"$PYTHON" - "$OUT" <<'PY'
import json, sys, warnings
warnings.filterwarnings("ignore")
import ctranslate2
from ctranslate2.converters import TransformersConverter
from transformers import AutoTokenizer
from megatron_biomed.generation import generate, load_for_inference
out = sys.argv[1]
TransformersConverter(f"{out}/release").convert(f"{out}/release-ct2", force=True)
tok = AutoTokenizer.from_pretrained(f"{out}/release")
question = json.loads(open(f"{out}/qa/dev.jsonl").readline())["question"]
ids = tok(f"Question: {question}\nAnswer:")["input_ids"]
engine = ctranslate2.Generator(f"{out}/release-ct2", device="cpu", compute_type="float32")
theirs = engine.generate_batch([tok.convert_ids_to_tokens(ids)], max_length=24, sampling_topk=1,
                               include_prompt_in_result=False)[0].sequences_ids[0]
model, _ = load_for_inference(f"{out}/patient_qa/best", "cpu", "fp32")
ours, _ = generate(model, ids, max_new_tokens=24, eos_id=tok.eos_token_id)
ours = [t for t in ours if t != tok.eos_token_id]
print(f"Q: {question}\n   ours:        {tok.decode(ours)!r}\n   CTranslate2: {tok.decode(theirs)!r}")
assert ours == theirs, "CTranslate2 and megatron_biomed disagree on the release"
print(f"the same answer, token for token; model card: {out}/release/README.md")
PY

echo "== outputs"
find "$OUT" -type f | sort | xargs ls -l
