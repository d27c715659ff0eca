"""Compression on synthetic data (paper Fig. 4): the parameter-free linear variant of CBSA, iterated.

Tokens are drawn from a union of ``K`` random ``d``-dimensional subspaces of ``R^D`` (class ``j``:
``x = U_j z + noise``, then scaled to unit norm). One step of the parameter-free linear variant
acts on each group of tokens ``X_j`` (``N_j x D``; the groups are the classes, given, as in the
compression term of MCR^2 -- this illustrates the contraction, not clustering)::

    representatives   V, lambda = eigh(X_j^T X_j)        principal directions of the group (orthogonal)
    coefficients      X_j V                               (N_j x D)
    contract          f(lambda) = 1 / (1 + c lambda),  c = D / (N_j eps^2)
    broadcast         dX_j = -step * (X_j V) diag(f(lambda)) V^T
    normalise         x <- x / ||x||                      (the role LayerNorm plays in a transformer)

``dX_j = -(step / c) grad R(X_j)`` exactly (``grad R(W) = c W (I + c W^T W)^{-1}``): a gradient step
on the group's coding rate, in which directions of small variance (noise off the class's
subspace) shrink by up to ``1 - step`` while well-populated directions are barely touched.
Iterated, every class is compressed toward its own subspace: its coding rate falls and the
fraction of its energy outside its subspace goes to zero. No parameter is learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .coding_rate import coding_rate


def union_of_subspaces(num_classes: int = 3, dim: int = 3, subspace_dim: int = 2, per_class: int = 150,
                       noise: float = 0.3, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X N x D unit-norm float64, labels N, bases K x D x d orthonormal)``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    bases = torch.linalg.qr(torch.randn(num_classes, dim, subspace_dim, generator=gen, dtype=torch.float64)).Q
    z = torch.randn(num_classes, per_class, subspace_dim, generator=gen, dtype=torch.float64)
    x = z @ bases.transpose(1, 2)  # K x n x D
    x = x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64) / dim ** 0.5 * subspace_dim ** 0.5
    x = x.reshape(-1, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return x / x.norm(dim=-1, keepdim=True), labels, bases


def linear_cbsa_update(x: torch.Tensor, eps: float = 0.5, step: float = 0.5) -> torch.Tensor:
    """The update ``dX = -step (X V) diag(1 / (1 + c lambda)) V^T`` of one group ``x`` (``N x D``)."""
    n, dim = x.shape
    c = dim / (n * eps ** 2)
    lam, vecs = torch.linalg.eigh(x.transpose(0, 1) @ x)  # representatives: principal directions
    coeff = x @ vecs  # N x D
    contracted = coeff / (1.0 + c * lam.clamp_min(0))  # contraction on the eigenvalues
    return -step * contracted @ vecs.transpose(0, 1)  # broadcast back


def linear_cbsa_step(x: torch.Tensor, labels: Optional[torch.Tensor] = None, eps: float = 0.5,
                     step: float = 0.5, normalize: bool = True) -> torch.Tensor:
    """One step on every group (``labels``; ``None``: all tokens are one group), then unit-norm tokens."""
    x = x.to(torch.float64)
    out = x.clone()
    groups = [slice(None)] if labels is None else [labels == j for j in labels.unique()]
    for g in groups:
        out[g] = x[g] + linear_cbsa_update(x[g], eps, step)
    if normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def off_subspace_energy(x: torch.Tensor, labels: torch.Tensor, bases: torch.Tensor) -> float:
    """Mean over tokens of ``||x - U_j U_j^T x||^2 / ||x||^2`` (``j``: the token's class)."""
    u = bases[labels]  # N x D x d
    proj = (u @ (u.transpose(1, 2) @ x.unsqueeze(-1))).squeeze(-1)
    return ((x - proj).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()


def class_rates(x: torch.Tensor, labels: torch.Tensor, eps: float = 0.5) -> torch.Tensor:
    """``R(X_j)`` of every class (its tokens alone), float64 ``(K,)``."""
    return torch.stack([coding_rate(x[labels == j], eps) for j in labels.unique()])


def compress_synthetic(x: torch.Tensor, labels: torch.Tensor, bases: torch.Tensor, steps: int = 12,
                       eps: float = 0.5, step: float = 0.5, snapshots: Sequence[int] = (0, 2, 12)) -> Dict[str, object]:
    """Iterate :func:`linear_cbsa_step`; record per step the classes' coding rate ``sum_j R(X_j)``, the
    rate of all tokens ``R(X)``, the rate reduction ``R(X) - sum_j (N_j / N) R(X_j)`` (MCR^2: large when
    the classes are compact and apart) and the off-subspace energy, plus token snapshots."""
    record: Dict[str, object] = {"steps": list(range(steps + 1)), "class_rate": [], "total_rate": [],
                                 "rate_reduction": [], "off_subspace_energy": [], "snapshots": {}}
    weights = torch.stack([(labels == j).sum() for j in labels.unique()]).to(torch.float64) / len(labels)
    for t in range(steps + 1):
        if t:
            x = linear_cbsa_step(x, labels, eps, step)
        per_class = class_rates(x, labels, eps)
        record["class_rate"].append(per_class.sum().item())
        record["total_rate"].append(coding_rate(x, eps).item())
        record["rate_reduction"].append(record["total_rate"][-1] - (weights * per_class).sum().item())
        record["off_subspace_energy"].append(off_subspace_energy(x, labels, bases))
        if t in snapshots:
            record["snapshots"][t] = x.clone()
    record["final"] = x
    return record


def plot_synthetic(record: Dict[str, object], labels: torch.Tensor, path: Union[str, Path],
                   title: Optional[str] = None, bases: Optional[torch.Tensor] = None) -> Path:
    """Snapshots of 3-D tokens (first three coordinates) and the rate / off-subspace curves; saved as PNG.
    With ``bases`` of 1-D subspaces, each class's line is drawn through the origin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    snaps = record["snapshots"]
    fig = Figure(figsize=(3.0 * (len(snaps) + 1), 3.2), dpi=110)
    FigureCanvasAgg(fig)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (t, x) in enumerate(sorted(snaps.items())):
        ax = fig.add_subplot(1, len(snaps) + 1, i + 1, projection="3d")
        for j in labels.unique().tolist():
            pts = x[labels == j]
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=3, color=colors[j % len(colors)], depthshade=False)
            if bases is not None and bases.shape[-1] == 1:
                u = bases[j, :3, 0] * 1.15
                ax.plot([-u[0], u[0]], [-u[1], u[1]], [-u[2], u[2]], color=colors[j % len(colors)], lw=0.8, alpha=0.7)
        k = record["steps"].index(t)
        ax.set_title(f"step {t}: sum_j R(X_j)={record['class_rate'][k]:.2f}\n"
                     f"off-subspace {100 * record['off_subspace_energy'][k]:.1f}%", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.view_init(elev=20, azim=35)
    ax = fig.add_subplot(1, len(snaps) + 1, len(snaps) + 1)
    ax.plot(record["steps"], record["class_rate"], marker="o", ms=3, label="sum_j R(X_j) (per class)")
    ax.plot(record["steps"], record["total_rate"], marker="s", ms=3, label="R(X) (all tokens)")
    ax.plot(record["steps"], record["rate_reduction"], marker="^", ms=3, label="rate reduction")
    ax.set_xlabel("step")
    ax.set_ylabel("coding rate (nats)")
    ax2 = ax.twinx()
    ax2.plot(record["steps"], [100 * e for e in record["off_subspace_energy"]], color="tab:red", ls="--",
             label="off-subspace energy (%)")
    ax2.set_ylabel("off-subspace energy (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6, loc="center right")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
