"""Contract-and-Broadcast Self-Attention for a pretrained softmax-attention layer.

Per head (``Q, K, V``: ``N x d`` from the layer's pretrained projections, ``s = d^-1/2``,
``m`` representatives, the first ``t`` tokens are prefix tokens)::

    1. initialise   P   = [Q[:t]; pool(Q[t:])]              m x d   (pooled queries on the grid, and
                                                                     extra ones: vit2cbsa.layout)
    2. extract      A   = softmax(s e^a P K^T)              m x N   (softmax over all N tokens)
                    K_r = A K,   V_r = A V                  m x d   (representatives)
    3. contract     C   = V_r + gamma * softmax(s e^a P K_r^T) V_r  (m x m, among representatives)
    4. broadcast    out = kappa * B C                       N x d
                    B   = softmax(s e^b Q K_r^T)      broadcast="key"       (default)
                    B   = softmax(s e^b Q P^T)        broadcast="query"     (Agent Attention)
                    B   = A^T / (A^T 1)               broadcast="transpose" (the paper's A^T)
                    B_i = e_i  for prefix token i when it is representative i and prefix_broadcast="own"

With the prefix tokens as representatives (the default of ``vit2cbsa.convert``) and ``prefix_broadcast="own"``,
prefix token ``i`` gets ``kappa C_i``: at conversion (``gamma = 0``, ``kappa = 1``, ``a = 0``) that is
``softmax(s q_i K^T) V``, the pretrained layer's own output for the class token, exactly; the patch
tokens are approximated through the representatives (and read the prefix representatives too).

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

Implementation: ``A`` (``m x N``) and ``B`` (``N x m``) are
materialised and every step is a batched matmul (on these thin shapes plain matmuls beat fused
attention kernels), all in :mod:`vit2cbsa.attention.cbsa_explicit`: inference runs the forward steps as
written; training adds a hand-derived backward pass. In training (by default,
``recompute=True``) the forward steps are rerun in backward instead of kept, so the mixer keeps only
``q, k, v`` (what the original layer keeps too) and peak memory stays at or below the original's at
high resolution (at ``N`` of a few hundred the backward's ``m x N`` temporaries add ~2%).
Temperatures, ``kappa`` and the scale are folded into the small ``m x d`` operands, so no ``N x d``
tensor is rescaled; the pooling matrix of unequal windows is a cached constant. ``broadcast="transpose"``
(which needs ``A`` itself in the broadcast) trains through autograd on the same forward steps.

For analysis, :meth:`CBSAMixer.maps` returns those forward steps as a :class:`~vit2cbsa.attention.base.CBSAMaps`
(``A``, ``B``, ``S = softmax(s e^a P K_r^T)``, ``P``, ``K_r``, ``V_r``, ``C``, the output) and
:meth:`CBSAMixer.operator` the whole layer as one token-to-token operator, ``out = kappa E V`` with
``E = B (I + gamma S) A`` (row-stochastic when ``gamma = 0``).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx
from torch import nn

from ..errors import UsageError
from ..layout import EXTRA_REPRESENTATIVES, TokenLayout, is_tracing
from ..pooling import effective_grid, extra_parts
from .base import CBSAMaps, Mixer
from .cbsa_explicit import (
    ExplicitCBSA,
    Geometry,
    Steps,
    StepSizes,
    _without_autocast,
    compute_dtype,
    flat_heads,
    forward_steps,
)
from .registry import register_variant

# under torch.fx, q.dtype is a graph value: compute_dtype becomes a node of the graph, not a Python branch
torch.fx.wrap("compute_dtype")

BROADCASTS = ("key", "query", "transpose")
PREFIX_BROADCASTS = ("own", "all")


@register_variant
class CBSAMixer(Mixer):
    """Token mixer of a converted layer: ``(q, k, v) -> context``, all ``B x H x N x d``.

    Args:
        num_heads: number of heads ``H``.
        head_dim: width ``d`` of a head.
        rep_grid: pooled representative grid ``(gh, gw)``; ``m = gh * gw`` plus the extra ones.
        broadcast: how representatives are broadcast back to the tokens (see module docstring).
        scale: attention scale; defaults to ``head_dim ** -0.5`` as in the pretrained layer.
        extra_representatives: ``"prefix"``, ``"global"`` or ``"none"`` (:mod:`vit2cbsa.layout`).
        prefix_broadcast: ``"own"``: a prefix token that is a representative reads back only its own
            representative (its broadcast row is one-hot); ``"all"``: like every other token.
    """

    name = "cbsa"
    uses_representatives = True
    description = "CBSA"
    formula = "E = B(I+γS)A"
    contraction: bool = True
    #: training: keep only ``q, k, v`` and rerun the forward steps in backward (five of the ~20
    #: ``m x N x d`` matmuls of a training step; no measurable cost at 224 or 1024), so at high
    #: resolution peak memory stays at the original layer's. Set ``False`` on a module to keep ``A``,
    #: ``B`` (``2 m N`` numbers per head) and the ``m x d`` steps instead.
    recompute: bool = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        rep_grid: Tuple[int, int],
        broadcast: str = "key",
        scale: float | None = None,
        extra_representatives: str = "none",
        prefix_broadcast: str = "all",
    ) -> None:
        super().__init__()
        if broadcast not in BROADCASTS:
            raise UsageError(f"broadcast must be one of {BROADCASTS}, got {broadcast!r}")
        if extra_representatives not in EXTRA_REPRESENTATIVES:
            raise UsageError(f"extra_representatives must be one of {EXTRA_REPRESENTATIVES}, got {extra_representatives!r}")
        if prefix_broadcast not in PREFIX_BROADCASTS:
            raise UsageError(f"prefix_broadcast must be one of {PREFIX_BROADCASTS}, got {prefix_broadcast!r}")
        self.extra_representatives = extra_representatives
        self.prefix_broadcast = prefix_broadcast
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.rep_grid = (int(rep_grid[0]), int(rep_grid[1]))
        self.broadcast = broadcast
        self.scale = float(scale) if scale is not None else head_dim ** -0.5
        self.kappa = nn.Parameter(torch.ones(num_heads))
        self.log_temperature = nn.Parameter(torch.zeros(2, num_heads))
        if self.contraction:
            self.gamma = nn.Parameter(torch.zeros(num_heads))

    @classmethod
    def from_options(cls, num_heads: int, head_dim: int, *, rep_grid: Tuple[int, int], broadcast: str = "key",
                     scale: Optional[float] = None, extra_representatives: str = "none",
                     prefix_broadcast: str = "all", **_: Any) -> "CBSAMixer":
        """The mixer of one layer from the conversion options (every representative option applies)."""
        return cls(num_heads, head_dim, rep_grid, broadcast=broadcast, scale=scale,
                   extra_representatives=extra_representatives, prefix_broadcast=prefix_broadcast)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, representatives={self.rep_grid[0]}x"
            f"{self.rep_grid[1]}, extra_representatives={self.extra_representatives!r}, broadcast={self.broadcast!r}, "
            f"prefix_broadcast={self.prefix_broadcast!r}, contraction={self.contraction}"
        )

    def geometry(self, num_tokens: int, layout: TokenLayout) -> Geometry:
        """The :class:`~vit2cbsa.attention.cbsa_explicit.Geometry` of an input of ``num_tokens`` tokens."""
        prefix, h, w = layout.split(num_tokens)
        return Geometry(prefix, h, w, self.rep_grid, self.broadcast, self.extra_representatives,
                        self.prefix_broadcast == "own")

    def step_sizes(self, dtype: torch.dtype) -> StepSizes:
        """``(t0, t1, gamma, kappa)``: scaled temperatures and steps, one number per head each."""
        t = self.log_temperature.to(dtype).exp() * self.scale
        gamma = self.gamma.to(dtype) if self.contraction else None
        return StepSizes(t[0], t[1], gamma, self.kappa.to(dtype))

    def steps(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> Steps:
        """Every forward step (:class:`~vit2cbsa.attention.cbsa_explicit.Steps`) in ``q``'s dtype, for analysis."""
        return forward_steps(q, k, v, *self.step_sizes(q.dtype), self.geometry(q.shape[-2], layout))

    @torch.no_grad()
    def maps(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], layout: TokenLayout) -> CBSAMaps:
        """The forward steps as a :class:`~vit2cbsa.attention.base.CBSAMaps`, computed as :meth:`forward` computes
        them (float32 for half inputs); ``v=None``: no ``V_r``, ``C``, output."""
        work = compute_dtype(q.dtype)
        geo = self.geometry(q.shape[-2], layout)
        q, k = q.to(work), k.to(work)
        with _without_autocast(q.device.type):
            st = forward_steps(q, k, k if v is None else v.to(work), *self.step_sizes(work), geo)
            k_r = st.kr if st.kr is not None else st.a @ k
        v_r, c, out = (None, None, None) if v is None else (st.vr, st.cc, st.out)
        lead, glob = extra_parts(geo.extra, geo.prefix)
        return CBSAMaps(st.a, st.bm, st.g, st.p, k_r, v_r, c, out, self.gamma.detach() if self.contraction else None,
                        self.kappa.detach(), geo.prefix, (geo.h, geo.w), effective_grid(self.rep_grid, geo.h, geo.w),
                        lead, glob)

    @torch.no_grad()
    def operator(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``E = B (I + gamma S) A`` (``B x H x N x N``): ``forward(q, k, v, layout) == kappa E V``."""
        return self.maps(q, k, None, layout).operator()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``kappa B C`` (``B x H x N x d``): the steps of the module docstring."""
        geo = self.geometry(q.shape[-2], layout)
        work = compute_dtype(q.dtype)  # float32 for float16 / bfloat16 inputs (cbsa_explicit.LOW_PRECISION)
        args = self.step_sizes(work)
        if is_tracing(q):  # torch.fx / torch.export: the forward steps, which autograd differentiates if asked
            return forward_steps(q.to(work), k.to(work), v.to(work), *args, geo).out.to(q.dtype)
        stores_graph = torch.is_grad_enabled() and (q.requires_grad or self.kappa.requires_grad)
        if stores_graph and self.broadcast != "transpose":
            return ExplicitCBSA.apply(flat_heads(q), flat_heads(k), flat_heads(v), *args, geo, self.recompute)
        # inference (or any graph autograd records here: the transpose broadcast, which needs A itself);
        # strided heads as they come (measured faster for inference at batch 8 than flattening them first)
        with _without_autocast(q.device.type):
            return forward_steps(q.to(work), k.to(work), v.to(work), *args, geo).out.to(q.dtype)
