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
