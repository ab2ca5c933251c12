"""tools/convert_checkpoint.py: between our checkpoints (any layout), Hugging Face GPT-2-family
directories and Megatron-LM torch_dist checkpoints, offline and one tensor at a time."""
import argparse
import contextlib
import json
import os
import shutil
import sys
import time

import torch

from megatron_biomed.checkpoint.layout import detect_format
from megatron_biomed.checkpoint.run_lock import check_apart
from megatron_biomed.convert import storage as S
from megatron_biomed.convert.storage import CheckpointFormatError
from megatron_biomed.errors import UsageError, add_debug_flag, entry_point
from megatron_biomed.utils import fsync_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser():
    p = argparse.ArgumentParser(
        description="Convert a checkpoint: ours (any TP/PP/DP layout) -> Hugging Face GPT2LMHeadModel, "
                    "Hugging Face GPT-2/BioMedLM -> ours, ours -> ours in another TP/PP layout, or "
                    "Megatron-LM torch_dist -> ours/HF. Runs offline in one process; writes into a "
                    "temporary directory and renames it to --save when complete.")
    p.add_argument("--load", required=True, help="source: our checkpoint root (or one iter_N dir), "
                   "a Hugging Face directory, or a Megatron-LM checkpoint root")
    p.add_argument("--save", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--target-format", required=True, choices=["hf", "megatron_biomed"])
    p.add_argument("--source-format", default="auto", choices=["auto", "megatron_biomed", "hf", "megatron_lm"])
    p.add_argument("--iteration", type=int, default=None, help="which saved iteration (default: the latest)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the output's model weights (default: as the source stores them, so "
                        "HF bf16 -> ours -> HF stays bf16; training loads any into fp32 master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="Hugging Face output: largest safetensors file")
    p.add_argument("--vocab-file", default=None, help="tokenizer vocab.json to include (default: the one "
                   "the source names or holds)")
    p.add_argument("--merge-file", default=None, help="tokenizer merges.txt to include")
    p.add_argument("--no-tokenizer", action="store_true", help="write a Hugging Face model without tokenizer files")
    p.add_argument("--portable", action="store_true",
                   help="Hugging Face output that every engine runs alike: BioMedLM's per-layer attention scale "
                        "(scores / (layer + 1)) folded into the query weights and bias, and a plain GPT-2 config "
                        "(vLLM refuses scale_attn_by_inverse_layer_idx, CTranslate2 silently ignores it)")
    g = p.add_argument_group("Megatron-LM import (when its common.pt args are not readable)")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="real (unpadded) vocabulary size")
    g.add_argument("--activation", choices=["gelu_new", "gelu"], default=None,
                   help="default: from the args (fused bias-gelu and --openai-gelu are gelu_new)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save")
    p.add_argument("--no-direct-io", action="store_true",
                   help="write through the page cache instead of with direct I/O (O_DIRECT, used where the file "
                        "system takes it: faster and lighter on CPU on local disks and parallel file systems; try "
                        "this where it is slow, e.g. some NFS mounts). The files are the same either way")
    p.add_argument("--no-verify-checkpoint", action="store_true",
                   help="do not check our checkpoint's files against its manifest.json checksums")
    return add_debug_flag(p)


def open_source(args):
    fmt = args.source_format if args.source_format != "auto" else detect_format(args.load)
    vocab_size = args.vocab_size
    if fmt == "megatron_lm" and vocab_size is None and args.vocab_file:
        with open(args.vocab_file, encoding="utf-8") as f:
            vocab_size = len(json.load(f))
    if fmt == "hf":
        from megatron_biomed.convert.hf import HFSource
        if args.iteration is not None:
            raise CheckpointFormatError("--iteration applies to our and Megatron-LM checkpoints, not Hugging Face")
        return HFSource(args.load)
    if fmt == "megatron_lm":
        from megatron_biomed.convert.megatron_lm import MegatronLMSource
        return MegatronLMSource(args.load, args.iteration, args.num_attention_heads, vocab_size, args.activation)
    from megatron_biomed.convert.ours import OursSource
    # The checksums are checked on a thread while the conversion reads the files (the output
    # is only renamed into place once they verify).
    return OursSource(args.load, args.iteration, verify=False if args.no_verify_checkpoint else "background")


def _tokenizer(args, source):
    from megatron_biomed.data.tokenizer import load_tokenizer
    if args.no_tokenizer:
        return None
    if args.vocab_file or args.merge_file:
        return load_tokenizer("GPT2BPETokenizer", args.vocab_file, args.merge_file)
    tok = source.tokenizer()
    if tok is None:
        print(f"warning: --load {args.load}: no tokenizer files found with the checkpoint, so the output has "
              f"the model only; pass --vocab-file and --merge-file to include them", file=sys.stderr, flush=True)
    if tok is not None and tok.get_vocab_size() > source.config.vocab_size:
        raise CheckpointFormatError(f"the tokenizer has {tok.get_vocab_size()} tokens, the model "
                                    f"{source.config.vocab_size}")
    return tok


def _pause_hook():
    """Fault injection for the interrupted-conversion test: stop after the first tensor."""
    if not os.environ.get("MEGATRON_BIOMED_TEST_PAUSE_IN_CONVERT"):
        return lambda: None
    state = {"n": 0}

    def hook():
        state["n"] += 1
        if state["n"] == 2:
            print("test hook: paused inside the conversion", file=sys.stderr, flush=True)
            time.sleep(3600)
    return hook


class _Progress:
    def __init__(self, total):
        from megatron_biomed.utils import progress
        self.bar = progress(total=total, unit="B", unit_scale=True, desc="converting")
        self.hook = _pause_hook()

    def update(self, n):
        self.bar.update(n)
        self.hook()


# Written into every output, so that --force knows what it may replace.
OUTPUT_MARKER = ".written-by-megatron-biomed-convert"


def checkpoint_file_in(path):
    """What checkpoint files `path` holds (a short description), or None."""
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if name in (".metadata", "metadata.json", "latest_checkpointed_iteration.txt", "pytorch_model.bin",
                        "common.pt") or name.endswith((".safetensors", ".distcp", ".pt", ".bin")):
                return os.path.join(dirpath, name)
    return None


def check_save(args):
    """--save apart from --load; an existing, non-empty --save replaced only with --force, and only
    when it holds no checkpoint but one this tool wrote."""
    check_apart(args.load, args.save)
    save = os.path.abspath(args.save)
    if not os.path.exists(save) or (os.path.isdir(save) and not os.listdir(save)):
        return
    if not os.path.isdir(save):
        raise UsageError(f"--save {args.save}: exists and is not a directory; give a directory to write")
    if not args.force:
        raise UsageError(f"--save {args.save}: exists and is not empty; pass --force to replace it")
    found = None if os.path.exists(os.path.join(save, OUTPUT_MARKER)) else checkpoint_file_in(save)
    if found:
        raise UsageError(f"--save {args.save}: holds a checkpoint this tool did not write ({found}); --force "
                         f"only replaces an earlier conversion's output: delete it yourself, or give another --save")


def start_output(save):
    """`<save>.tmp`, made empty, to write the output into; what a killed run left is removed."""
    tmp = save + ".tmp"
    for leftover in (tmp, save + ".old"):
        if os.path.exists(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
            print(f"removed {leftover}: left by an interrupted run", file=sys.stderr)
    os.makedirs(tmp)
    return tmp


def publish_output(tmp, save, load, target_format):
    """Mark `tmp` as this tool's output, sync it to disk and make it `save`; an earlier `save` is
    moved aside first, so a kill at any point leaves one complete output or the other."""
    with open(os.path.join(tmp, OUTPUT_MARKER), "w") as f:
        json.dump({"source": os.path.abspath(load), "target_format": target_format}, f)
        f.write("\n")
    S.sync_tree(tmp)  # on disk before the rename makes it --save
    if os.path.exists(save):
        old = save + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(save, old)
        os.replace(tmp, save)
        shutil.rmtree(old)
    else:
        os.replace(tmp, save)
    fsync_dir(os.path.dirname(save))


def convert(args):
    save = os.path.abspath(args.save)
    check_save(args)
    if args.portable and args.target_format != "hf":
        raise UsageError("--portable: applies to --target-format hf (our own checkpoints keep the scale as a "
                         "setting); drop it or convert to hf")
    source = open_source(args)
    if args.portable:
        from megatron_biomed.convert.portable import PortableSource
        source = PortableSource(source)
    from megatron_biomed.convert.ours import check_layout, model_size_bytes, verified_reads, write_ours
    total = model_size_bytes(source)
    if args.target_format == "megatron_biomed":
        check_layout(source.config, args.target_tensor_parallel_size, args.target_pipeline_parallel_size)
        total += sum(S.tensor_bytes(s, d) for s, d in getattr(source, "extra_specs", {}).values())
    tokenizer = _tokenizer(args, source)  # after the checks: its warning only when converting
    tmp = start_output(save)
    t0 = time.time()
    bar = _Progress(total)
    try:
        with verified_reads(source):  # the output is renamed into place only once the source verifies
            if args.target_format == "hf":
                from megatron_biomed.convert.hf import write_hf
                write_hf(source, tmp, DTYPES.get(args.dtype), args.max_shard_size, tokenizer, bar,
                         direct_io=not args.no_direct_io)
            else:
                write_ours(source, tmp, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                           tokenizer, bar, DTYPES.get(args.dtype), direct_io=not args.no_direct_io)
        bar.bar.close()
        publish_output(tmp, save, args.load, args.target_format)
    except BaseException:
        bar.bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cfg = source.config
    layout = "" if args.target_format == "hf" else \
        f" (layout tp={args.target_tensor_parallel_size} pp={args.target_pipeline_parallel_size})"
    print(f"converted {source.description} -> {args.target_format} {args.save}{layout}: {cfg.num_layers} layers, "
          f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {total / 1e9:.2f} GB in {time.time() - t0:.1f} s"
          f"{'' if tokenizer is not None else ', no tokenizer'}", flush=True)
    if args.target_format == "hf" and cfg.scale_attn_by_inverse_layer_idx:
        print(f"note: {args.save}/config.json keeps BioMedLM's scale_attn_by_inverse_layer_idx: true (exact round "
              f"trip; transformers honours it), but vLLM refuses such a model and CTranslate2 ignores the flag and "
              f"generates other tokens without a warning; --portable folds the scale into the query weights and "
              f"writes a plain GPT-2 config that every engine runs alike", flush=True)


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cycle collector off: its passes over the hundreds of thousands of objects torch
    and transformers create at import took ~1 s of a conversion's CPU (measured), and a
    conversion makes no garbage cycles of any size."""
    import gc
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    with _no_cyclic_gc():
        convert(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
