import pytest
import torch

from megatron_biomed.config import preset
from megatron_biomed.convert import hf
from megatron_biomed.model.gpt import GPT


@pytest.mark.parametrize("scale", [True, False])
def test_same_logits_as_transformers_gpt2(scale):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=500, scale_attn_by_inverse_layer_idx=scale)
    ours = GPT(cfg).eval()
    theirs = GPT2LMHeadModel(hf.to_hf_config(cfg)).eval()
    theirs.load_state_dict(hf.to_hf_state_dict(ours.state_dict(), cfg))
    x = torch.randint(0, 500, (2, 64))
    with torch.no_grad():
        a, b = ours(x)[..., :500], theirs(x).logits
    assert (a - b).abs().max() < 1e-4
    back = GPT(hf.from_hf_config(theirs.config)).eval()
    back.load_state_dict(hf.from_hf_state_dict(theirs.state_dict(), cfg, back.padded_vocab_size))
    with torch.no_grad():
        assert (back(x)[..., :500] - b).abs().max() < 1e-4


@pytest.mark.parametrize("heads, head_dim", [(20, 128), (4, 8), (3, 20), (12, 64)])
def test_fused_qkv_transposes_equal_reorder_then_transpose(heads, head_dim):
    """The converters' one-pass QKV mapping (blocks of 16 rows, or of the head size's gcd with
    16) equals reordering the heads' rows and then transposing, both ways."""
    hidden = heads * head_dim
    ours = torch.randn(3 * hidden, hidden).to(torch.bfloat16)
    theirs = hf._qkv_weight_to_hf(ours, heads)
    assert torch.equal(theirs, hf._qkv_to_hf(ours, heads).t())
    assert torch.equal(hf._qkv_weight_from_hf(theirs, heads), ours)
    other = torch.randn(hidden, 3 * hidden)
    assert torch.equal(hf._qkv_weight_from_hf(other, heads), hf._qkv_from_hf(other.t(), heads))


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "biomedlm-2.7b"])
def test_expected_specs_are_the_models_parameters(name):
    """The converters' written-out parameter list is the model's, in its order; and a model
    built on the meta device (for loading) has those shapes, with no initialiser left patched."""
    from megatron_biomed.convert.common import expected_specs
    from megatron_biomed.model.gpt import on_meta_device
    cfg = preset(name, make_vocab_size_divisible_by=1)
    with on_meta_device():
        model = GPT(cfg)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if n != "lm_head.weight"]
    assert [(n, shape) for n, (shape, _) in expected_specs(cfg).items()] == params
    assert model.lm_head.weight is model.wte.weight and model.wte.weight.is_meta
    layer = torch.nn.Linear(4, 4)  # initialisers work again outside the block
    assert layer.weight.abs().sum() > 0
