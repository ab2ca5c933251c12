"""GPU-only checks (`make gpu-check` runs them; skipped where there is no CUDA GPU): attention
kernels against each other, bf16 training steps with and without --compile against fp32,
checkpoint save/load of GPU training state, and KV-cache generation."""
import gc
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from megatron_biomed.config import ParallelConfig, preset
from megatron_biomed.model import gpt as G
from megatron_biomed.model.loss import cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def world():
    """A one-process NCCL group, as pretrain_gpt has on one GPU."""
    import torch.distributed as dist
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _qkv(seq=1024, batch=2, heads=20, dim=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g,
                        requires_grad=True) for _ in range(3)]


def test_attention_kernels_agree_in_bf16():
    """cuDNN, FlashAttention (SDPA's, and flash-attn's if installed) and SDPA's own choice
    against the fp32-softmax reference: outputs and gradients, at BioMedLM's head size with its
    layer-index scaling (layer 31: scores / 32)."""
    cfg = preset("biomedlm-2.7b", attention_dropout=0.0)
    backends = ["auto", "flash", "cudnn", "sdpa"]
    results = {}
    for backend in backends + ["math"]:
        core = G.CoreAttention(cfg.replace(attention_backend=backend), layer_idx=31)
        q, k, v = _qkv()
        resolved = core.resolved_backend(q)
        out = core(q, k, v)
        out.float().pow(2).sum().backward()
        results[backend] = (resolved, out.detach().float(), [t.grad.float() for t in (q, k, v)])
    assert results["cudnn"][0] == "cudnn" and results["flash"][0] in ("flash", "flash-attn")
    ref, ref_grads = results["math"][1], results["math"][2]
    for backend in backends:
        out, grads = results[backend][1], results[backend][2]
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=backend)
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() / r.norm() < 2e-2, backend


def test_chunked_cross_entropy_equals_fp32_cross_entropy():
    """bf16 logits over BioMedLM's padded vocabulary, more rows than one chunk."""
    torch.manual_seed(0)
    vocab, padded = 28896, 28928
    logits = (torch.randn(3000, padded, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, vocab, (3000,), device="cuda")
    targets[::7] = -100
    losses = cross_entropy(logits, targets, vocab)
    (losses * torch.linspace(0, 1, 3000, device="cuda")).sum().backward()
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = F.cross_entropy(ref_logits[:, :vocab], targets, reduction="none", ignore_index=-100)
    (ref * torch.linspace(0, 1, 3000, device="cuda")).sum().backward()
    torch.testing.assert_close(losses, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits.grad.float()[:, :vocab], ref_logits.grad[:, :vocab], atol=1e-3, rtol=1e-2)
    assert logits.grad[:, vocab:].abs().max() == 0


def _step(world_cfg, param_dtype, compile, batch):
    from megatron_biomed.parallel import mesh as M
    from megatron_biomed.parallel.parallelize import ParallelGPT
    from megatron_biomed.training.optimizer import build_optimizer
    parallel = ParallelConfig(micro_batch_size=2, global_batch_size=4)
    mesh = M.build_mesh(parallel, "cuda")
    model = ParallelGPT(world_cfg, parallel, mesh, torch.device("cuda"), param_dtype=param_dtype, compile=compile)
    assert model.compile_problem is None or not compile, model.compile_problem
    import argparse
    opt = build_optimizer(model, argparse.Namespace(lr=1e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                                                    adam_eps=1e-8), torch.device("cuda"))
    assert opt.defaults.get("fused")
    losses, norms = [], []
    for _ in range(3):
        loss, norm = model.train_step(*batch, opt, clip_grad=1.0)
        losses.append(float(loss))
        norms.append(float(norm))
    return model, opt, losses, norms


def _gpu_config():
    return preset("gpt2-small", vocab_size=28896, num_layers=4, seq_length=256, hidden_dropout=0.0,
                  attention_dropout=0.0, scale_attn_by_inverse_layer_idx=True)


def _batch(cfg, n=4):
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, cfg.vocab_size, (n, cfg.seq_length + 1), generator=g).cuda()
    return data[:, :-1], data[:, 1:]


def test_bf16_training_steps_with_and_without_compile_follow_fp32(world):
    """Three AdamW steps: bf16 parameters (fp32 main weights), eager and compiled, against fp32."""
    cfg = _gpu_config()
    batch = _batch(cfg)
    _, _, fp32_losses, fp32_norms = _step(cfg, None, False, batch)
    m_eager, _, eager_losses, eager_norms = _step(cfg, torch.bfloat16, False, batch)
    m_comp, _, comp_losses, comp_norms = _step(cfg, torch.bfloat16, True, batch)
    assert next(m_eager.modules[0].parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m_eager.parameters())  # what the optimizer updates
    for losses, norms in ((eager_losses, eager_norms), (comp_losses, comp_norms)):
        for a, b in zip(losses, fp32_losses):
            assert abs(a - b) < 0.02 * abs(b), (losses, fp32_losses)
        for a, b in zip(norms, fp32_norms):
            assert abs(a - b) < 0.05 * abs(b), (norms, fp32_norms)
    for a, b in zip(comp_losses, eager_losses):  # compiled and eager bf16: same arithmetic, near equal
        assert abs(a - b) < 5e-3 * abs(b), (comp_losses, eager_losses)


def test_checkpoint_save_and_load_on_gpu(world, tmp_path):
    """GPU training state (bf16 model, fp32 main weights, fused AdamW state) saved and loaded:
    the loaded run continues exactly as the one that saved."""
    from megatron_biomed.training import checkpoint as C
    cfg = _gpu_config()
    batch = _batch(cfg)
    layout = {"tp": 1, "pp": 1, "dp": 1, "sequence_parallel": False, "vpp": None, "sharding": "none"}
    model, opt, _, _ = _step(cfg, torch.bfloat16, False, batch)
    C.save(str(tmp_path), 3, model, opt, None, {"model": vars(cfg)}, 12, layout)
    other, other_opt, _, _ = _step(cfg.replace(init_method_std=0.05), torch.bfloat16, False, batch)
    iteration, consumed, _, _ = C.load(str(tmp_path), other, other_opt, None, layout)
    other.sync_params()
    assert (iteration, consumed) == (3, 12)
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opt.state[a]["exp_avg_sq"], other_opt.state[b]["exp_avg_sq"]), n
    for a, b in zip(model.modules[0].parameters(), other.modules[0].parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)  # the bf16 copies follow the loaded main weights
    expected, _ = model.train_step(*batch, opt, clip_grad=1.0)
    got, _ = other.train_step(*batch, other_opt, clip_grad=1.0)
    assert abs(float(got) - float(expected)) < 1e-5 * abs(float(expected))


def test_generation_with_kv_cache_on_gpu():
    """bf16 on the GPU: greedy generation through the KV cache gives the tokens that full
    forward passes give, and the cached logits match a full pass."""
    from megatron_biomed.generation import generate
    torch.manual_seed(0)
    cfg = preset("gpt2-small", vocab_size=1000, num_layers=4, init_method_std=0.2)
    model = G.GPT(cfg).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 1000, (12,)).tolist()
    new, reason = generate(model, prompt, max_new_tokens=20)
    assert reason == "length" and len(new) == 20
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([seq], device="cuda"))[0, -1].float()
            seq.append(int(logits.argmax()))
        full = model(torch.tensor([seq], device="cuda")).float()
        cache = G.KVCache(cfg, 1, len(seq), "cuda", torch.bfloat16)
        parts = [model(torch.tensor([seq[:12]], device="cuda"), cache=cache)]
        parts += [model(torch.tensor([[t]], device="cuda"), cache=cache) for t in seq[12:]]
    cached = torch.cat(parts, 1).float()
    torch.testing.assert_close(cached, full, atol=0.1, rtol=0.05)
    agree = sum(a == b for a, b in zip(new, seq[12:]))
    assert agree >= 18, (new, seq[12:])  # bf16: a near-tie may flip late in the sequence


def test_batched_generation_on_gpu():
    """Batched greedy generation on the GPU (SDPA with the padding mask) gives one-at-a-time's
    tokens in fp32, and in bf16 nearly all of them."""
    from megatron_biomed.generation import generate, generate_batch
    torch.manual_seed(0)
    cfg = preset("gpt2-small", vocab_size=1000, num_layers=4, init_method_std=0.2)
    model = G.GPT(cfg).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 40, 1, 17)]
    one = [generate(model, p, max_new_tokens=24, eos_id=3) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=24, eos_id=3) == one
    model = model.to(torch.bfloat16)
    one = [generate(model, p, max_new_tokens=24)[0] for p in prompts]
    batched = [ids for ids, _ in generate_batch(model, prompts, max_new_tokens=24)]
    agree = sum(a == b for x, y in zip(one, batched) for a, b in zip(x, y))
    assert agree >= 0.9 * 4 * 24, (one, batched)
