#!/usr/bin/env python3
"""Training throughput on one device: our model against megatron-core's GPTModel and
transformers' GPT2LMHeadModel, same shape, data and precision, in one run.

Each row is a fresh process (clean peak memory, no compile cache shared in memory) that runs
warm-up steps, then timed optimizer steps of --global-batch-size sequences split into
micro-batches. Printed per row: tokens/s, model TFLOP/s (the same FLOP count per token for every
row: 6 x matmul weights + attention, as Megatron counts), MFU against the device's dense bf16
peak, peak memory, and tokens/s as a ratio to megatron-core and to transformers.

Rows:
  ours          ParallelGPT's real training step (tools/pretrain path): --bf16 = bf16 parameters
                with fp32 main weights, fused AdamW, chunked cross entropy, --compile per block
  megatron-core GPTModel with its local (non-Transformer-Engine) layer spec, Megatron's DDP with
                fp32 gradient buffers and its mixed-precision optimizer (bf16 params, fp32 main)
  transformers  GPT2LMHeadModel (SDPA attention), fp32 parameters under bf16 autocast, fused AdamW

    python benchmarks/train_throughput.py                    # GPU: BioMedLM 2.7B, micro-batch sweep
    python benchmarks/train_throughput.py --markdown out.md  # also write the table as markdown
On a machine without a GPU it runs the tiny preset in fp32 (the suite's smoke test).
"""
import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMPLS = ("ours", "megatron-core", "transformers")


# -- one row, in a child process ------------------------------------------------------------------
def _batch(vocab, n, seq, device):
    import torch
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, vocab, (n, seq + 1), generator=g).to(device)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def _init_dist(device):
    import torch.distributed as dist
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _ours(spec, cfg, device):
    import torch

    from megatron_biomed.config import ParallelConfig
    from megatron_biomed.parallel import mesh as M
    from megatron_biomed.parallel.parallelize import ParallelGPT
    from megatron_biomed.training.optimizer import build_optimizer
    _init_dist(device)
    parallel = ParallelConfig(micro_batch_size=spec["mbs"], global_batch_size=spec["gbs"])
    mesh = M.build_mesh(parallel, device.type)
    model = ParallelGPT(cfg, parallel, mesh, device, param_dtype=torch.bfloat16 if spec["bf16"] else None,
                        compile=spec["compile"])
    if spec["compile"] and model.compile_problem:
        raise RuntimeError(f"--compile: {model.compile_problem}")
    opt_args = argparse.Namespace(lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    optimizer = build_optimizer(model, opt_args, device)
    tokens, targets = _batch(cfg.vocab_size, spec["gbs"], cfg.seq_length, device)
    model.train(True)

    def step():
        loss, _ = model.train_step(tokens, targets, optimizer, clip_grad=1.0)
        return loss
    return step


def _megatron_core(spec, cfg, device):
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    if device.type != "cuda":
        raise RuntimeError("megatron-core's GPTModel needs a CUDA GPU")
    _init_dist(device)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    tc = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, layernorm_epsilon=cfg.layernorm_epsilon,
        init_method_std=cfg.init_method_std, add_bias_linear=True, normalization="LayerNorm",
        activation_func=lambda x: F.gelu(x, approximate="tanh"), bias_activation_fusion=False,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bf16=spec["bf16"], params_dtype=dtype, pipeline_dtype=dtype, attention_softmax_in_fp32=True,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if cfg.recompute_granularity == "full" else None)
    model = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=cfg.padded_vocab_size(), max_sequence_length=cfg.seq_length,
                     pre_process=True, post_process=True, share_embeddings_and_output_weights=True,
                     position_embedding_type="learned_absolute")
    if spec["bf16"]:  # as Megatron-LM's training does: every parameter (LayerNorm too) in bf16
        from megatron.core.transformer.module import Float16Module
        model = Float16Module(tc, model)
    model = model.to(device)
    ddp = DistributedDataParallel(config=tc, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, bf16=spec["bf16"],
        clip_grad=1.0, use_distributed_optimizer=False), [ddp])
    tokens, targets = _batch(cfg.vocab_size, spec["gbs"], cfg.seq_length, device)
    positions = torch.arange(cfg.seq_length, device=device).unsqueeze(0)
    mbs = spec["mbs"]
    n_mb = spec["gbs"] // mbs
    ddp.train()

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        total = 0.0
        for i in range(n_mb):
            sl = slice(i * mbs, (i + 1) * mbs)
            per_token = ddp(tokens[sl], positions, attention_mask=None, labels=targets[sl])
            loss = per_token.float().mean() / n_mb
            loss.backward()
            total += loss.detach()
        ddp.finish_grad_sync()
        optimizer.step()
        return total
    return step


def _transformers(spec, cfg, device):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size,
                    n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
                    resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
                    attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.layernorm_epsilon,
                    scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
                    activation_function="gelu_new", use_cache=False)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(1234)
    with torch.device(device):
        model = GPT2LMHeadModel(hf)
    if cfg.recompute_granularity == "full":
        model.gradient_checkpointing_enable()
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95), **kw)
    tokens, targets = _batch(cfg.vocab_size, spec["gbs"], cfg.seq_length, device)
    mbs = spec["mbs"]
    n_mb = spec["gbs"] // mbs
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(n_mb):
            sl = slice(i * mbs, (i + 1) * mbs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
                logits = model(tokens[sl]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[sl].flatten()) / n_mb
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return total
    return step


def child(spec):
    """Build the row's model, run warm-up and timed steps, return its measurements."""
    import torch

    from megatron_biomed.config import preset
    from megatron_biomed.model.gpt import flops_per_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(spec["model"], seq_length=spec["seq"], recompute_granularity=spec["recompute"],
                 attention_backend=spec["attention"])
    t0 = time.perf_counter()
    step = {"ours": _ours, "megatron-core": _megatron_core, "transformers": _transformers}[spec["impl"]](
        spec, cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(spec["warmup"]):
        step()
    sync()
    warm = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t) / spec["steps"]
    tokens_per_s = spec["gbs"] * spec["seq"] / seconds
    tflops = flops_per_token(cfg) * tokens_per_s / 1e12
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        from megatron_biomed.training.metrics import peak_memory_gb
        peak_mem = peak_memory_gb(device)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"tokens_per_s": tokens_per_s, "tflops": tflops, "step_s": seconds, "peak_mem_gib": peak_mem,
            "loss": float(loss), "setup_s": warm}


# -- the table ---------------------------------------------------------------------------------
def device_info():
    import torch
    if torch.cuda.is_available():
        from megatron_biomed.training.metrics import PEAK_TFLOPS
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        return name, peak
    return f"CPU ({os.cpu_count()} cores)", None


def run_row(spec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    text = (r.stderr or r.stdout).strip().splitlines()
    last = next((l for l in reversed(text) if l.strip() and not l.startswith(" ")), "no output")
    if "out of memory" in (r.stderr or "").lower():
        last = "out of memory"
    return {"error": last[:200]}


def label(spec):
    extra = [f"mbs {spec['mbs']}"]
    if spec["impl"] == "ours":
        extra.append("compile" if spec["compile"] else "eager")
    if spec["recompute"]:
        extra.append(f"recompute {spec['recompute']}")
    return f"{spec['impl']} ({', '.join(extra)})"


def planned(spec):
    """megatron_biomed.planner's peak memory for one of our GPU rows (its model is of this code)."""
    import torch
    if spec["impl"] != "ours" or not torch.cuda.is_available():
        return ""
    from megatron_biomed import planner as P
    from megatron_biomed.config import preset
    cfg = preset(spec["model"], seq_length=spec["seq"], attention_backend=spec["attention"])
    lay = P.Layout(micro_batch_size=spec["mbs"], global_batch_size=spec["gbs"], recompute=spec["recompute"],
                   precision="bf16" if spec["bf16"] else "fp32")
    return f"{P.gib(sum(P.memory(cfg, lay).values())):.1f}"


def table(rows, peak):
    def best(impl):
        ok = [r["result"]["tokens_per_s"] for r in rows if r["spec"]["impl"] == impl and "error" not in r["result"]]
        return max(ok) if ok else None
    base = {impl: best(impl) for impl in ("megatron-core", "transformers")}
    head = ("| row | tokens/s | TFLOP/s | MFU | peak mem (GiB) | planned mem (GiB) | step (s) | loss | "
            "vs megatron-core | vs transformers |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        res = r["result"]
        if "error" in res:
            lines.append(f"| {label(r['spec'])} | {res['error']} ||||||||||")
            continue
        mfu = f"{100 * res['tflops'] / peak:.1f}%" if peak else "n/a"
        ratios = [f"{res['tokens_per_s'] / base[i]:.2f}x" if base[i] else "n/a" for i in ("megatron-core", "transformers")]
        lines.append(f"| {label(r['spec'])} | {res['tokens_per_s']:,.0f} | {res['tflops']:.3g} | {mfu} | "
                     f"{res['peak_mem_gib']:.1f} | {planned(r['spec'])} | {res['step_s']:.3f} | {res['loss']:.3f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def default_rows(args, gpu):
    common = dict(model=args.model, seq=args.seq_length, gbs=args.global_batch_size, bf16=args.bf16,
                  warmup=args.warmup, steps=args.steps, attention=args.attention_backend)
    rows = []
    for impl in args.impl:
        for mbs in (args.micro_batch_sizes if impl == "ours" else [args.baseline_micro_batch_size]):
            for compiled in ([True, False] if impl == "ours" and args.compile and mbs == args.baseline_micro_batch_size
                             else [args.compile and impl == "ours"]):
                rows.append(dict(common, impl=impl, mbs=mbs, compile=compiled, recompute=args.recompute_granularity))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="preset (default: biomedlm-2.7b on GPU, tiny on CPU)")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=None, help="ours: the sweep")
    p.add_argument("--baseline-micro-batch-size", type=int, default=None,
                   help="megatron-core and transformers rows (and ours eager, to show --compile)")
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences per optimizer step")
    p.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    p.add_argument("--fp32", dest="bf16", action="store_false", default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timeout", type=int, default=600, help="seconds per row")
    p.add_argument("--markdown", default=None, help="also write the table (with the device and date) here")
    p.add_argument("--json", default=None, help="also write every row's numbers here")
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    import torch
    gpu = torch.cuda.is_available()
    defaults = (dict(model="biomedlm-2.7b", seq_length=1024, micro_batch_sizes=[4, 8, 16], baseline_micro_batch_size=8,
                     global_batch_size=64, compile=True, bf16=True, warmup=2, steps=3) if gpu else
                dict(model="tiny", seq_length=64, micro_batch_sizes=[2], baseline_micro_batch_size=2,
                     global_batch_size=4, compile=False, bf16=False, warmup=1, steps=2))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    name, peak = device_info()
    rows = []
    for spec in default_rows(args, gpu):
        if spec["impl"] == "megatron-core":
            import importlib.util
            why = ("its GPTModel needs a CUDA GPU" if not gpu else
                   None if importlib.util.find_spec("megatron") and importlib.util.find_spec("megatron.core")
                   else "megatron-core is not installed here")
            if why:
                rows.append({"spec": spec, "result": {"error": f"skipped: {why}"}})
                print(f"{label(spec)}: skipped, {why}", flush=True)
                continue
        t = time.time()
        print(f"{label(spec)} ...", end=" ", flush=True)
        res = run_row(spec, args.timeout)
        rows.append({"spec": spec, "result": res})
        print(res.get("error") or f"{res['tokens_per_s']:,.0f} tokens/s", f"({time.time() - t:.0f} s)", flush=True)
    precision = "bf16" if args.bf16 else "fp32"
    title = (f"{args.model}, seq {args.seq_length}, global batch {args.global_batch_size}, {precision}, "
             f"{name}, torch {torch.__version__}, {datetime.date.today().isoformat()}")
    text = table(rows, peak)
    print(f"\n{title}\n\n{text}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(f"Training throughput: {title}\n\n{text}\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"title": title, "peak_tflops": peak, "rows": rows}, f, indent=1)
    return 0 if all("error" not in r["result"] or r["result"]["error"].startswith("skipped")
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
