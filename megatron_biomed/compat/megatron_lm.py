"""Every Megatron-LM command-line flag, sorted into what our tools do with it.

megatron_lm_flags.json pins the flags of Megatron-LM core_v0.16.1's `pretrain_gpt.py`
(megatron/training/arguments.py) and `tools/preprocess_data.py`, with their arity and defaults
(tests/helpers/pin_megatron_lm_flags.py regenerates it from a checkout). Each flag is one of:

- honoured: our tool has the flag, with Megatron's meaning;
- accepted: a no-op that is true of our engine (a fusion, a logging switch for something we
  always log); `--debug` prints why;
- refused: one line that says why and what to use instead. A refused flag given with
  Megatron's default value changes nothing, so it is accepted;
- only: accepted with the values listed (what our engine does), refused with any other.

"unrecognized arguments" never appears for a Megatron-LM flag. `table()` writes the docs'
table from the same rules, so the two cannot drift (docs/megatron-lm-flags.md).
"""
import argparse
import functools
import json
import os

from megatron_biomed.errors import UsageError

PIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_lm_flags.json")
DEST_PREFIX = "_megatron_lm__"  # where flags that our tools do not use land after parsing


@functools.lru_cache(maxsize=None)
def pinned():
    with open(PIN, encoding="utf-8") as f:
        return json.load(f)


# -- why ------------------------------------------------------------------------------------
_DENSE = "not this architecture: the model is GPT-2 (dense MLP, learned absolute positions, LayerNorm)"
_TE = ("Transformer Engine is not used (it is not installed with megatron_biomed); ours gets its speed from "
       "FlashAttention/cuDNN attention kernels and --compile")
_FP8 = "FP8 training is not built yet (issue 29); train in --bf16"
_MEM = "ours keeps a fixed allocation; --recompute-granularity full and tools/plan_run.py fit a model to memory"
_TIMERS = "ours logs step time, throughput and MFU at every --log-interval, and to TensorBoard; there are no other timers"
_DCP = ("checkpoints are PyTorch Distributed Checkpoint (DCP) directories, every rank writing its own shards "
        "and any layout loading any other")
_FUSION = "a kernel fusion switch: ours runs PyTorch's own kernels (and torch.compile with --compile), with or without it"

ACCEPTED = {
    # model and kernels
    "--use-mcore-models": "ours is one PyTorch model; there are no legacy models to choose between",
    "--use-legacy-models": None,  # refused below
    "--no-masked-softmax-fusion": _FUSION, "--no-bias-gelu-fusion": _FUSION, "--no-bias-dropout-fusion": _FUSION,
    "--no-bias-swiglu-fusion": _FUSION, "--no-rope-fusion": _FUSION, "--no-persist-layer-norm": _FUSION,
    "--no-gradient-accumulation-fusion": _FUSION, "--disable-jit-fuser": _FUSION, "--cross-entropy-loss-fusion": _FUSION,
    "--cross-entropy-fusion-impl": _FUSION, "--moe-permute-fusion": None, "--no-gradient-reduce-div-fusion": _FUSION,
    "--use-flash-attn": "ours uses FlashAttention kernels whenever they can run (--attention-backend auto, or flash)",
    "--attention-softmax-in-fp32": "ours computes the softmax in fp32 in every attention backend",
    "--apply-query-key-layer-scaling": ("leaves the scores unchanged (Megatron divides by the layer number and "
                                        "multiplies back inside an fp32 softmax); ours computes the softmax in fp32"),
    "--add-qkv-bias": "GPT-2 has query, key and value biases",
    "--use-cpu-initialization": "ours initialises on the device it trains on, with the same values as on the CPU",
    "--no-initialization": "ours initialises before it loads; the loaded weights replace the initial ones",
    "--init-model-with-meta-device": "ours initialises on the device it trains on",
    "--no-async-tensor-model-parallel-allreduce": "a communication-overlap switch of Megatron's own TP layers",
    "--no-clone-scatter-output-in-embedding": "an implementation detail of Megatron's sequence-parallel embedding",
    "--no-create-attention-mask-in-dataloader": "ours never builds attention masks in the data loader (causal kernels)",
    "--accumulate-allreduce-grads-in-fp32": "ours accumulates and reduces gradients in fp32 under --bf16 always",
    "--use-distributed-optimizer": None, "--overlap-grad-reduce": None,  # honoured (ours)
    # data
    "--num-workers": ("batches are read from the memory-mapped .bin in the training process; there is no "
                      "loader process to parallelise"),
    "--num-dataset-builder-threads": "index building runs on rank 0 once and is cached",
    # logging
    "--log-throughput": "ours logs tokens/s, TFLOP/s per device and MFU at every --log-interval",
    "--log-timers-to-tensorboard": _TIMERS, "--timing-log-level": _TIMERS, "--timing-log-option": _TIMERS,
    "--no-barrier-with-level-1-timing": _TIMERS,
    "--log-validation-ppl-to-tensorboard": "ours writes validation/ppl to TensorBoard always",
    "--log-memory-to-tensorboard": "ours writes train/peak_mem_gib to TensorBoard always",
    "--log-world-size-to-tensorboard": "ours writes the layout (and world size) into TensorBoard's text tab",
    "--tensorboard-log-interval": "ours writes the loss every iteration and the rest every --log-interval",
    "--tensorboard-queue-size": "TensorBoard's writer queue; ours flushes at every --log-interval",
    "--no-log-loss-scale-to-tensorboard": "ours writes the loss scale under --fp16 only",
    "--log-progress": "ours prints progress at every --log-interval",
    "--logging-level": "ours prints what a run needs at INFO; --debug adds tracebacks",
    "--no-one-logger": "ours sends no telemetry anywhere",
    "--disable-msc": "ours reads local and shared file systems only (no object stores)",
    "--log-device-memory-used": "ours writes peak device memory at every --log-interval",
    "--log-memory-interval": "ours writes peak device memory at every --log-interval",
    "--legacy-tokenizer": "training reads token ids; tokenizer flags matter to tools/preprocess_data.py",
    "--dataloader-fast-cache-load": "megatron-core's index caches are built once (rank 0) and memory-mapped",
    "--dataloader-defer-npy-index-mmap": "megatron-core's index caches are built once (rank 0) and memory-mapped",
    "--no-mmap-bin-files": "the samples are the same either way; ours memory-maps the .bin",
    # checkpoints
    "--use-dist-ckpt": _DCP, "--ckpt-fully-parallel-save": _DCP, "--no-ckpt-fully-parallel-save": _DCP,
    "--ckpt-fully-parallel-load": _DCP, "--ckpt-assume-constant-structure": _DCP, "--dist-ckpt-strictness": _DCP,
    "--dist-ckpt-optim-fully-reshardable": _DCP, "--distrib-optim-fully-reshardable-mem-efficient": _DCP,
    "--use-mp-args-from-checkpoint-args": "ours loads a checkpoint of any layout into any other (resharding)",
    "--auto-detect-ckpt-format": ("ours detects the format of --load and, for a Hugging Face or Megatron-LM "
                                  "checkpoint, says how to convert it"),
    "--use-persistent-ckpt-worker": "with --async-save ours writes in a background thread of each rank",
    "--no-use-tokenizer-model-from-checkpoint-args": "ours takes the tokenizer from --vocab-file only",
    "--dist-ckpt-save-pre-mcore-014": _DCP,
    # distributed
    "--distributed-backend": "ours uses NCCL on GPUs and gloo on CPUs, whichever is named",
    "--local-rank": "ours reads LOCAL_RANK from the environment (torchrun, srun)",
    "--no-overlap-p2p-communication": "torch.distributed.pipelining's schedules send and receive as they need",
    "--overlap-p2p-communication-warmup-flush": "torch.distributed.pipelining's schedules send and receive as they need",
    "--no-scatter-gather-tensors-in-pipeline": "torch.distributed.pipelining's schedules send and receive as they need",
    "--use-ring-exchange-p2p": "torch.distributed.pipelining's schedules send and receive as they need",
    "--no-align-grad-reduce": "with --overlap-grad-reduce ours starts each bucket's reduction when it is ready",
    "--no-align-param-gather": "FSDP2 gathers parameters ahead of each block",
    "--disable-gloo-process-groups": "ours creates gloo groups only on CPU runs",
    "--ddp-average-in-collective": "ours averages data-parallel gradients (the mean is taken after the sum)",
    "--exit-signal-handler": None,  # honoured (ours)
    "--manual-gc": "ours leaves Python's garbage collector as it is",
    "--manual-gc-interval": "ours leaves Python's garbage collector as it is",
    "--no-manual-gc-eval": "ours leaves Python's garbage collector as it is",
    "--high-priority-stream-groups": "ours does not set CUDA stream priorities",
    "--rerun-mode": None,
    "--error-injection-rate": None,
    "--no-check-for-nan-in-loss-and-grad": None,
}
ACCEPTED = {k: v for k, v in ACCEPTED.items() if v is not None}

# flag -> (values accepted, why others are refused). Values are compared as written.
ONLY = {
    "--transformer-impl": (("local",), _TE),
    "--position-embedding-type": (("learned_absolute",), _DENSE),
    "--normalization": (("LayerNorm",), _DENSE),
    "--ckpt-format": (("torch_dist", "torch_dcp"), _DCP + "; convert other formats with megatron-biomed-convert"),
    "--dist-ckpt-format": (("torch_dist",), _DCP),
    "--tokenizer-type": (("GPT2BPETokenizer",), "ours trains with the GPT-2 BPE tokenizer of --vocab-file/--merge-file"),
    "--optimizer": (("adam",), "ours trains with AdamW (Megatron's adam: decoupled weight decay)"),
    "--context-parallel-size": (("1",), "context parallelism is not built (BioMedLM's 1024-token sequences do not "
                                       "need it); use tensor and sequence parallelism"),
    "--expert-model-parallel-size": (("1",), _DENSE + " (no experts)"),
    "--expert-tensor-parallel-size": (("1",), _DENSE + " (no experts)"),
    "--num-query-groups": (("1",), _DENSE + " (multi-head attention)"),
    "--recompute-method": (("uniform",), "ours recomputes every layer under --recompute-granularity full "
                                         "(Megatron's uniform with --recompute-num-layers 1)"),
    "--recompute-num-layers": (("1",), "ours recomputes every layer under --recompute-granularity full "
                                       "(Megatron's uniform with --recompute-num-layers 1)"),
    "--rerun-mode": (("disabled", "validate_results"), "ours stops on a non-finite loss or gradient and names the "
                                                       "last good checkpoint; there is no re-run engine"),
    "--error-injection-rate": (("0",), "there is no re-run engine to inject errors into"),
    "--dataloader-type": (("single",), "ours reads batches in Megatron's single-pass order"),
    "--softmax-type": (("vanilla",), _DENSE),
    "--cuda-graph-impl": (("none",), "CUDA graphs in training are not built"),
    "--empty-unused-memory-level": (("0",), _MEM),
    "--num-distributed-optimizer-instances": (("1",), "ours has one distributed optimizer instance"),
    "--data-parallel-sharding-strategy": (("no_shard",), "give --data-parallel-sharding optimizer or full (FSDP2)"),
    "--outer-dp-sharding-strategy": (("no_shard",), "hierarchical data parallelism is not built"),
    "--pipeline-model-parallel-comm-backend": (("nccl",), "ours sends pipeline activations over the default backend"),
    "--tp-comm-bootstrap-backend": (("nccl",), _TE),
    "--no-check-for-nan-in-loss-and-grad": ((), "ours always stops on a non-finite loss or gradient"),
}
ONLY = {k: v for k, v in ONLY.items() if v is not None}

REFUSED = {
    "--swiglu": _DENSE, "--squared-relu": _DENSE, "--quick-geglu": _DENSE, "--use-fused-weighted-squared-relu": _DENSE,
    "--untie-embeddings-and-output-weights": _DENSE + " with tied input and output embeddings",
    "--disable-bias-linear": _DENSE + " with biases", "--group-query-attention": _DENSE + " (multi-head attention)",
    "--use-rotary-position-embeddings": _DENSE, "--no-position-embedding": _DENSE, "--rotary-interleaved": _DENSE,
    "--apply-residual-connection-post-layernorm": _DENSE, "--apply-layernorm-1p": _DENSE, "--qk-layernorm": _DENSE,
    "--qk-l2-norm": _DENSE, "--attention-output-gate": _DENSE, "--multi-latent-attention": _DENSE,
    "--fp32-residual-connection": "the residual stream is kept in the compute dtype",
    "--use-legacy-models": "ours is one PyTorch model; Megatron's legacy models are not built",
    "--padded-vocab-size": "ours pads the vocabulary as Megatron does from --make-vocab-size-divisible-by",
    "--vocab-extra-ids": "T5 sentinel tokens: not this model's tokenizer",
    "--deterministic-mode": None,  # honoured (ours)
    "--distributed-timeout-seconds-after-init": None,  # honoured (ours)
    "--calculate-per-token-loss": "ours averages the loss over a batch's tokens as Megatron does by default",
    "--grad-reduce-in-bf16": "ours reduces gradients in fp32 under --bf16",
    "--fp16-lm-cross-entropy": "ours computes the cross entropy in fp32",
    "--decoupled-lr": "one learning rate for every parameter", "--decoupled-min-lr": "one learning rate for every parameter",
    "--no-save-optim": "ours always saves the optimizer so that a resume is exact; megatron-biomed-convert writes weights only",
    "--no-save-rng": "ours always saves the RNG state so that a resume is exact",
    "--save-retain-interval": "use --keep-last-checkpoints N --keep-every M",
    "--ckpt-step": "give the iteration's directory as --load (CKPT/iter_0000500)",
    "--pretrained-checkpoint": "give the checkpoint as --load with --finetune",
    "--load-main-params-from-ckpt": "ours always loads fp32 main weights (checkpoints hold them)",
    "--ckpt-convert-format": "convert checkpoints with megatron-biomed-convert",
    "--ckpt-convert-save": "convert checkpoints with megatron-biomed-convert",
    "--ckpt-convert-update-legacy-dist-opt-format": "convert checkpoints with megatron-biomed-convert",
    "--train-data-path": "give --data-path with --split", "--valid-data-path": "give --data-path with --split",
    "--test-data-path": "give --data-path with --split", "--data-args-path": "give --data-path on the command line or in --config",
    "--per-split-data-args-path": "give --data-path with --split",
    "--per-dataset-sequences-path": "ours reads each dataset's .idx", "--phase-transition-iterations": "one data blend per run",
    "--mock-data": "ours trains on .bin/.idx datasets only; tools/preprocess_data.py makes them",
    "--reset-position-ids": "ours packs documents with learned positions running over the whole sequence (as BioMedLM)",
    "--reset-attention-mask": "ours packs documents with attention across them (as BioMedLM)",
    "--allow-ambiguous-pad-tokens": "ours never treats a real token as padding",
    "--skip-train": "use megatron-biomed-evaluate on a checkpoint", "--test-mode": "not built",
    "--full-validation": "ours validates on --eval-iters batches", "--multiple-validation-sets": "one validation split per run",
    "--optimizer-cpu-offload": _MEM, "--optimizer-offload-fraction": _MEM, "--use-torch-optimizer-for-cpu-offload": _MEM,
    "--overlap-cpu-optimizer-d2h-h2d": _MEM, "--no-pin-cpu-grads": _MEM, "--no-pin-cpu-params": _MEM,
    "--cpu-offloading-num-layers": _MEM, "--fine-grained-activation-offloading": _MEM, "--offload-modules": _MEM,
    "--min-offloaded-tensor-size": _MEM, "--distribute-saved-activations": _MEM,
    "--check-weight-hash-across-dp-replicas-interval": "not built; data-parallel replicas start from one seed and stay equal",
    "--train-sync-interval": "ours synchronises every step",
    "--iterations-to-skip": "not built", "--check-for-large-grads": "not built",
    "--result-rejected-tracker-filename": "not built", "--exit-signal-handler-for-dataloader": "ours has no loader processes",
    "--data-parallel-random-init": "data-parallel replicas start from one seed",
    "--init-method-xavier-uniform": _DENSE + " (normal initialisation)", "--embedding-init-method-std": "one --init-method-std",
    "--te-rng-tracker": _TE, "--inference-rng-tracker": "not built",
    "--apply-wd-to-qk-layernorm": _DENSE, "--no-weight-decay-cond-type": "no weight decay on biases and LayerNorm, as Megatron",
    "--sgd-momentum": "ours trains with AdamW",
    "--override-opt_param-scheduler": "ours computes the schedule from the flags given at each start",
    "--use-checkpoint-opt_param-scheduler": "ours computes the schedule from the flags given at each start",
    "--account-for-embedding-in-pipeline-split": "ours splits the layers evenly over pipeline stages",
    "--account-for-loss-in-pipeline-split": "ours splits the layers evenly over pipeline stages",
    "--decoder-first-pipeline-num-layers": "ours splits the layers evenly over pipeline stages",
    "--decoder-last-pipeline-num-layers": "ours splits the layers evenly over pipeline stages",
    "--pipeline-model-parallel-layout": "ours splits the layers evenly over pipeline stages",
    "--num-virtual-stages-per-pipeline-rank": "give --num-layers-per-virtual-pipeline-stage",
    "--microbatch-group-size-per-virtual-pipeline-stage": "torch.distributed.pipelining's interleaved schedule groups micro-batches itself",
    "--model-parallel-size": "give --tensor-model-parallel-size", "--lazy-mpu-init": "not built",
    "--ddp-num-buckets": "give --ddp-bucket-size", "--ddp-pad-buckets-for-high-nccl-busbw": "not built",
    "--ddp-reduce-scatter-with-fp32-accumulation": "ours reduces in fp32 under --bf16",
    "--overlap-param-gather-with-optimizer-step": "FSDP2 gathers parameters ahead of each block, after the step",
    "--use-megatron-fsdp": "give --data-parallel-sharding full (PyTorch FSDP2)",
    "--use-torch-fsdp2": "give --data-parallel-sharding full (or optimizer) for PyTorch FSDP2",
    "--torch-fsdp2-no-reshard-after-forward": "give --data-parallel-sharding optimizer",
    "--fsdp-double-buffer": "not built", "--fsdp-manual-registration": "not built",
    "--suggested-communication-unit-size": "not built", "--keep-fp8-transpose-cache": _FP8,
    "--enable-full-sharding-in-hsdp": "hierarchical data parallelism is not built",
    "--use-nccl-ub": "NCCL user buffers are not used", "--disable-symmetric-registration": "NCCL user buffers are not used",
    "--use-sharp": "not built", "--sharp-enabled-group": "not built", "--create-all-gather-group": "not built",
    "--fake-process-group": "not built", "--hierarchical-context-parallel-sizes": "context parallelism is not built",
    "--max-seqlen-per-dp-cp-rank": "context parallelism is not built", "--hybrid-context-parallel": "context parallelism is not built",
    "--cp-comm-type": "context parallelism is not built", "--moe-extended-tp": _DENSE + " (no experts)",
    "--decrease-batch-size-if-needed": None,  # honoured
    "--window-size": _DENSE + " (full causal attention)", "--window-attn-skip-freq": _DENSE + " (full causal attention)",
    "--rotary-base": _DENSE, "--rotary-percent": _DENSE, "--rotary-seq-len-interpolation-factor": _DENSE,
    "--use-rope-scaling": _DENSE, "--rope-scaling-factor": _DENSE, "--no-rope-freq": _DENSE, "--rope-type": _DENSE,
    "--relative-attention-num-buckets": _DENSE, "--relative-attention-max-distance": _DENSE, "--mrope-section": _DENSE,
    "--encoder-num-layers": "a decoder-only model: give --num-layers", "--decoder-num-layers": "a decoder-only model: give --num-layers",
    "--encoder-seq-length": "a decoder-only model: give --seq-length", "--decoder-seq-length": "a decoder-only model: give --seq-length",
    "--onnx-safe": "not built", "--bert-no-binary-head": "not a BERT model",
    "--sample-rate": "ours samples datasets by their --data-path weights", "--mask-prob": "not a masked language model",
    "--short-seq-prob": "not a masked language model", "--glu-linear-offset": _DENSE, "--activation-func-clamp-value": _DENSE,
    "--qk-clip": _DENSE, "--qk-clip-alpha": _DENSE, "--qk-clip-threshold": _DENSE,
    "--mtp-standalone": "multi-token prediction is not built", "--mtp-num-layers": "multi-token prediction is not built",
    "--mtp-loss-scaling-factor": "multi-token prediction is not built",
    "--disable-bf16-reduced-precision-matmul": "ours leaves PyTorch's bf16 matmul settings as they are",
    "--use-kitchen-attention": "not built", "--kitchen-attention-backend": "not built",
    "--enable-cuda-graph": "CUDA graphs in training are not built", "--cuda-graph-warmup-steps": "CUDA graphs in training are not built",
    "--external-cuda-graph": "CUDA graphs in training are not built", "--cuda-graph-scope": "CUDA graphs in training are not built",
    "--config-logger-dir": "ours writes the run's settings to <save>/settings.yaml", "--flash-decode": "use megatron-biomed-generate",
    "--batch-invariant-mode": "not built", "--use-te-activation-func": _TE, "--symmetric-ar-type": "not built",
    "--inference-fuse-tp-communication": "use megatron-biomed-generate", "--is-hybrid-model": _DENSE + " (no Mamba layers)",
    "--disable-mamba-mem-eff-path": _DENSE + " (no Mamba layers)", "--mlp-chunks-for-prefill": "use megatron-biomed-generate",
    "--tp-comm-overlap": _TE, "--tp-comm-overlap-rs-dgrad": _TE, "--tp-comm-overlap-cfg": _TE,
    "--overlap-moe-expert-parallel-comm": _DENSE + " (no experts)", "--delay-wgrad-compute": "not built",
    "--ep-overlap-early-attn-memory-release": _DENSE + " (no experts)", "--defer-embedding-wgrad-compute": "not built",
    "--wgrad-deferral-limit": "not built", "--first-last-layers-bf16": _FP8, "--num-layers-at-start-in-bf16": _FP8,
    "--num-layers-at-end-in-bf16": _FP8, "--experimental-attention-variant": _DENSE,
    "--log-straggler": "per-rank step times are issue 27's", "--wandb-entity": None,
    "--log-energy": "not built", "--log-max-attention-logit": "not built",
    "--spec": "ours builds one model (GPT-2)", "--yaml-cfg": "give a YAML file of our flags as --config",
    "--enable-experimental": "not built", "--use-precision-aware-optimizer": "fp32 main weights and AdamW states",
    "--main-grads-dtype": "fp32 main gradients", "--main-params-dtype": "fp32 main weights",
    "--exp-avg-dtype": "fp32 AdamW states", "--exp-avg-sq-dtype": "fp32 AdamW states",
    "--hybrid-attention-ratio": _DENSE + " (no Mamba layers)", "--hybrid-mlp-ratio": _DENSE + " (no Mamba layers)",
    "--hybrid-override-pattern": _DENSE + " (no Mamba layers)",
    "--reuse-grad-buf-for-mxfp8-param-ag": _FP8, "--fp8-param-gather": _FP8, "--te-precision-config-file": _TE,
    "--check-for-spiky-loss": "ours stops on a non-finite loss and names the last good checkpoint",
    "--error-injection-type": "there is no re-run engine to inject errors into",
    "--dump-param-to-param-group-map": "not built", "--record-memory-history": None, "--memory-snapshot-path": None,
    "--legacy-tokenizer": None, "--tokenizer-model": None,
    "--fim-data": "fill-in-the-middle data is not built",
    "--recompute-modules": ("--recompute-granularity selective recomputes each layer's attention core, full each "
                            "whole layer"),
    "--batch-size": "Megatron-LM's old name: give --micro-batch-size",
    "--warmup": "Megatron-LM's old name: give --lr-warmup-iters or --lr-warmup-fraction",
    "--save-wgrads-interval": "not built", "--save-dgrads-interval": "not built",
    "--no-strict-fsdp-dtensor-load": "ours loads every tensor of a checkpoint, strictly",
    "--nccl-communicator-config-path": "not built",
    "--use-tp-pp-dp-mapping": "ours orders ranks (pipeline, data, tensor), tensor-parallel ranks adjacent",
    "--object-storage-cache-path": "ours reads local and shared file systems only",
    "--mid-level-dataset-surplus": "ours uses megatron-core's default surplus (0.005)",
}
REFUSED = {k: v for k, v in REFUSED.items() if v is not None}

REFUSED_PREFIXES = [  # (prefix, why), first match wins
    ("--moe-", _DENSE + " (no Mixture-of-Experts layers)"), ("--num-experts", _DENSE + " (no experts)"),
    ("--fp8-", _FP8), ("--no-fp8-", _FP8), ("--fp4-", _FP8.replace("FP8", "FP4")),
    ("--tp-comm-", _TE), ("--no-tp-comm-", _TE), ("--mamba-", _DENSE + " (no Mamba layers)"),
    ("--dsa-", _DENSE), ("--linear-", _DENSE), ("--fim-", "fill-in-the-middle data is not built"),
    ("--non-persistent-", "non-persistent (local, in-memory) checkpoints are not built; use --save-interval"),
    ("--replication", "checkpoint replication is not built; save to a shared file system"),
    ("--muon-", "ours trains with AdamW"), ("--tiktoken-", "ours trains with the GPT-2 BPE tokenizer"),
    ("--tokenizer-", "ours trains with the GPT-2 BPE tokenizer of --vocab-file/--merge-file"),
    ("--trust-remote-code", "ours never runs code from a tokenizer or model repository"),
]

REFUSED_GROUPS = {
    "rl": "reinforcement learning (GRPO) is not built", "vision": "not a vision model",
    "biencoder": "not a retrieval model", "inference": "use megatron-biomed-generate for text generation",
    "moe": _DENSE + " (no Mixture-of-Experts layers)", "mla": _DENSE + " (no multi-latent attention)",
    "experimental_attention_variant": _DENSE, "heterogeneous architecture": _DENSE + " (every layer alike)",
    "In-process restart": "ours restarts by requeueing the job and resuming from the last checkpoint (slurm/)",
    "ft_package": "ours restarts by requeueing the job and resuming from the last checkpoint (slurm/)",
    "one logger": "ours sends no telemetry anywhere", "straggler": "per-rank step times are issue 27's",
    "workload inspector": "not built", "msc": "ours reads local and shared file systems only",
    "sft": "use megatron-biomed-finetune", "autoresume": "ours resumes from --load after a requeue (slurm/)",
    "Transformer-Engine": _TE, "rerun engine": "there is no re-run engine", "experimental": "not built",
}

PREPROCESS = {  # tools/preprocess_data.py flags ours does not have under Megatron's name
    "accepted": {
        "--vocab-size": "the vocabulary comes from --vocab-file (GPT2BPETokenizer) or --tokenizer-model",
        "--padded-vocab-size": "padding is a training setting; the dataset holds token ids only",
        "--tokenizer-hf-use-fast": "ours always uses the fast (Rust) tokenizer, whose ids equal the slow one's",
        "--tokenizer-hf-include-special-tokens": None,
        "--tokenizer-metadata": None,
    },
    "only": {
        "--vocab-extra-ids": (("0",), "T5 sentinel tokens are not added by this tokenizer"),
        "--tiktoken-num-special-tokens": (("1000",), "give --tokenizer-type GPT2BPETokenizer or HuggingFaceTokenizer"),
    },
    "refused": {
        "--tokenizer-special-tokens": "special tokens come from the tokenizer's own files",
        "--tiktoken-pattern": "give --tokenizer-type GPT2BPETokenizer or HuggingFaceTokenizer",
        "--tiktoken-special-tokens": "give --tokenizer-type GPT2BPETokenizer or HuggingFaceTokenizer",
        "--tokenizer-sentencepiece-legacy": "give --tokenizer-type GPT2BPETokenizer or HuggingFaceTokenizer",
        "--trust-remote-code": "ours never runs code from a tokenizer repository",
        "--tokenizer-hf-include-special-tokens": "ours encodes text without adding BOS/EOS; use --append-eod",
        "--tokenizer-metadata": "give the tokenizer's files with --vocab-file/--merge-file or --tokenizer-model",
    },
}
PREPROCESS["accepted"] = {k: v for k, v in PREPROCESS["accepted"].items() if v is not None}


# -- sorting --------------------------------------------------------------------------------
class Rule:
    """What a tool does with one Megatron-LM flag."""

    def __init__(self, entry, kind, why=None, values=None):
        self.entry, self.kind, self.why, self.values = entry, kind, why, values
        self.flag = entry["flags"][0]


def rule(entry, ours, tool="pretrain_gpt"):
    """The Rule for a pinned entry; `ours` is the set of option strings our parser has."""
    flags = entry["flags"]
    if any(f in ours for f in flags):
        return Rule(entry, "honoured")
    accepted, only, refused = ((PREPROCESS["accepted"], PREPROCESS["only"], PREPROCESS["refused"])
                               if tool == "preprocess_data" else (ACCEPTED, ONLY, REFUSED))
    for f in flags:
        if f in accepted:
            return Rule(entry, "accepted", accepted[f])
        if f in only:
            values, why = only[f]
            return Rule(entry, "only", why, values)
        if f in refused:
            return Rule(entry, "refused", refused[f])
    if tool == "preprocess_data":
        return Rule(entry, "refused", None)  # unsorted: tests/test_megatron_lm_flags.py fails on any
    for prefix, why in REFUSED_PREFIXES:
        if why and flags[0].startswith(prefix):
            return Rule(entry, "refused", why)
    if entry["group"] in REFUSED_GROUPS:
        return Rule(entry, "refused", REFUSED_GROUPS[entry["group"]])
    return Rule(entry, "refused", None)  # unsorted: tests/test_megatron_lm_flags.py fails on any


def option_strings(parser):
    """Our own flags (not the ones add_flags added)."""
    return {s for a in parser._actions if not a.dest.startswith(DEST_PREFIX) for s in a.option_strings}


def rules(parser, tool):
    ours = option_strings(parser)
    return [rule(e, ours, tool) for e in pinned()[tool]]


def _dest(entry):
    return DEST_PREFIX + entry["dest"]


def add_flags(parser, tool):
    """Add every Megatron-LM flag of `tool` that `parser` lacks, with Megatron's arity, so that
    a Megatron-LM command line parses; `check(args, tool)` then applies the rules. Returns the
    rules."""
    out = rules(parser, tool)
    g = parser.add_argument_group(f"Megatron-LM flags ({pinned()['megatron_lm']}) accepted or refused with a "
                                  f"reason (docs/megatron-lm-flags.md)")
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    for r in out:
        e = r.entry
        if r.kind == "honoured":  # ours under one of its names: Megatron's other names join it
            action = next(by_flag[f] for f in e["flags"] if f in by_flag)
            for f in e["flags"]:
                if f not in by_flag:
                    action.option_strings.append(f)
                    parser._option_string_actions[f] = action
            continue
        kw = dict(dest=_dest(e), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if e["nargs"] == 0:
            kw.update(action="store_const", const=e["kind"] != "storefalse")
        elif e["nargs"] is not None:
            kw["nargs"] = e["nargs"]
        g.add_argument(*e["flags"], **kw)
    return out


def _given(value, entry):
    """Whether a parsed value differs from Megatron's default (a flag given with its default
    value changes nothing)."""
    if entry["nargs"] == 0:
        return True
    default = entry["default"]
    values = value if isinstance(value, list) else [value]
    defaults = default if isinstance(default, list) else [default]
    if isinstance(default, str) and default.startswith("["):
        defaults = [d.strip(" '\"") for d in default.strip("[]").split(",") if d.strip()]
    if len(values) != len(defaults):
        return True
    for v, d in zip(values, defaults):
        try:
            if float(v) != float(d):
                return True
        except (TypeError, ValueError):
            if str(v) != str(d):
                return True
    return False


def _shown(value, entry):
    if entry["nargs"] == 0:
        return ""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class MegatronFlagError(UsageError, ValueError):
    pass


def check(args, tool, debug_print=None):
    """Refuse the refused flags given, accept the rest (with a note under --debug), and remove
    the parsed values of flags ours does not use from `args`."""
    notes = []
    for e in pinned()[tool]:
        dest = _dest(e)
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        delattr(args, dest)
        r = _rule_for(tool, e["flags"][0])
        shown = _shown(value, e)
        given = f"{e['flags'][0]}{' ' + shown if shown else ''}"
        if r.kind == "only":
            if _shown(value, e) in r.values:
                notes.append(f"note: {given}: accepted: what ours does")
                continue
            raise MegatronFlagError(f"{given}: Megatron-LM flag refused: only {', '.join(r.values) or 'leaving it out'} "
                                    f"works here: {r.why}")
        if r.kind == "accepted":
            notes.append(f"note: {given}: accepted, no effect here: {r.why}")
        elif not _given(value, e):
            notes.append(f"note: {given}: accepted: Megatron-LM's default, which changes nothing")
        else:
            raise MegatronFlagError(f"{given}: Megatron-LM flag refused: {r.why}")
    if debug_print is not None:
        for n in notes:
            debug_print(n)
    return notes


_REGISTERED = {}  # tool -> {flag: Rule}, filled by register()


def _rule_for(tool, flag):
    return _REGISTERED[tool][flag]


def register(parser, tool):
    """add_flags, remembering the rules for check()."""
    _REGISTERED[tool] = {r.flag: r for r in add_flags(parser, tool)}
    return parser


# -- the docs table ---------------------------------------------------------------------------
_CLASS = {"honoured": "honoured", "accepted": "accepted (no effect)", "only": "only", "refused": "refused"}


def _md(text):
    return str(text).replace("|", "\\|")


def table(parser, tool):
    """Markdown: every pinned flag of `tool`, its class and why, by Megatron-LM's argument group."""
    defaults = {a.dest: a.default for a in parser._actions}
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    lines, group = [], None
    out = [_rule_for(tool, e["flags"][0]) for e in pinned()[tool]] if tool in _REGISTERED else rules(parser, tool)
    counts = {}
    for r in out:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    lines.append(", ".join(f"{n} {_CLASS[k]}" for k, n in sorted(counts.items())) + f" of {len(out)} flags.")
    order = {}
    for r in out:  # Megatron-LM's groups in its own order
        order.setdefault(r.entry["group"], len(order))
    for r in sorted(out, key=lambda r: (order[r.entry["group"]], r.flag)):
        if r.entry["group"] != group:
            group = r.entry["group"]
            lines += ["", f"### {group}", "", "| flag | here | why / what to use instead |", "|---|---|---|"]
        names = " ".join(f"`{f}`" for f in r.entry["flags"])
        if r.kind == "honoured":
            action = next(by_flag[f] for f in r.entry["flags"] if f in by_flag)
            ours, theirs = defaults.get(action.dest), r.entry["default"]
            why = ""
            if r.entry["nargs"] != 0 and str(ours) != str(theirs) and not (ours is None and theirs is None):
                why = f"default here {_md(ours)} (Megatron-LM {_md(theirs)})"
        elif r.kind == "only":
            why = f"only {', '.join(f'`{v}`' for v in r.values) or 'left out'}; otherwise refused: {_md(r.why)}"
        else:
            why = _md(r.why)
        lines.append(f"| {names} | {_CLASS[r.kind]} | {why} |")
    return "\n".join(lines) + "\n"


def docs_page():
    """docs/megatron-lm-flags.md, generated: `python -m megatron_biomed.compat.megatron_lm`."""
    from megatron_biomed.data.preprocess import build_parser as preprocess_parser
    from megatron_biomed.training.arguments import build_parser as pretrain_parser
    ref = pinned()["megatron_lm"]
    return (f"# Megatron-LM's flags here\n\n"
            f"<!-- generated by `python -m megatron_biomed.compat.megatron_lm` from megatron_biomed/compat/; "
            f"do not edit -->\n\n"
            f"Every flag of Megatron-LM {ref}'s `pretrain_gpt.py` and `tools/preprocess_data.py` is one of:\n\n"
            f"- **honoured**: the flag is ours, with Megatron-LM's meaning (where our default differs, the table "
            f"says so);\n"
            f"- **accepted (no effect)**: true of this engine as it is; `--debug` prints why;\n"
            f"- **only**: accepted with the values listed, refused with others;\n"
            f"- **refused**: one line that says why and what to use instead. A refused flag given with "
            f"Megatron-LM's default value changes nothing and is accepted.\n\n"
            f"No Megatron-LM flag is ever \"unrecognized\". Megatron-LM itself refuses `--rampup-batch-size` "
            f"with `--train-iters`; here the ramp runs in samples as in its sample-based mode and the iterations "
            f"are counted as given.\n\n"
            f"## pretrain_gpt.py\n\n{table(pretrain_parser(), 'pretrain_gpt')}\n"
            f"## tools/preprocess_data.py\n\n{table(preprocess_parser(), 'preprocess_data')}")


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "docs", "megatron-lm-flags.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(docs_page())
    print(f"wrote {path}")
