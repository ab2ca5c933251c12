"""Write a real Megatron-LM (megatron-core) `torch_dist` GPT checkpoint on CPU, plus the logits
megatron-core's own forward gives, for the import test.

megatron-core's GPTModel, sharded_state_dict and dist_checkpointing.save are used as they are;
only three CUDA-only calls are redirected so they run on CPU: the attention buffer's device, a
stream synchronize, and the model-parallel RNG fork (dropout is 0 here).

usage: write_megatron_checkpoint.py OUT_DIR VARIANT... (fused, exact, per_layer): writes
OUT_DIR/VARIANT/ (a checkpoint root) and OUT_DIR/VARIANT.pt (tokens and logits) for each.
"""
import argparse
import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist


def main():
    out_dir, variants = sys.argv[1], sys.argv[2:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mpu_random
    ps.initialize_model_parallel(1, 1)
    mpu_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    for variant in variants:
        write(variant, os.path.join(out_dir, variant), os.path.join(out_dir, variant + ".pt"))
    gc_and_exit()


def write(variant, out_root, logits_file):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    torch.manual_seed(0)
    fused = variant != "exact"
    cfg = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                            add_bias_linear=True, bias_activation_fusion=fused, masked_softmax_fusion=False,
                            bias_dropout_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
                            init_method_std=0.2)
    vocab, padded, seq = 500, 512, 32
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=padded,
                     max_sequence_length=seq, position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=True).eval()
    with torch.no_grad():  # non-zero biases and norms, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, vocab, (2, seq))
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    with torch.no_grad():
        logits = model(tokens, torch.arange(seq).unsqueeze(0).expand(2, -1), attention_mask=mask)
    torch.save({"tokens": tokens, "logits": logits[..., :vocab].contiguous()}, logits_file)
    it_dir = os.path.join(out_root, "iter_0000100")
    os.makedirs(it_dir)
    args = argparse.Namespace(num_layers=3, hidden_size=64, num_attention_heads=4, padded_vocab_size=padded,
                              max_position_embeddings=seq, seq_length=seq, bias_gelu_fusion=fused,
                              openai_gelu=False, swiglu=False, squared_relu=False, normalization="LayerNorm",
                              hidden_dropout=0.0, attention_dropout=0.0, norm_epsilon=1e-5,
                              make_vocab_size_divisible_by=128, group_query_attention=False)
    metadata = {"non_homogeneous_layers": True} if variant == "per_layer" else None
    state = {"model": model.sharded_state_dict(metadata=metadata), "args": args, "iteration": 100,
             "checkpoint_version": 3.0}
    dist_checkpointing.save(state, it_dir, sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1,
                                                                                         thread_count=1))
    with open(os.path.join(out_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("100")


def gc_and_exit():
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
