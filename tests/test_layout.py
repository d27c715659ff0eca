"""Representative pooling over the patch grid, checked against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from vit2cbsa.layout import TokenLayout, as_grid

from vit2cbsa.pooling import pool_patches, pool_patches_adjoint


def _heads(b, n, h, d):
    # the usual layout: a (B, N, H, d) tensor viewed as (B, H, N, d)
    return torch.randn(b, n, h, d, dtype=torch.float64).transpose(1, 2)


def test_pool_equals_reshape_mean_when_divisible():
    prefix, h, w = 3, 8, 12
    x = _heads(2, prefix + h * w, 2, 5)
    out = pool_patches(x, prefix, h, w, (4, 3))
    grid = x[:, :, prefix:].reshape(2, 2, h, w, 5)
    ref = grid.reshape(2, 2, 4, 2, 3, 4, 5).mean(dim=(3, 5)).reshape(2, 2, 12, 5)
    torch.testing.assert_close(out, ref)


def test_pool_non_divisible_uses_adaptive_windows():
    prefix, h, w, gh, gw = 1, 7, 5, 3, 2
    x = _heads(1, prefix + h * w, 1, 4)
    out = pool_patches(x, prefix, h, w, (gh, gw))
    grid = x[0, 0, prefix:].reshape(h, w, 4)
    for i in range(gh):
        r0, r1 = (i * h) // gh, math.ceil((i + 1) * h / gh)
        for j in range(gw):
            c0, c1 = (j * w) // gw, math.ceil((j + 1) * w / gw)
            ref = grid[r0:r1, c0:c1].reshape(-1, 4).mean(0)
            torch.testing.assert_close(out[0, 0, i * gw + j], ref)


def test_prefix_tokens_do_not_influence_representatives():
    prefix, h, w = 5, 4, 4
    x = _heads(2, prefix + h * w, 3, 8)
    y = x.clone()
    y[:, :, :prefix] = 1e6 * torch.randn_like(y[:, :, :prefix])
    torch.testing.assert_close(pool_patches(x, prefix, h, w, (2, 2)), pool_patches(y, prefix, h, w, (2, 2)))


def test_grid_smaller_than_representatives_is_clamped():
    prefix, h, w = 1, 3, 2
    x = _heads(1, prefix + h * w, 1, 4)
    out = pool_patches(x, prefix, h, w, (8, 8))
    assert out.shape == (1, 1, h * w, 4)  # each patch is its own representative
    torch.testing.assert_close(out[0, 0], x[0, 0, prefix:])


def test_layout_split_and_errors():
    layout = TokenLayout()
    with pytest.raises(ValueError, match="patch grid of this input is unknown"):
        layout.split(10)
    layout.use_grid((3, 3))
    assert layout.split(11) == (2, 3, 3)
    with pytest.raises(ValueError, match="token merging"):
        layout.split(8)


@pytest.mark.parametrize("value,expected", [(64, (8, 8)), (1, (1, 1)), ((4, 8), (4, 8)), ([2, 3], (2, 3))])
def test_as_grid(value, expected):
    assert as_grid(value) == expected


@pytest.mark.parametrize("value,exc,match", [
    (0, ValueError, "positive"), (-4, ValueError, "positive"), (48, ValueError, r"not a square.*\(6, 8\)"),
    ((0, 4), ValueError, "positive"), (2.5, TypeError, "int"), ((2, 2.0), TypeError, "two ints"), (True, TypeError, "bool"),
])
def test_as_grid_rejects(value, exc, match):
    with pytest.raises(exc, match=match):
        as_grid(value)


def test_cached_averaging_matrix_survives_inference_mode_then_training():
    from vit2cbsa.pooling import pool_patches

    h, w = 7, 5  # 3x2 representatives: unequal windows, the cached matrix path
    with torch.inference_mode():
        first = pool_patches(torch.randn(1, 1, 1 + h * w, 4), 1, h, w, (3, 2))
    assert first.shape == (1, 1, 6, 4)
    x = torch.randn(1, 1, 1 + h * w, 4, requires_grad=True)
    pool_patches(x, 1, h, w, (3, 2)).sum().backward()  # would fail on an inference tensor
    # each patch's gradient is the sum over the windows containing it of 1 / window size
    expected = torch.zeros(h, w)
    for i in range(3):
        for j in range(2):
            r0, r1 = (i * h) // 3, -(-((i + 1) * h) // 3)
            c0, c1 = (j * w) // 2, -(-((j + 1) * w) // 2)
            expected[r0:r1, c0:c1] += 1.0 / ((r1 - r0) * (c1 - c0))
    torch.testing.assert_close(x.grad[0, 0, 1:, 0], expected.flatten())
    assert x.grad[0, 0, 0].abs().sum() == 0


@pytest.mark.parametrize("grid, reps", [((8, 12), (4, 3)), ((7, 5), (3, 2))])  # equal / unequal windows
def test_pool_adjoint_is_the_transpose_of_pooling(grid, reps):
    """<pool(X), G> = <X, pool^T(G)> for all X, G: the defining property of the adjoint."""
    h, w = grid
    x = _heads(2, h * w, 3, 4)
    g = torch.randn(2, 3, reps[0] * reps[1], 4, dtype=torch.float64)
    lhs = (pool_patches(x, 0, h, w, reps) * g).sum()
    rhs = (x * pool_patches_adjoint(g, h, w, reps)).sum()
    torch.testing.assert_close(lhs, rhs)
    assert pool_patches_adjoint(g, h, w, reps).shape == x.shape
