"""The attention block against torch's nn.MultiheadAttention, and the entropy against its closed forms."""

import math

import pytest
import torch
from torch import nn

from steadygrad.attention import AttentionSoftmax, CausalSelfAttention, attention_entropy, causal_mask


def _copy_into_torch(block: CausalSelfAttention) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(block.width, block.heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([block.q_proj.bias, block.k_proj.bias, block.v_proj.bias]))
        reference.out_proj.weight.copy_(block.out_proj.weight)
        reference.out_proj.bias.copy_(block.out_proj.bias)
    return reference


@pytest.mark.parametrize("heads", [1, 4])
def test_outputs_and_probabilities_equal_torch_multihead_attention(heads):
    torch.manual_seed(0)
    block = CausalSelfAttention(32, heads).double()
    with torch.no_grad():
        for proj in (block.q_proj, block.k_proj, block.v_proj, block.out_proj):
            proj.bias.normal_()
    reference = _copy_into_torch(block)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    seen = []
    block.softmax.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    out = block(x)
    expected, weights = reference(x, x, x, attn_mask=causal_mask(7), need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, expected)
    logits, probs = seen[0]
    torch.testing.assert_close(probs, weights)
    assert probs.shape == (3, heads, 7, 7)
    assert torch.isinf(logits[..., 0, 1:]).all() and (logits[..., -1, :] > -math.inf).all()


def test_gradients_are_float64_exact():
    torch.manual_seed(1)
    block = CausalSelfAttention(8, 2, qk_norm="rms").double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_the_future_does_not_reach_the_past():
    torch.manual_seed(2)
    block = CausalSelfAttention(16, 4)
    x = torch.randn(1, 6, 16)
    changed = x.clone()
    changed[0, 4] += 1.0
    before, after = block(x), block(changed)
    torch.testing.assert_close(before[0, :4], after[0, :4])
    assert not torch.allclose(before[0, 4:], after[0, 4:])


def test_qk_norm_normalizes_every_head_of_queries_and_keys():
    torch.manual_seed(3)
    block = CausalSelfAttention(16, 2, qk_norm=True)
    seen = {}
    block.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    block(torch.randn(2, 5, 16) * 100)
    q = seen["q"]
    assert q.shape == (2, 2, 5, 8)
    torch.testing.assert_close(q.mean(-1), torch.zeros(2, 2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.var(-1, unbiased=False), torch.ones(2, 2, 5), atol=1e-3, rtol=0)


def test_entropy_closed_forms():
    uniform = torch.full((4,), 0.25)
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    assert attention_entropy(uniform).item() == pytest.approx(math.log(4))
    assert attention_entropy(one_hot).item() == 0.0
    p = torch.softmax(torch.randn(5, 9, dtype=torch.float64), -1)
    expected = torch.distributions.Categorical(probs=p).entropy()
    torch.testing.assert_close(attention_entropy(p), expected)


def test_softmax_module_is_torch_softmax():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(AttentionSoftmax()(x), torch.softmax(x, -1))


def test_bad_shapes_and_options_are_named():
    with pytest.raises(ValueError, match="divide width"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="qk_norm"):
        CausalSelfAttention(32, 4, qk_norm="batch")
    with pytest.raises(ValueError, match=r"\(batch, sequence, 32\)"):
        CausalSelfAttention(32, 4)(torch.randn(5, 32))
