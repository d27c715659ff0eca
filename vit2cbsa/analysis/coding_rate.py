"""Coding rates of the tokens entering each attention layer, and of a converted layer's representatives.

The lossy coding rate of ``N`` tokens ``W`` (``N x p``, tokens are rows) at precision ``eps`` is::

    R(W) = 1/2 logdet(I_p + p / (N eps^2) W^T W)          (= 1/2 logdet(I_N + p / (N eps^2) W W^T))

and the compression term of MCR^2 / CBSA is ``sum_k R(X U_k)`` over the heads' subspaces ``U_k``
(``D x p``). It is what a CBSA layer lowers: the lower it is, the more the tokens of a layer
are compressed toward the heads' subspaces (paper Figs. 5-6).

Numerics: everything is computed in float64 on the smaller Gram matrix (``p x p`` or ``N x N``,
whichever is smaller, by Sylvester's identity), and ``logdet`` of the symmetric positive
definite ``I + c G`` comes from a batched Cholesky factor (``2 sum log diag L``), with
``slogdet`` as the fallback for any matrix the factorisation rejects.

Subspaces of a pretrained layer. A pretrained (or converted) softmax layer has no single
``U_k`` per head but separate query, key and value projections. We use the columns of the
head's **value** projection (``basis="value"``; ``"query"`` and ``"key"`` are available) as
its subspace, orthonormalised by a QR factorisation (``orthonormalize=True``, the default), so
that ``X U_k`` are the coordinates of the tokens in the span the head reads its values from,
and the rate measures the tokens' geometry rather than the scale of the projection weights.
Biases are left out (the coding rate is not centred). Value columns are the natural choice:
the value projection is the one whose outputs the attention mixes, as ``U_k`` is in MSSA/CBSA
where query = key = value = ``X U_k``.

Normalised variant (``normalize=True``): the rows of ``X U_k`` are scaled to unit norm before
the rate is taken, so the term depends only on the directions of the tokens within each
subspace (bounded, and comparable across layers whose token norms differ).

Representatives of a converted layer whose mixer has them (``Mixer.uses_representatives``): with the
extraction coefficients ``A`` (``m x N`` per head, :meth:`Mixer.maps <vit2cbsa.attention.Mixer.maps>`),
the representatives in the same subspace
are ``A (X U_k)`` (the paper's ``Q_k = W^T C_k``), and their rate is ``R`` with ``N = m``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

BASES = ("value", "query", "key")


def logdet_spd(m: torch.Tensor) -> torch.Tensor:
    """``log det`` of a batch of symmetric positive definite matrices (``... x n x n``).

    Cholesky (``2 sum log diag L``) where it succeeds, ``slogdet`` for the rest.
    """
    chol, info = torch.linalg.cholesky_ex(m)
    out = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    bad = info != 0
    if bad.any():
        sign, ld = torch.linalg.slogdet(m[bad])
        out = out.clone()
        out[bad] = torch.where(sign > 0, ld, torch.full_like(ld, float("nan")))
    return out


def coding_rate(w: torch.Tensor, eps: float = 0.5, normalize: bool = False) -> torch.Tensor:
    """``R(W) = 1/2 logdet(I + p/(N eps^2) W^T W)`` for ``W`` of shape ``(..., N, p)``; returns ``(...)``.

    Computed in float64 (the result is float64). ``normalize=True`` scales every row (token)
    to unit norm first (zero rows stay zero).
    """
    if w.dim() < 2:
        raise ValueError(f"coding_rate expects tokens of shape (..., N, p), got {tuple(w.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    w = w.detach().to(torch.float64)
    n, p = w.shape[-2], w.shape[-1]
    if n == 0 or p == 0:
        raise ValueError(f"coding_rate needs at least one token and one dimension, got {tuple(w.shape)}")
    if normalize:
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    c = p / (n * eps ** 2)
    gram = w.transpose(-2, -1) @ w if p <= n else w @ w.transpose(-2, -1)
    size = gram.shape[-1]
    eye = torch.eye(size, dtype=torch.float64, device=w.device)
    return 0.5 * logdet_spd(eye + c * gram)


# --------------------------------------------------------------------------- subspaces of a layer


def projection_weight(module: nn.Module, which: str = "value") -> torch.Tensor:
    """The ``(H d) x D`` weight of ``module``'s query, key or value projection (timm fused ``qkv`` or HF
    ``q_proj``/``k_proj``/``v_proj``); works on original and converted attention modules alike."""
    if which not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {which!r}")
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear):  # timm: rows [q | k | v]
        return qkv.weight.chunk(3, dim=0)[{"query": 0, "key": 1, "value": 2}[which]]
    proj = getattr(module, {"query": "q_proj", "key": "k_proj", "value": "v_proj"}[which], None)
    if isinstance(proj, nn.Linear):
        return proj.weight
    raise TypeError(f"{type(module).__name__} has neither a fused qkv Linear nor q_proj/k_proj/v_proj Linears")


def head_bases(module: nn.Module, num_heads: Optional[int] = None, which: str = "value",
               orthonormalize: bool = True) -> torch.Tensor:
    """Per-head subspace bases ``U_k`` of an attention module: ``(H, D, d)`` float64.

    ``U_k`` are the columns (in row-major notation, ``X U_k`` = the head's projection without bias)
    of the head's ``which`` projection; ``orthonormalize`` replaces them by an orthonormal basis
    of their span (reduced QR).
    """
    weight = projection_weight(module, which).detach().to(torch.float64)  # (H d) x D
    heads = num_heads or getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
    if heads is None and getattr(module, "config", None) is not None:
        heads = module.config.num_attention_heads
    if not heads:
        raise ValueError(f"cannot tell the number of heads of {type(module).__name__}; pass num_heads")
    out_dim, dim = weight.shape
    if out_dim % heads:
        raise ValueError(f"projection width {out_dim} is not divisible by {heads} heads")
    bases = weight.view(heads, out_dim // heads, dim).transpose(1, 2)  # H x D x d
    if orthonormalize:
        bases = torch.linalg.qr(bases, mode="reduced").Q
    return bases.contiguous()


def project_heads(x: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Tokens ``x`` (``B x N x D``) in every head's subspace: ``(B, H, N, d)`` float64."""
    return torch.einsum("bnD,hDd->bhnd", x.detach().to(torch.float64), bases.to(torch.float64))


def compression_term(x: torch.Tensor, bases: torch.Tensor, eps: float = 0.5, normalize: bool = False,
                     per_head: bool = False) -> torch.Tensor:
    """``sum_k R(X U_k)`` per sample for tokens ``x`` (``B x N x D``) and bases ``(H, D, d)``.

    Returns ``(B,)`` (or ``(B, H)`` with ``per_head=True``), float64.
    """
    rates = coding_rate(project_heads(x, bases), eps, normalize)  # B x H
    return rates if per_head else rates.sum(-1)


def representative_rate(a: torch.Tensor, x: torch.Tensor, bases: torch.Tensor, eps: float = 0.5,
                        normalize: bool = False, per_head: bool = False) -> torch.Tensor:
    """``sum_k R(A_k X U_k)``: the coding rate of the representatives extracted by ``a``
    (``B x H x m x N``) from tokens ``x`` (``B x N x D``), in the same subspaces. ``(B,)`` or ``(B, H)``."""
    reps = a.detach().to(torch.float64) @ project_heads(x, bases)  # B H m d
    rates = coding_rate(reps, eps, normalize)
    return rates if per_head else rates.sum(-1)


# --------------------------------------------------------------------------- per-layer curves


@torch.no_grad()
def layer_coding_rates(
    model: nn.Module,
    images: torch.Tensor,
    *,
    eps: float = 0.5,
    basis: str = "value",
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 64,
) -> List[Dict[str, object]]:
    """Compression term of the tokens entering every attention layer (and of the representatives of
    converted layers whose mixer has them), averaged over ``images`` (preprocessed, ``B x 3 x H x W``).

    One dict per layer, in block order: ``index``, ``name``, ``kind`` (``softmax`` or the mixer's variant
    name), ``tokens`` / ``tokens_normalized`` (``sum_k R(X U_k)``, mean over images), ``tokens_per_head``,
    and for representative layers ``representatives`` / ``representatives_normalized`` (``sum_k R(A_k X U_k)``,
    ``None`` otherwise) and ``num_representatives``. Inputs are captured with hooks, ``batch_size`` images
    at a time.
    """
    from .capture import AttentionCapture

    sums: Dict[int, Dict[str, object]] = {}
    count = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        with AttentionCapture(model, layers) as cap:
            cap.run(batch)
        for rec in cap.records:
            bases = head_bases(rec.module, rec.num_heads, basis)
            x = rec.x
            tok = compression_term(x, bases, eps, per_head=True)
            tok_n = compression_term(x, bases, eps, normalize=True, per_head=True)
            entry = sums.setdefault(rec.index, {
                "index": rec.index, "name": rec.name, "kind": rec.kind,
                "tokens": 0.0, "tokens_normalized": 0.0, "tokens_per_head": torch.zeros(len(bases), dtype=torch.float64),
                "representatives": None, "representatives_normalized": None, "num_representatives": None,
            })
            entry["tokens"] += tok.sum().item()
            entry["tokens_normalized"] += tok_n.sum().item()
            entry["tokens_per_head"] += tok.sum(0)
            if getattr(rec.mixer, "uses_representatives", False):
                maps = rec.mixer.maps(rec.q, rec.k, None, rec.layout)
                rep = representative_rate(maps.A, x, bases, eps)
                rep_n = representative_rate(maps.A, x, bases, eps, normalize=True)
                entry["representatives"] = (entry["representatives"] or 0.0) + rep.sum().item()
                entry["representatives_normalized"] = (entry["representatives_normalized"] or 0.0) + rep_n.sum().item()
                entry["num_representatives"] = int(maps.A.shape[-2])
        count += len(batch)
    out = []
    for index in sorted(sums):
        e = sums[index]
        for key in ("tokens", "tokens_normalized", "representatives", "representatives_normalized"):
            if e[key] is not None:
                e[key] = e[key] / count
        e["tokens_per_head"] = (e["tokens_per_head"] / count).tolist()
        out.append(e)
    return out
