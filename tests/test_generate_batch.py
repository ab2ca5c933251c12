"""Batched generation (left padding, one KV cache) gives the tokens of one-at-a-time generation."""
import pytest
import torch

from megatron_biomed.config import preset
from megatron_biomed.generation import generate, generate_batch
from megatron_biomed.model.gpt import GPT


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_batched_greedy_equals_one_at_a_time(backend):
    torch.manual_seed(0)
    model = GPT(preset("tiny", attention_backend=backend, init_method_std=0.2)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 30)]
    eos = 7
    one = [generate(model, p, max_new_tokens=20, eos_id=eos) for p in prompts]
    batched = generate_batch(model, prompts, max_new_tokens=20, eos_id=eos)
    assert batched == one
    # rows that reach the model's 64 positions stop there, as one at a time
    long = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (60, 50, 3)]
    assert generate_batch(model, long, max_new_tokens=30) == [generate(model, p, max_new_tokens=30) for p in long]


def test_padding_changes_nothing_of_a_row():
    """The same prompt alone and beside a longer one: identical logits for its tokens."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", init_method_std=0.2)).eval()
    short, long = [3, 4, 5], list(range(10, 22))
    with torch.no_grad():
        alone = model(torch.tensor([short]))
        tokens = torch.tensor([[0] * 9 + short, long])
        key_mask = torch.arange(12)[None, :] >= torch.tensor([9, 0])[:, None]
        positions = (torch.arange(12)[None, :] - torch.tensor([9, 0])[:, None]).clamp(min=0)
        both = model(tokens, positions=positions, key_mask=key_mask)
    torch.testing.assert_close(both[0, 9:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(both).all()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_fixed_shape_decode_step_gives_the_eager_tokens(backend):
    """The fixed-shape decode step (the whole KV cache read, unwritten columns masked: the same
    shapes at every step), eager and under torch.compile, gives today's greedy tokens in fp32."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", attention_backend=backend, init_method_std=0.2)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 30)]
    eager = generate_batch(model, prompts, max_new_tokens=20, eos_id=7)
    assert generate_batch(model, prompts, max_new_tokens=20, eos_id=7, static=True) == eager
    long = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (60, 50, 3)]  # positions run out
    assert generate_batch(model, long, max_new_tokens=30, static=True) == generate_batch(model, long, max_new_tokens=30)
    if backend == "sdpa":  # compiled once per shape: one backend is enough to show it changes nothing
        assert generate_batch(model, prompts, max_new_tokens=20, eos_id=7, compile=True) == eager
