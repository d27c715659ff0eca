"""Kernelised linear attention initialised from a pretrained softmax-attention layer.

The baseline the CBSA paper compares against (its special case of orthogonal
representatives: keys and values are multiplied first). Per head (``Q, K, V``: ``N x d``)::

    phi(X) = elu(X F) + 1                      F: d x d, learnable, initialised to the identity
    out_i  = kappa * phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j))

``phi(K)^T V`` is a ``d x d`` matrix, so the cost per head is ``O(N d^2)``: linear in ``N``.
``kappa`` is a learnable per-head step size (unconstrained sign, initialised to 1). The
feature map ``F`` is what attention alignment trains to imitate the pretrained softmax
(as LoLCATs / Hedgehog do). Prefix tokens are treated like any other token.

As one token-to-token operator (:meth:`LinearMixer.operator`, for analysis; never formed in the forward pass)::

    out = kappa E V,   E_ij = phi(q_i) . phi(k_j) / (phi(q_i) . sum_j phi(k_j) + eps)   the normalised kernel matrix
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..layout import TokenLayout
from .base import Mixer
from .cbsa_explicit import _without_autocast, compute_dtype
from .registry import register_variant

# under torch.fx, q.dtype is a graph value: compute_dtype becomes a node of the graph, not a Python branch
torch.fx.wrap("compute_dtype")


class KernelSteps(NamedTuple):
    """The forward steps of :class:`LinearMixer` that do not involve the values (``B x H x ...``)."""

    fq: torch.Tensor  # N x d  phi(Q)
    fk: torch.Tensor  # N x d  phi(K)
    denom: torch.Tensor  # N x 1  phi(q_i) . sum_j phi(k_j) + eps


@register_variant
class LinearMixer(Mixer):
    """Token mixer ``(q, k, v) -> context`` (``B x H x N x d``) with a linear-attention kernel.

    It has no representatives: :meth:`from_options` ignores the representative options."""

    name = "linear"
    uses_representatives = False
    description = "linear attention"
    formula = "normalised φ(Q)φ(K)^T"

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
        """The feature map ``elu(x F) + 1`` per head (``B x H x N x d``)."""
        return F.elu(x @ self.feature_map.to(x.dtype)) + 1.0

    def kernel_steps(self, q: torch.Tensor, k: torch.Tensor) -> KernelSteps:
        """``phi(Q)``, ``phi(K)`` and the normaliser of every row (:class:`KernelSteps`)."""
        fq, fk = self.phi(q), self.phi(k)
        z = fk.sum(dim=-2, keepdim=True)  # B H 1 d
        return KernelSteps(fq, fk, (fq * z).sum(dim=-1, keepdim=True) + self.eps)

    @torch.no_grad()
    def operator(self, q: torch.Tensor, k: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """The normalised kernel matrix ``E`` (``B x H x N x N``): ``forward(q, k, v) == kappa E V``."""
        work = compute_dtype(q.dtype)  # as forward computes it: float32 for half inputs
        with _without_autocast(q.device.type):
            st = self.kernel_steps(q.to(work), k.to(work))
            return (st.fq @ st.fk.transpose(-2, -1)) / st.denom

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Optional[TokenLayout] = None
    ) -> torch.Tensor:
        """``kappa phi(Q) (phi(K)^T V) / denom`` (``B x H x N x d``), in float32 for half inputs."""
        if isinstance(q, torch.fx.Proxy):  # fx: the same float32 compute for half inputs, decided when the graph runs
            work = compute_dtype(q.dtype)
            return self._mix(q.to(work), k.to(work), v.to(work)).to(q.dtype)
        if q.dtype in (torch.float16, torch.bfloat16):  # sums over every token: float16 overflows at a few thousand
            with torch.autocast(q.device.type, enabled=False):
                return self._mix(q.float(), k.float(), v.float()).to(q.dtype)
        return self._mix(q, k, v)

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.kernel_steps(q, k)
        kv = st.fk.transpose(-2, -1) @ v  # B H d d
        out = (st.fq @ kv) / st.denom
        return out * self.kappa.view(1, -1, 1, 1).to(out.dtype)
