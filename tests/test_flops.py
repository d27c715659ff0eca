"""Converted attention costs linear FLOPs in the number of tokens; softmax attention costs quadratic."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from vit2cbsa.measure import flop_counter

import vit2cbsa

SIDES = [8, 16, 32, 64]  # patch grids 8x8 .. 64x64: N = 65 .. 4097


def attention_flops(attn, layout, side, dim):
    x = torch.randn(1, 1 + side * side, dim)
    if layout is not None:
        layout.use_grid((side, side))
    with flop_counter() as counter, torch.no_grad():
        attn(x)
    return counter.get_total_flops()


def fit_exponent(ns, flops):
    # the exponent of the growth between the two largest sizes
    return np.log(flops[-1] / flops[-2]) / np.log(ns[-1] / ns[-2])


@pytest.mark.parametrize("variant", ["cbsa", "contraction_free", "linear"])
def test_flops_linear_in_tokens(variant):
    dim = 64
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=dim, depth=1, num_heads=2,
                              num_classes=0, dynamic_img_size=True)
    orig = [attention_flops(model.blocks[0].attn, None, s, dim) for s in SIDES]
    vit2cbsa.convert(model, variant, 64)
    layout = vit2cbsa.layout_of(model)
    conv = [attention_flops(model.blocks[0].attn, layout, s, dim) for s in SIDES]
    ns = [1 + s * s for s in SIDES]
    # independent count of the softmax layer: projections 2*N*D*3D + 2*N*D*D, QK^T and AV 2 * 2*N^2*D
    expected_orig = [2 * n * dim * 4 * dim + 4 * n * n * dim for n in ns]
    assert orig == expected_orig
    assert fit_exponent(ns, orig) > 1.6
    assert fit_exponent(ns, conv) < 1.05
    # per-token cost is flat for the converted layer: within 5% from N=1025 to N=4097
    per_token = [f / n for f, n in zip(conv, ns)]
    assert max(per_token[2:]) / min(per_token[2:]) < 1.05
    assert conv[-1] < orig[-1] / 5


def test_fused_attention_counted_on_cpu():
    """The CPU fused softmax-attention kernel counts as its two N x N matmuls (forward) and five (backward),
    whether or not this torch's own registry knows it."""
    b, h, n, d = 2, 3, 50, 16
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    with flop_counter() as fwd:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert fwd.get_total_flops() == 2 * (2 * b * h * n * n * d)
    with flop_counter() as bwd:
        out.sum().backward()
    assert bwd.get_total_flops() == 5 * (2 * b * h * n * n * d)
