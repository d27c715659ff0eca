"""Kernelised linear attention initialised from a pretrained softmax-attention layer.

The baseline the CBSA paper compares against (its special case of orthogonal
representatives: keys and values are multiplied first). Per head (``Q, K, V``: ``N x d``)::

    phi(X) = elu(X F) + 1                      F: d x d, learnable, initialised to the identity
    out_i  = kappa * phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j))

``phi(K)^T V`` is a ``d x d`` matrix, so the cost per head is ``O(N d^2)``: linear in ``N``.
``kappa`` is a learnable per-head step size (unconstrained sign, initialised to 1). The
feature map ``F`` is what attention alignment trains to imitate the pretrained softmax
(as LoLCATs / Hedgehog do). Prefix tokens are treated like any other token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..layout import TokenLayout
from .cbsa_explicit import compute_dtype

# under torch.fx, q.dtype is a graph value: compute_dtype becomes a node of the graph, not a Python branch
torch.fx.wrap("compute_dtype")


class LinearMixer(nn.Module):
    """Token mixer ``(q, k, v) -> context`` (``B x H x N x d``) with a linear-attention kernel."""

    variant = "linear"

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.feature_map = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))
        self.kappa = nn.Parameter(torch.ones(num_heads))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, feature_map='elu+1'"

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x @ self.feature_map.to(x.dtype)) + 1.0

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[TokenLayout] = None
    ) -> torch.Tensor:
        if isinstance(q, torch.fx.Proxy):  # fx: the same float32 compute for half inputs, decided when the graph runs
            work = compute_dtype(q.dtype)
            return self._mix(q.to(work), k.to(work), v.to(work)).to(q.dtype)
        if q.dtype in (torch.float16, torch.bfloat16):  # sums over every token: float16 overflows at a few thousand
            with torch.autocast(q.device.type, enabled=False):
                return self._mix(q.float(), k.float(), v.float()).to(q.dtype)
        return self._mix(q, k, v)

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fq, fk = self.phi(q), self.phi(k)
        kv = fk.transpose(-2, -1) @ v  # B H d d
        z = fk.sum(dim=-2, keepdim=True)  # B H 1 d
        denom = (fq * z).sum(dim=-1, keepdim=True) + self.eps
        out = (fq @ kv) / denom
        return out * self.kappa.view(1, -1, 1, 1).to(out.dtype)
