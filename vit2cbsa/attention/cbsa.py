"""Contract-and-Broadcast Self-Attention for a pretrained softmax-attention layer.

Per head (``Q, K, V``: ``N x d`` from the layer's pretrained projections, ``s = d^-1/2``,
``m`` representatives, the first ``t`` tokens are prefix tokens)::

    1. initialise   P   = pool(Q[t:])                       m x d   (pooled queries on the grid)
    2. extract      A   = softmax(s e^a P K^T)              m x N   (softmax over all N tokens)
                    K_r = A K,   V_r = A V                  m x d   (representatives)
    3. contract     C   = V_r + gamma * softmax(s e^a P K_r^T) V_r  (m x m, among representatives)
    4. broadcast    out = kappa * B C                       N x d
                    B   = softmax(s e^b Q K_r^T)      broadcast="key"       (default)
                    B   = softmax(s e^b Q P^T)        broadcast="query"     (Agent Attention)
                    B   = A^T / (A^T 1)               broadcast="transpose" (the paper's A^T)

``gamma`` (contraction step) and ``kappa`` (broadcast step) are learnable per head, with
unconstrained sign; ``gamma`` starts at 0, so a freshly converted CBSA layer is exactly its
contraction-free form, and ``kappa`` starts at 1. ``a`` and ``b`` are learnable per-head log
temperatures of the extraction and broadcast softmaxes (``log_temperature[0]``, ``[1]``),
starting at 0 (the pretrained scale): pooled queries are averages and less peaked than single
queries, which alignment can compensate for. The output projection ``W_o`` of the
pretrained layer is applied afterwards by the owning module. Cost per head: ``O(N m d)``
for steps 2 and 4 and ``O(m^2 d)`` for step 3 -- linear in ``N``.

The contraction among representatives uses the pretrained query/key similarity: the
representative queries ``P`` attend to the extracted representative keys ``K_r``, so the
``m x m`` step is softmax attention of the pretrained layer restricted to the
representatives (the paper's ``softmax(R R^T) R`` with ``R`` split into its pretrained
query, key and value views).

Implementation: two paths compute the same equations. When autograd records a graph (training)
and ``N > 4 m``, every step is a fused scaled-dot-product-attention call: ``A`` is never
materialised (``K_r`` and ``V_r`` are two calls sharing the queries), and by default
(``recompute=True``) the mixer is recomputed in backward, so training keeps only ``q, k, v`` for it
and its peak memory stays at or below the original layer's. Otherwise (inference, small ``N``, or
``broadcast="transpose"``, which needs ``A``) ``A`` (``m x N``) and ``B`` (``N x m``) are materialised:
``A`` is reused for ``K_r`` and ``V_r``, and on these thin shapes plain matmuls beat fused kernels.
Temperatures, ``kappa`` and the scale are folded into the small ``m x d`` operands, so no ``N x d``
tensor is rescaled; the pooling matrix of unequal windows is a cached constant.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from ..layout import TokenLayout, effective_grid, pool_patches

BROADCASTS = ("key", "query", "transpose")


class CBSAMixer(nn.Module):
    """Token mixer of a converted layer: ``(q, k, v) -> context``, all ``B x H x N x d``.

    Args:
        num_heads: number of heads ``H``.
        head_dim: width ``d`` of a head.
        rep_grid: representative grid ``(gh, gw)``; ``m = gh * gw``.
        broadcast: how representatives are broadcast back to the tokens (see module docstring).
        scale: attention scale; defaults to ``head_dim ** -0.5`` as in the pretrained layer.
    """

    contraction: bool = True
    variant: str = "cbsa"
    #: training with the fused path: keep only ``q, k, v`` for backward and recompute the mixer
    #: there (activation checkpointing of this module alone, about 3% more time per training step
    #: for ViT-S at 1024). Set ``False`` on a module to trade those few ``m x d`` tensors per layer
    #: for the recomputation.
    recompute: bool = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        rep_grid: Tuple[int, int],
        broadcast: str = "key",
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {broadcast!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rep_grid = (int(rep_grid[0]), int(rep_grid[1]))
        self.broadcast = broadcast
        self.scale = float(scale) if scale is not None else head_dim ** -0.5
        self.kappa = nn.Parameter(torch.ones(num_heads))
        self.log_temperature = nn.Parameter(torch.zeros(2, num_heads))
        if self.contraction:
            self.gamma = nn.Parameter(torch.zeros(num_heads))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, representatives={self.rep_grid[0]}x"
            f"{self.rep_grid[1]}, broadcast={self.broadcast!r}, contraction={self.contraction}"
        )

    def representatives(self, q: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Step 1: pooled queries ``P`` (``B x H x m x d``)."""
        prefix, h, w = layout.split(q.shape[-2])
        return pool_patches(q, prefix, h, w, self.rep_grid)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        prefix, h, w = layout.split(q.shape[-2])
        m = effective_grid(self.rep_grid, h, w)
        stores_graph = torch.is_grad_enabled() and (q.requires_grad or self.kappa.requires_grad)
        if self.broadcast == "transpose" or not stores_graph or q.shape[-2] <= 4 * m[0] * m[1]:
            return self._explicit(q, k, v, pool_patches(q, prefix, h, w, self.rep_grid))
        if self.recompute:
            return checkpoint(self._fused, q, k, v, prefix, h, w, use_reentrant=False)
        return self._fused(q, k, v, prefix, h, w)

    def _factors(self, dtype: torch.dtype):
        temp = self.log_temperature.exp().to(dtype).view(2, 1, -1, 1, 1)
        return temp, self.kappa.view(1, -1, 1, 1).to(dtype)

    def _contract(self, c: torch.Tensor, queries: torch.Tensor, k_r: torch.Tensor,
                  scale: Optional[float]) -> torch.Tensor:
        """Step 3: ``V_r + gamma softmax(P K_r^T) V_r`` (``m x m``, among representatives).

        ``scale``: the fused kernel's scale; ``None``: ``queries`` already carry it (plain matmuls)."""
        if not self.contraction:
            return c
        gamma = self.gamma.view(1, -1, 1, 1).to(c.dtype)
        if scale is not None:
            return c + gamma * F.scaled_dot_product_attention(queries, k_r, c, scale=scale)
        return c + gamma * (torch.softmax(queries @ k_r.transpose(-2, -1), dim=-1) @ c)

    def _fused(self, q, k, v, prefix: int, h: int, w: int) -> torch.Tensor:
        """Every step a fused kernel: ``A`` (``m x N``) is never stored."""
        p = pool_patches(q, prefix, h, w, self.rep_grid)  # B H m d
        s = self.scale
        temp, kappa = self._factors(q.dtype)
        p_query = p * temp[0]  # representatives as queries of extraction and contraction
        v_r = F.scaled_dot_product_attention(p_query, k, v, scale=s)
        need_keys = self.broadcast == "key" or self.contraction
        k_r = F.scaled_dot_product_attention(p_query, k, k, scale=s) if need_keys else None
        c = self._contract(v_r, p_query, k_r, s) * kappa  # the broadcast is linear in c: scale m x d, not N x d
        keys = (k_r if self.broadcast == "key" else p) * temp[1]
        return F.scaled_dot_product_attention(q, keys, c, scale=s)

    def _explicit(self, q, k, v, p) -> torch.Tensor:
        """Same equations with ``A`` (``m x N``) and ``B`` (``N x m``) materialised: fewer, faster kernel
        calls than fused attention on these thin shapes; for inference and small N."""
        temp, kappa = self._factors(q.dtype)
        p_scaled = p * (temp[0] * self.scale)
        a = torch.softmax(p_scaled @ k.transpose(-2, -1), dim=-1)  # B H m N
        v_r = a @ v
        k_r = a @ k if self.broadcast == "key" or self.contraction else None
        c = self._contract(v_r, p_scaled, k_r, None) * kappa
        if self.broadcast == "transpose":
            at = a.transpose(-2, -1)  # B H N m
            return (at @ c) / at.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(at.dtype).tiny)
        keys = (k_r if self.broadcast == "key" else p) * (temp[1] * self.scale)
        return torch.softmax(q @ keys.transpose(-2, -1), dim=-1) @ c  # B (N x m) is small without a graph
