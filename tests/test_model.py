import math

import pytest
import torch
import torch.nn.functional as F

from megatron_biomed.config import LayoutError, ParallelConfig, preset
from megatron_biomed.model.gpt import GPT, flops_per_token


def test_biomedlm_preset_shape():
    cfg = preset("biomedlm-2.7b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.seq_length, cfg.vocab_size) == \
        (32, 2560, 20, 1024, 28896)
    assert cfg.scale_attn_by_inverse_layer_idx and cfg.ffn_hidden_size == 4 * 2560
    assert cfg.padded_vocab_size(1) == 28928 and cfg.padded_vocab_size(8) % (128 * 8) == 0
    # 6N + attention, N ~ 2.6B matmul weights: ~16.6 GFLOP per token.
    assert 16e9 < flops_per_token(cfg) < 17.5e9


def test_attention_backends_agree_and_layer_scaling_matters():
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    outs = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        outs[backend] = GPT(cfg.replace(attention_backend=backend))(x)
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    unscaled = GPT(cfg.replace(scale_attn_by_inverse_layer_idx=False))(x)
    assert (unscaled - outs["sdpa"]).abs().max() > 1e-3


def test_tied_embeddings_padding_never_wins_and_recompute_same_grads():
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPT(cfg)
    assert model.padded_vocab_size == 512 and model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        model.wte.weight[500:] = 100.0  # padded rows that would dominate if not masked
    x = torch.randint(0, 500, (2, 64))
    logits = model(x)
    assert logits.shape == (2, 64, 512) and int(logits.argmax(-1).max()) < 500
    grads = {}
    for mode in (None, "selective", "full"):
        torch.manual_seed(0)
        m = GPT(cfg.replace(recompute_granularity=mode))
        loss = F.cross_entropy(m(x).flatten(0, 1), x.flatten())
        loss.backward()
        grads[mode] = [p.grad.clone() for p in m.parameters()]
    for mode in ("selective", "full"):
        for a, b in zip(grads[None], grads[mode]):
            torch.testing.assert_close(a, b)


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    x, y = torch.randint(0, cfg.vocab_size, (2, 4, 64))
    loss = GPT(cfg)(x, y)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3


@pytest.mark.parametrize("kw,world,flag", [
    (dict(tensor_model_parallel_size=3), 6, "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (dict(pipeline_model_parallel_size=3), 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (dict(tensor_model_parallel_size=2), 3, "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    (dict(sequence_parallel=True), 2, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3), 2,
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 3"),
    (dict(micro_batch_size=3, global_batch_size=8), 2, "--global-batch-size 8 is not divisible by --micro-batch-size 3"),
    (dict(data_parallel_sharding="zero"), 1, "--data-parallel-sharding 'zero'"),
])
def test_bad_layouts_name_the_flag(kw, world, flag):
    with pytest.raises(LayoutError) as e:
        ParallelConfig(**kw).validate(preset("tiny"), world)
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_tensor_parallel_dropout_streams_and_recompute_replay():
    from megatron_biomed.parallel.tensor_parallel import tensor_parallel_dropout_rng
    cfg = preset("tiny", hidden_dropout=0.2, attention_dropout=0.3)
    x = torch.randint(0, cfg.vocab_size, (2, 64))

    def run(tp_rank, recompute=None, sp=False):
        torch.manual_seed(0)
        m = GPT(cfg.replace(recompute_granularity=recompute))
        tensor_parallel_dropout_rng(m, tp_rank, sequence_parallel=sp)
        captured = {}
        def keep(key):
            def hook(mod, args, out):
                captured.setdefault(key, out.detach() == 0)  # the dropout mask; returns None
            return hook
        m.h[0].attn.core.register_forward_hook(keep("attn"))
        m.h[0].attn.resid_dropout.register_forward_hook(keep("resid"))
        torch.manual_seed(42)
        loss = F.cross_entropy(m(x).flatten(0, 1), x.flatten())
        loss.backward()
        return captured, [p.grad.clone() for p in m.parameters()]

    r0, g0 = run(0)
    r1, _ = run(1)
    assert not torch.equal(r0["attn"], r1["attn"])        # attention dropout differs across TP ranks
    torch.testing.assert_close(r0["resid"], r1["resid"])  # replicated-region dropout does not
    s0, _ = run(0, sp=True)
    s1, _ = run(1, sp=True)
    assert not torch.equal(s0["resid"], s1["resid"])      # sequence-parallel regions differ
    for mode in ("full", "selective"):  # recomputation replays the same masks: same gradients
        _, g = run(0, recompute=mode)
        for a, b in zip(g0, g):
            torch.testing.assert_close(a, b)


def test_megatron_flags_and_environment():
    from megatron_biomed.arguments import build_parser, model_config, parallel_config
    from megatron_biomed.parallel.mesh import distributed_env
    args = build_parser().parse_args([
        "--model", "biomedlm-2.7b", "--num-layers", "8", "--hidden-size", "512", "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "2",
        "--global-batch-size", "16", "--recompute-granularity", "selective"])
    m, p = model_config(args), parallel_config(args)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (8, 512, 2048, 20)
    assert m.recompute_granularity == "selective" and m.scale_attn_by_inverse_layer_idx
    assert p.data_parallel_size(8) == 2 and p.num_microbatches(8) == 4
    with pytest.raises(LayoutError, match="--num-attention-heads 20 is not divisible by --tensor-model-parallel-size 3"):
        p.__class__(tensor_model_parallel_size=3).validate(m, 3)
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-004,007]", "SLURM_JOB_ID": "4242"}
    assert distributed_env(env) == (5, 8, 1, "gpu003", 20000 + 4242)
    assert distributed_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                            "MASTER_PORT": "1234"}) == (1, 2, 1, "h", 1234)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_kv_cache_decoding_equals_full_forward(backend):
    """Prefill a prompt, then feed tokens one and three at a time through the KV cache: every
    position's logits equal one forward pass over the whole sequence."""
    from megatron_biomed.model.gpt import KVCache
    torch.manual_seed(0)
    model = GPT(preset("tiny", attention_backend=backend, init_method_std=0.2)).eval()
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, 20)
        parts = [model(tokens[:, :10], cache=cache)]
        parts += [model(tokens[:, i:i + 1], cache=cache) for i in range(10, 17)]
        parts.append(model(tokens[:, 17:], cache=cache))
    assert cache.length == 20
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
