"""The pure CBSA layer of the paper (Wen, Huang, Li, NeurIPS 2025, eqs. 5-8), for building from scratch.

One shared projection per head ``U_k`` (``D x p``). With ``W = X U_k`` (``N x p``),
``s = p^-1/2`` and the first ``t`` tokens being prefix tokens::

    (5) initialise  P  = sg(pool(W[t:]))                 m x p   (stop-gradient)
    (6) extract     A  = softmax(s P W^T)                m x N   (softmax over tokens)
                    R  = P + eta * A W                   m x p
    (7) contract    C  = softmax(s R R^T) R              m x p   (query = key = value = R)
    (8) broadcast   dX = kappa * A^T C                   N x p
        output      concat_k(dX_k) W_o                   (W_o: an independent learnable matrix)

``eta`` and ``kappa`` are learnable per head with unconstrained sign. Given explicit
coefficients ``A`` (``m x N``), the representatives are ``R = A W`` (the paper's
``Q_k = W^T C_k``) and step 6 is skipped: with ``A = I`` (the tokens as their own
representatives) the layer is MSSA, ``dX = kappa * softmax(s W W^T) W``.
The layer returns the update ``dX W_o``; the caller adds it to the residual stream.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..layout import GridLike, as_grid

from ..pooling import pool_patches


class CBSA(nn.Module):
    """Contract-and-Broadcast Self-Attention layer (eqs. 5-8 of the paper).

    Args:
        dim: token width ``D``.
        num_heads: number of subspaces/heads ``K``; ``p = D / K``.
        num_representatives: representatives per head, a square count or an ``(h, w)`` grid.
        eta: initial extraction step size. kappa: initial broadcast step size.

    ``forward(x, grid)`` takes tokens ``B x N x D`` whose last ``h * w`` tokens are the patch
    grid ``grid=(h, w)`` (any tokens before them are prefix tokens and are not pooled).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_representatives: GridLike = 64,
        eta: float = 1.0,
        kappa: float = 1.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.rep_grid = as_grid(num_representatives)
        self.scale = self.head_dim ** -0.5
        self.subspaces = nn.Linear(dim, dim, bias=False)  # columns: [U_1 | ... | U_K]
        self.out = nn.Linear(dim, dim)
        self.eta = nn.Parameter(torch.full((num_heads,), float(eta)))
        self.kappa = nn.Parameter(torch.full((num_heads,), float(kappa)))

    def forward(
        self,
        x: torch.Tensor,
        grid: Optional[Tuple[int, int]] = None,
        coefficients: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        w = self.subspaces(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # B K N p
        s = self.scale
        if coefficients is None:
            if grid is None:
                raise ValueError("CBSA.forward needs grid=(h, w), the patch grid of the last h*w tokens")
            h, gw = grid
            prefix = n - h * gw
            if prefix < 0:
                raise ValueError(f"grid {grid} has {h * gw} patches but x has only {n} tokens")
            p = pool_patches(w, prefix, h, gw, self.rep_grid).detach()
            a = torch.softmax((p @ w.transpose(-2, -1)) * s, dim=-1)  # B K m N
            r = p + self.eta.view(1, -1, 1, 1) * (a @ w)
        else:
            a = coefficients.to(w.dtype).expand(b, self.num_heads, -1, n)
            r = a @ w
        c = torch.softmax((r @ r.transpose(-2, -1)) * s, dim=-1) @ r  # B K m p
        dx = self.kappa.view(1, -1, 1, 1) * (a.transpose(-2, -1) @ c)  # B K N p
        return self.out(dx.transpose(1, 2).reshape(b, n, self.dim))
