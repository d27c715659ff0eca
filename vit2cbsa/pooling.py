"""Pooling of a ViT's patch tokens into representatives (CBSA step 1), and its adjoint.

The token layout (``N = t + h * w``, the grid recorded from the patch embedding) is :mod:`vit2cbsa.layout`.

Representative initialisation (CBSA step 1) is average pooling of the patch tokens over
the grid, prefix tokens excluded::

    P[i, j] = mean_{r in R_i, c in C_j} W[t + r * w + c]
    R_i = [floor(i * h / gh), ceil((i + 1) * h / gh)),   C_j likewise with w, gw

which is exactly :func:`torch.nn.functional.adaptive_avg_pool2d` (equal windows when
``gh`` divides ``h``). When the patch grid is smaller than the representative grid along
an axis, that axis of the representative grid is clamped to the patch grid (each patch
is then its own representative) instead of duplicating tokens.

Extra representatives (``extra``, the ``convert(..., extra_representatives=...)`` option) are
stacked around the pooled grid::

    "prefix":  P = [q_1; ...; q_t; pool(q[t:])]            each prefix token its own representative
    "global":  P = [pool(q[t:]); mean(q[t:])]              one more: the mean of all patch tokens
    "none":    P = pool(q[t:])

so ``m = t + gh gw`` (``"prefix"``), ``gh gw + 1`` (``"global"``) or ``gh gw``. A prefix token's
representative row of the extraction ``softmax(P K^T)`` is that token's own pretrained attention
row, which keeps the class token's view of the image intact at conversion.

Symbolic sizes (``torch.export`` / ``torch.fx``) take branch-free paths: the clamp to the patch grid as ``sym_min``,
pooling as two separable window matrices built from the sizes.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.fx

from .layout import EXTRA_REPRESENTATIVES, is_concrete


def _sym_min(a: int, b: int) -> int:
    """``min(a, b)`` for sizes: an int for ints, ``sym_min`` for ``SymInt``; a node of the graph under fx (typed, so
    that TorchScript compiles it in a scripted fx graph)."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


torch.fx.wrap("_sym_min")


def effective_grid(rep_grid: Tuple[int, int], h: int, w: int) -> Tuple[int, int]:
    """The representative grid actually used on an ``h x w`` patch grid (clamped to it)."""
    if isinstance(h, int) and isinstance(w, int):
        return min(rep_grid[0], h), min(rep_grid[1], w)
    return _sym_min(rep_grid[0], h), _sym_min(rep_grid[1], w)


def pool_patches(tokens: torch.Tensor, prefix: int, h: int, w: int, rep_grid: Tuple[int, int]) -> torch.Tensor:
    """Average-pool the patch tokens of ``tokens`` (``B, H, N, d``) to ``B, H, m, d`` representatives.

    Prefix tokens (the first ``prefix``) are excluded. Equal windows (``gh | h``, ``gw | w``) are
    averaged through a strided view; otherwise one ``m x hw`` averaging matrix (the adaptive
    windows of ``adaptive_avg_pool2d``) multiplies the patches. Symbolic sizes (:func:`is_concrete`):
    the rows, then the columns, are averaged by their ``gh x h`` and ``gw x w`` window matrices, built in
    the traced program from the sizes, whichever windows they turn out to be.
    """
    gh, gw = effective_grid(rep_grid, h, w)
    patches = tokens[:, :, prefix:, :]
    if not is_concrete(h, w, gh, gw):
        return _pool_separable(patches, h, w, gh, gw)
    if h % gh == 0 and w % gw == 0:
        # equal windows: a strided view and a mean, which copies nothing and saves nothing for backward
        return patches.unflatten(2, (gh, h // gh, gw, w // gw)).mean(dim=(3, 5)).flatten(2, 3)
    # unequal windows: one (m x hw) averaging matrix, built once per (grid, device, dtype)
    return _averaging_matrix(h, w, gh, gw, patches) @ patches


def pool_patches_adjoint(grad: torch.Tensor, h: int, w: int, rep_grid: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`pool_patches` on the patches: ``(B, H, m, d)`` -> ``(B, H, h w, d)``.

    Pooling is linear, ``P = M X``; this returns ``M^T G`` (the gradient of the patch tokens for
    an upstream gradient ``G`` of the representatives), for hand-written backward passes.
    """
    b, nh, _, d = grad.shape
    gh, gw = effective_grid(rep_grid, h, w)
    if h % gh == 0 and w % gw == 0:
        bh, bw = h // gh, w // gw
        spread = (grad / (bh * bw)).view(b, nh, gh, 1, gw, 1, d).expand(b, nh, gh, bh, gw, bw, d)
        return spread.reshape(b, nh, h * w, d)
    return _averaging_matrix(h, w, gh, gw, grad).transpose(0, 1) @ grad


def _pool_separable(patches: torch.Tensor, h, w, gh, gw) -> torch.Tensor:
    """Adaptive average pooling of ``B x H x (h w) x d`` patches to ``B x H x (gh gw) x d``, branch-free: the
    ``gh x h`` row windows, then the ``gw x w`` column windows (the averaging matrix is their outer product)."""
    b, nh, d = patches.shape[0], patches.shape[1], patches.shape[3]
    rows, cols = _windows(h, gh, patches), _windows(w, gw, patches)
    x = rows @ patches.reshape(b, nh, h, w * d)  # B H gh (w d)
    x = cols @ x.reshape(b, nh, gh, w, d)  # B H gh gw d
    return x.reshape(b, nh, gh * gw, d)


_MATRICES: Dict[tuple, torch.Tensor] = {}


def _averaging_matrix(h: int, w: int, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
    """``(gh gw) x (h w)`` adaptive-pooling matrix: the outer product of the 1-D window matrices.

    A precomputed constant: cached (a few dozen grids at most) outside ``torch.compile``, which
    folds it into the graph itself. Built outside inference mode so that a matrix first made
    under ``torch.inference_mode`` can still be saved for backward later."""
    def build() -> torch.Tensor:
        rows, cols = _windows(h, gh, like), _windows(w, gw, like)
        return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(gh * gw, h * w)

    if torch.compiler.is_compiling() or _is_fake(like):  # fake tensors (FLOP counting) are never cached
        return build()
    key = (h, w, gh, gw, like.device, like.dtype)
    matrix = _MATRICES.get(key)
    if matrix is None:
        if len(_MATRICES) >= 64:
            _MATRICES.clear()
        with torch.inference_mode(False):
            matrix = _MATRICES[key] = build()
    return matrix


def _is_fake(t: torch.Tensor) -> bool:
    """True for a ``FakeTensor`` (shapes only, e.g. :func:`vit2cbsa.measure.count_flops`): a matrix built from it
    holds no values, so it must not be cached for real inputs of the same device and dtype."""
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(is_fake(t)) or t.device.type == "meta"


def _windows(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """``out x size`` matrix averaging over the adaptive-pooling windows of a 1-D axis."""
    i = torch.arange(out, device=like.device)
    start, end = (i * size) // out, ((i + 1) * size + out - 1) // out
    r = torch.arange(size, device=like.device)
    mask = ((r >= start[:, None]) & (r < end[:, None])).to(like.dtype)
    return mask / mask.sum(dim=1, keepdim=True)


def extra_parts(extra: str, prefix: int) -> Tuple[int, bool]:
    """``(prefix tokens used as representatives, whether a global representative is added)``."""
    if extra == "prefix":
        return prefix, False
    if extra == "global":
        return 0, True
    if extra == "none":
        return 0, False
    raise ValueError(f"extra_representatives must be one of {EXTRA_REPRESENTATIVES}, got {extra!r}")


def num_representatives_used(rep_grid: Tuple[int, int], h: int, w: int, prefix: int, extra: str) -> int:
    """``m``: the representatives one head uses on an ``h x w`` patch grid with ``prefix`` prefix tokens."""
    gh, gw = effective_grid(rep_grid, h, w)
    lead, glob = extra_parts(extra, prefix)
    return lead + gh * gw + int(glob)


def representatives(tokens: torch.Tensor, prefix: int, h: int, w: int, rep_grid: Tuple[int, int],
                    extra: str = "none") -> torch.Tensor:
    """Representatives ``P`` (``B, H, m, d``) of ``tokens`` (``B, H, N, d``): the pooled grid with the
    extra representatives of ``extra`` around it (module docstring)."""
    pooled = pool_patches(tokens, prefix, h, w, rep_grid)
    lead, glob = extra_parts(extra, prefix)
    if not is_concrete(lead):  # traced: the leading prefix tokens, however many (none is an empty slice)
        parts = [tokens[:, :, :lead], pooled]
        if glob:
            parts.append(tokens[:, :, prefix:].mean(dim=2, keepdim=True))
        return torch.cat(parts, dim=2)
    if not lead and not glob:
        return pooled
    parts = [tokens[:, :, :lead]] if lead else []
    parts.append(pooled)
    if glob:
        parts.append(tokens[:, :, prefix:].mean(dim=2, keepdim=True))
    return torch.cat(parts, dim=2)


def representatives_adjoint_(grad_tokens: torch.Tensor, grad: torch.Tensor, prefix: int, h: int, w: int,
                             rep_grid: Tuple[int, int], extra: str = "none") -> torch.Tensor:
    """Add the adjoint of :func:`representatives` applied to ``grad`` (``B, H, m, d``) to ``grad_tokens``
    (``B, H, N, d``) in place, and return it: the tokens' gradient for an upstream gradient of ``P``."""
    lead, glob = extra_parts(extra, prefix)
    gh, gw = effective_grid(rep_grid, h, w)
    pooled = grad[:, :, lead:lead + gh * gw]
    if lead:
        grad_tokens[:, :, :lead] += grad[:, :, :lead]
    patch_grad = pool_patches_adjoint(pooled, h, w, rep_grid)
    if glob:
        patch_grad = patch_grad + grad[:, :, -1:] / (h * w)
    grad_tokens[:, :, prefix:] += patch_grad
    return grad_tokens
