"""CBSA with ``A`` and ``B`` materialised and a hand-derived backward pass (inference and small N).

Forward, per head (``t0 = s e^a``, ``t1 = s e^b``: scale times temperatures; ``q`` is ``N x d``)::

    P  = pool(q[t:])            Pe = t0 P                                   m x d
    A  = softmax(Pe k^T)        Kr = A k,  Vr = A v                         m x N,  m x d
    G  = softmax(Pe Kr^T)       Cc = Vr + gamma G Vr    (Cc = Vr without contraction)
    C  = kappa Cc               Kb = Kr (broadcast="key") or P ("query"),   Ks = t1 Kb
    Bm = softmax(q Ks^T)        out = Bm C                                  N x m,  N x d

Backward, for the upstream gradient ``dO`` (``softmax'(S, dS) = S * (dS - rowsum(dS * S))``)::

    dC  = Bm^T dO               dBm = dO C^T          dSb = softmax'(Bm, dBm)
    dq  = dSb Ks                dKs = dSb^T q         dt1 = <dKs, Kb>     dKb = t1 dKs
    dkappa = <dC, Cc>           dCc = kappa dC
    contraction:  dgamma = <G^T dCc, Vr>              dVr = dCc + gamma G^T dCc
                  dSg = softmax'(G, gamma dCc Vr^T)   dPe = dSg Kr        dKr = dSg^T Pe
    dKr += dKb (key)            dA  = dVr v^T + dKr k^T
    dv  = A^T dVr               dk  = A^T dKr + dSa^T Pe,   dSa = softmax'(A, dA)
    dPe += dSa k                dt0 = <dPe, P>        dP = t0 dPe (+ dKb for "query")
    dq[t:] += pool^T(dP)

(``<X, Y>`` sums the elementwise product per head.) Autograd through the same forward records
about twice as many nodes (broadcast parameter products, expands of the pooling matrix,
reshape copies of strided heads, each with its own backward); at ``N`` of a few hundred the mixer
is dominated by that overhead, not by FLOPs. All matmuls run on ``(B H) x rows x cols`` tensors:
heads that cannot be flattened to one batch dimension (batch > 1 of strided views) are copied
once here instead of once per matmul.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..layout import pool_patches, pool_patches_adjoint


def _without_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _softmax_grad(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch._softmax_backward_data(grad, out, -1, out.dtype)


def _steps(q, k, v, T0, T1, GAM, KAP, prefix: int, h: int, w: int, rep_grid: Tuple[int, int],
           key_broadcast: bool):
    """Forward up to ``B`` (all ``(B H) x rows x cols``): ``P, Pe, A, Vr, Kr, G, Cc, C, Ks, Bm``."""
    p = pool_patches(q.unsqueeze(0), prefix, h, w, rep_grid).squeeze(0)
    pe = p * T0
    a = torch.softmax(torch.bmm(pe, k.transpose(1, 2)), dim=-1)
    vr = torch.bmm(a, v)
    kr = torch.bmm(a, k) if key_broadcast or GAM is not None else None
    g = None
    cc = vr
    if GAM is not None:
        g = torch.softmax(torch.bmm(pe, kr.transpose(1, 2)), dim=-1)
        cc = torch.baddbmm(vr, g * GAM, vr)
    c = cc * KAP
    ks = (kr if key_broadcast else p) * T1
    bm = torch.softmax(torch.bmm(q, ks.transpose(1, 2)), dim=-1)
    return p, pe, a, vr, kr, g, cc, c, ks, bm


class ExplicitCBSA(torch.autograd.Function):
    """``out = CBSA(q, k, v)`` (``B x H x N x d``) with the equations of the module docstring.

    ``recompute=True`` keeps only ``q, k, v`` for backward (what the original attention keeps) and
    reruns the forward steps there; ``False`` keeps ``A``, ``B`` and the ``m x d`` intermediates."""

    @staticmethod
    def forward(ctx, q, k, v, t0, t1, gamma: Optional[torch.Tensor], kappa, prefix: int, h: int, w: int,
                rep_grid: Tuple[int, int], key_broadcast: bool, recompute: bool):
        b, nh, n, d = q.shape
        q, k, v = (x.reshape(b * nh, n, d) for x in (q, k, v))
        ctx.geometry = (b, nh, prefix, h, w, rep_grid, key_broadcast)
        per_head = [None if x is None else x.repeat(b).view(b * nh, 1, 1) for x in (t0, t1, gamma, kappa)]
        # in q's dtype throughout, as the backward (which runs outside autocast) recomputes them
        with _without_autocast(q.device.type):
            steps = _steps(q, k, v, *per_head, prefix, h, w, rep_grid, key_broadcast)
            out = torch.bmm(steps[9], steps[7])  # B C
        ctx.save_for_backward(q, k, v, *per_head, *(() if recompute else steps))
        return out.view(b, nh, n, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, T0, T1, GAM, KAP, *steps = ctx.saved_tensors
        b, nh, prefix, h, w, rep_grid, key_broadcast = ctx.geometry
        n, d = q.shape[-2:]
        if not steps:
            steps = _steps(q, k, v, T0, T1, GAM, KAP, prefix, h, w, rep_grid, key_broadcast)
        p, pe, a, vr, kr, g, cc, c, ks, bm = steps
        del steps  # below, each m x N temporary is dropped after its last use
        kb = kr if key_broadcast else p

        def head_sum(x):  # (B H) x rows x cols -> per-head total, H
            return x.sum(dim=(1, 2)).view(b, nh).sum(0)

        dout = grad_out.reshape(b * nh, n, d)
        dc = torch.bmm(bm.transpose(1, 2), dout)
        dsb = _softmax_grad(torch.bmm(dout, c.transpose(1, 2)), bm)
        del bm
        dq = torch.bmm(dsb, ks)
        dks = torch.bmm(dsb.transpose(1, 2), q)
        del dsb
        dt1 = head_sum(dks * kb)
        dkb = dks * T1
        dkappa = head_sum(dc * cc)
        dcc = dc * KAP
        dvr, dkr, dpe, dgamma = dcc, None, None, None
        if g is not None:
            gtd = torch.bmm(g.transpose(1, 2), dcc)
            dgamma = head_sum(gtd * vr)
            dvr = torch.addcmul(dcc, gtd, GAM)
            dsg = _softmax_grad(torch.bmm(dcc * GAM, vr.transpose(1, 2)), g)
            dpe = torch.bmm(dsg, kr)
            dkr = torch.bmm(dsg.transpose(1, 2), pe)
        if key_broadcast:
            dkr = dkb if dkr is None else dkr + dkb
        da = torch.bmm(dvr, v.transpose(1, 2))
        if dkr is not None:
            da = torch.baddbmm(da, dkr, k.transpose(1, 2))
        dv = torch.bmm(a.transpose(1, 2), dvr)
        dsa = _softmax_grad(da, a)
        del da
        dk = torch.bmm(dsa.transpose(1, 2), pe)
        if dkr is not None:
            dk = torch.baddbmm(dk, a.transpose(1, 2), dkr)
        del a
        dpe = torch.bmm(dsa, k) if dpe is None else torch.baddbmm(dpe, dsa, k)
        del dsa
        dt0 = head_sum(dpe * p)
        dp = dpe * T0
        if not key_broadcast:
            dp = dp + dkb
        dq[:, prefix:] += pool_patches_adjoint(dp.unsqueeze(0), h, w, rep_grid).squeeze(0)
        shape = (b, nh, n, d)
        return (dq.view(shape), dk.view(shape), dv.view(shape), dt0, dt1, dgamma, dkappa,
                None, None, None, None, None, None)
