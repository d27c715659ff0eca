"""CBSA with ``A`` and ``B`` materialised: the forward steps, and a hand-derived backward pass.

Forward, per head (``t0 = s e^a``, ``t1 = s e^b``: scale times temperatures; ``q`` is ``N x d``)::

    P  = reps(q)                Pe = t0 P                                   m x d
    A  = softmax(Pe k^T)        Kr = A k,  Vr = A v                         m x N,  m x d
    G  = softmax(Pe Kr^T)       Cc = Vr + gamma G Vr    (Cc = Vr without contraction)
    C  = kappa Cc               Kb = Kr (broadcast="key") or P ("query"),   Ks = t1 Kb
    Bm = softmax(q Ks^T)        out = Bm C                                  N x m,  N x d
                                out = (A^T C) / (A^T 1)  for broadcast="transpose" (no Ks, Bm;
                                A^T / (A^T 1) computed as softmax over representatives of log A)

Backward, for the upstream gradient ``dO`` (``softmax'(S, dS) = S * (dS - rowsum(dS * S))``)::

    dC  = Bm^T dO               dBm = dO C^T          dSb = softmax'(Bm, dBm)
    dq  = dSb Ks                dKs = dSb^T q         dt1 = <dKs, Kb>     dKb = t1 dKs
    dkappa = <dC, Cc>           dCc = kappa dC
    contraction:  dgamma = <G^T dCc, Vr>              dVr = dCc + gamma G^T dCc
                  dSg = softmax'(G, gamma dCc Vr^T)   dPe = dSg Kr        dKr = dSg^T Pe
    dKr += dKb (key)            dA  = dVr v^T + dKr k^T
    dv  = A^T dVr               dk  = A^T dKr + dSa^T Pe,   dSa = softmax'(A, dA)
    dPe += dSa k                dt0 = <dPe, P>        dP = t0 dPe (+ dKb for "query")
    dq += reps^T(dP)

(``reps``: the pooled patch grid with the extra representatives, :func:`vit2cbsa.pooling.representatives`;
``reps^T`` its adjoint.)

(``<X, Y>`` sums the elementwise product per head.) Autograd through the same forward adds a node,
and often an expand or a reduction, for every broadcast parameter product and pooling matmul; at ``N``
of a few hundred the mixer's time is mostly such per-kernel overhead, not FLOPs. In training all tensors
are ``B x H x rows x cols`` whose ``(B, H)`` dimensions flatten to one batch dimension
(:func:`flat_heads`), so every matmul is one batched GEMM without copies: strided heads of a batch
larger than one are copied once, not once per matmul.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..layout import is_concrete

from ..pooling import extra_parts, representatives, representatives_adjoint_


def flat_heads(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``B x H x N x d``) with ``(B, H)`` flattenable to one batch dimension: a view when it already
    is (batch 1, or contiguous heads), else one copy."""
    b, nh, n, d = x.shape
    return x.reshape(b * nh, n, d).view(b, nh, n, d)


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """``H`` numbers -> ``1 x H x 1 x 1``, to scale ``B x H x rows x cols`` tensors head by head."""
    return x.view(1, -1, 1, 1)


class Geometry(NamedTuple):
    """Where the representatives come from and how they are broadcast, for one input."""

    prefix: int  # prefix tokens t
    h: int  # patch grid
    w: int
    rep_grid: Tuple[int, int]  # pooled representative grid (clamped to the patch grid when pooling)
    broadcast: str  # "key", "query" or "transpose"
    extra: str = "none"  # extra representatives: "prefix", "global" or "none" (vit2cbsa.layout)
    own_prefix: bool = False  # prefix tokens that are representatives read back only their own

    @property
    def own_rows(self) -> int:
        """Leading tokens whose broadcast row is one-hot on their own representative."""
        return extra_parts(self.extra, self.prefix)[0] if self.own_prefix else 0


class StepSizes(NamedTuple):
    """Per-head numbers of the forward steps (``H`` each): scale times temperatures, and the steps."""

    t0: torch.Tensor  # s e^a (extraction softmax)
    t1: torch.Tensor  # s e^b (broadcast softmax)
    gamma: Optional[torch.Tensor]  # contraction step (None without contraction)
    kappa: torch.Tensor  # broadcast step


class Steps(NamedTuple):
    """The forward steps of the module docstring (``B x H x rows x cols``)."""

    p: torch.Tensor  # m x d representatives
    pe: torch.Tensor  # t0 P
    a: torch.Tensor  # m x N extraction
    vr: torch.Tensor  # m x d representative values
    kr: Optional[torch.Tensor]  # m x d representative keys (None when neither contraction nor broadcast needs it)
    g: Optional[torch.Tensor]  # m x m contraction attention (None without contraction)
    cc: torch.Tensor  # contracted representatives, before kappa
    c: torch.Tensor  # kappa Cc
    ks: Optional[torch.Tensor]  # t1 Kb (None for "transpose")
    bm: torch.Tensor  # N x m broadcast weights

    @property
    def out(self) -> torch.Tensor:
        return self.bm @ self.c


def _eye_rows(rows: int, like: torch.Tensor) -> torch.Tensor:
    """``B x H x rows x m`` one-hot rows on representatives ``0 .. rows-1`` (``like``: ``B x H x * x m``)."""
    b, nh, m = like.shape[0], like.shape[1], like.shape[3]
    return torch.eye(rows, m, dtype=like.dtype, device=like.device).expand(b, nh, rows, m)


def forward_steps(q, k, v, t0, t1, gamma: Optional[torch.Tensor], kappa, geo: Geometry) -> Steps:
    """The forward steps of the module docstring on ``q, k, v`` (``B x H x N x d``).

    ``t0, t1, gamma, kappa`` hold one number per head (``gamma=None``: no contraction). Differentiable by
    autograd; :class:`ExplicitCBSA` calls it without a graph. With ``geo.own_prefix`` the broadcast rows
    of the prefix tokens that are representatives are one-hot on their own representative (a one-hot
    softmax row has zero gradient, so the hand-written backward needs no other change)."""
    T0, T1, KAP = _per_head(t0), _per_head(t1), _per_head(kappa)
    p = representatives(q, geo.prefix, geo.h, geo.w, geo.rep_grid, geo.extra)
    pe = p * T0
    logits = pe @ k.transpose(-2, -1)
    a = torch.softmax(logits, dim=-1)
    vr = a @ v
    kr = a @ k if geo.broadcast == "key" or gamma is not None else None
    g, cc = None, vr
    if gamma is not None:
        g = torch.softmax(pe @ kr.transpose(-2, -1), dim=-1)
        cc = vr + _per_head(gamma) * (g @ vr)
    c = cc * KAP
    own = geo.own_rows  # the first `own` rows of B are one-hot: not computed
    ks = None
    if geo.broadcast == "transpose":
        # A^T / (A^T 1) as a softmax over representatives of log A: the same numbers, but a token that every
        # representative's softmax rounds to 0 (a logit gap above ~88 in float32) keeps finite values and gradients
        bm = torch.softmax(torch.log_softmax(logits, dim=-1)[:, :, :, own:].transpose(-2, -1), dim=-1)
    else:
        ks = (kr if geo.broadcast == "key" else p) * T1
        bm = torch.softmax(q[:, :, own:] @ ks.transpose(-2, -1), dim=-1)
    if not is_concrete(own) or own:  # traced: however many rows (none: an empty block)
        bm = torch.cat([_eye_rows(own, bm), bm], dim=2)
    return Steps(p, pe, a, vr, kr, g, cc, c, ks, bm)


#: input dtypes the mixers compute in float32 (results come back in the input's dtype): their m x N softmaxes,
#: softmax gradients and per-head sums lose up to 60x the accuracy of the inputs' rounding in these
#: (tests/test_mixed_precision.py)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the mixers compute in for inputs of ``dtype``: float32 for float16 / bfloat16."""
    if dtype == torch.float16 or dtype == torch.bfloat16:  # LOW_PRECISION, written out for TorchScript (a scripted
        return torch.float32  # fx graph compiles this function)
    return dtype


def _up(*tensors):
    return tuple(None if t is None else t.to(compute_dtype(t.dtype)) for t in tensors)


def _without_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _softmax_grad(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch._softmax_backward_data(grad, out, -1, out.dtype)


def _plus_matmul(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``acc + x @ y`` as one batched GEMM (all ``B x H x rows x cols``, heads flattenable)."""
    return torch.baddbmm(acc.flatten(0, 1), x.flatten(0, 1), y.flatten(0, 1)).view(acc.shape)


class ExplicitCBSA(torch.autograd.Function):
    """``out = CBSA(q, k, v)`` (``B x H x N x d``, heads from :func:`flat_heads`), key or query broadcast.

    ``recompute=True`` keeps only ``q, k, v`` for backward (what the original attention keeps) and
    reruns the forward steps there; ``False`` keeps ``A``, ``B`` and the ``m x d`` intermediates."""

    @staticmethod
    def forward(ctx, q, k, v, t0, t1, gamma: Optional[torch.Tensor], kappa, geo: Geometry, recompute: bool):
        ctx.geometry = geo
        # in float32 for half inputs (q, k, v are kept as they came), outside autocast, as the backward recomputes them
        with _without_autocast(q.device.type):
            steps = forward_steps(*_up(q, k, v, t0, t1, gamma, kappa), geo)
            out = steps.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, t0, t1, gamma, kappa, *(() if recompute else steps))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, t0, t1, gamma, kappa, *steps = ctx.saved_tensors
        dtypes = [None if t is None else t.dtype for t in (q, k, v, t0, t1, gamma, kappa)]
        q, k, v, t0, t1, gamma, kappa = _up(q, k, v, t0, t1, gamma, kappa)
        geo = ctx.geometry
        broadcast = geo.broadcast
        if not steps:
            steps = forward_steps(q, k, v, t0, t1, gamma, kappa, geo)
        p, pe, a, vr, kr, g, cc, c, ks, bm = steps
        del steps  # below, each m x N temporary is dropped after its last use
        T0, T1, KAP = _per_head(t0), _per_head(t1), _per_head(kappa)
        kb = kr if broadcast == "key" else p

        def head_sum(x):  # B x H x rows x cols -> per-head total, H
            return x.sum(dim=(0, 2, 3))

        dout = flat_heads(dout.to(q.dtype))
        dc = bm.transpose(-2, -1) @ dout
        dsb = _softmax_grad(dout @ c.transpose(-2, -1), bm)
        del bm
        dq = dsb @ ks
        dks = dsb.transpose(-2, -1) @ q
        del dsb
        dt1 = head_sum(dks * kb)
        dkb = dks * T1
        dkappa = head_sum(dc * cc)
        dcc = dc * KAP
        dvr, dkr, dpe, dgamma = dcc, None, None, None
        if g is not None:
            GAM = _per_head(gamma)
            gtd = g.transpose(-2, -1) @ dcc
            dgamma = head_sum(gtd * vr)
            dvr = torch.addcmul(dcc, gtd, GAM)
            dsg = _softmax_grad((dcc * GAM) @ vr.transpose(-2, -1), g)
            dpe = dsg @ kr
            dkr = dsg.transpose(-2, -1) @ pe
        if broadcast == "key":
            dkr = dkb if dkr is None else dkr + dkb
        da = dvr @ v.transpose(-2, -1)
        if dkr is not None:
            da = _plus_matmul(da, dkr, k.transpose(-2, -1))
        dv = a.transpose(-2, -1) @ dvr
        dsa = _softmax_grad(da, a)
        del da
        dk = dsa.transpose(-2, -1) @ pe
        if dkr is not None:
            dk = _plus_matmul(dk, a.transpose(-2, -1), dkr)
        del a
        dpe = dsa @ k if dpe is None else _plus_matmul(dpe, dsa, k)
        del dsa
        dt0 = head_sum(dpe * p)
        dp = dpe * T0
        if broadcast != "key":
            dp = dp + dkb
        representatives_adjoint_(dq, dp, geo.prefix, geo.h, geo.w, geo.rep_grid, geo.extra)
        grads = (dq, dk, dv, dt0, dt1, dgamma, dkappa)
        return (*(None if g is None else g.to(dt) for g, dt in zip(grads, dtypes)), None, None)
