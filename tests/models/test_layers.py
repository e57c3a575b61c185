"""The CPU fast paths in ``models.layers`` compute what the plain definitions compute."""

import pytest
import torch
import torch.nn.functional as F

from ldmclip.models import layers
from ldmclip.models.layers import QuickGELU


@pytest.mark.parametrize("causal", [False, True])
def test_plain_bf16_attention_matches_sdpa_in_fp32(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 21, 16, generator=gen) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    out = layers._attention(qb, kb, vb, causal)          # takes the plain path: bf16, grad, short
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=3e-2, rtol=3e-2)
    # the same gradients as the fused kernel on the same bf16 inputs
    out.float().square().sum().backward()
    fused = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
    F.scaled_dot_product_attention(*fused, is_causal=causal).float().square().sum().backward()
    for ours, theirs in zip((qb, kb, vb), fused):
        assert torch.allclose(ours.grad.float(), theirs.grad.float(), atol=5e-2, rtol=5e-2)


def test_causal_plain_attention_ignores_later_positions():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(3))
    first = layers._attention(q, k, v, causal=True)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 5:] += 3.0
    v2[:, :, 5:] -= 3.0
    second = layers._attention(q, k2.requires_grad_(), v2.requires_grad_(), causal=True)
    assert torch.equal(first[:, :, :5], second[:, :, :5])
    assert not torch.equal(first[:, :, 5:], second[:, :, 5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_inference_path_is_bit_identical(dtype):
    x = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = x * torch.sigmoid(1.702 * x)
    with torch.inference_mode():
        assert torch.equal(QuickGELU()(x), expected)
    x_leaf = x.clone().requires_grad_()
    out = QuickGELU()(x_leaf)                              # training path: differentiable
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    assert x_leaf.grad is not None
