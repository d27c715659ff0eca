"""Robustness to parameter perturbation (paper Fig. 8): accuracy as Gaussian noise is added to attention.

For every attention layer (original or converted), the weight matrices of its query, key, value
and output projections get i.i.d. Gaussian noise of standard deviation ``scale * rms(W)``
(``rms(W) = ||W||_F / sqrt(numel)``), i.e. noise whose Frobenius norm is about ``scale * ||W||_F``.
A fused timm ``qkv`` weight is treated as its three ``q``, ``k``, ``v`` blocks, each with its own
RMS, as separate Linears are. Biases, norms and the parameters a conversion adds (step sizes,
temperatures, feature maps) are not perturbed, so an original model and its conversion receive
*exactly the same* noise: it is drawn from a generator seeded by ``(seed, parameter name)`` and
converted layers keep the pretrained parameter names.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..adapters import projection_modules
from ..errors import UnsupportedModelError

def attention_projection_weights(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, weight)`` of the q/k/v/output projection Linears of every attention layer, in block order (the
    projections each family's adapter names: :func:`vit2cbsa.adapters.projection_modules`)."""
    out = [(f"{name}.weight", lin.weight) for name, lin in projection_modules(model)]
    if not out:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention projection that vit2cbsa recognises")
    return out


def _noise_like(name: str, weight: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    noise = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    w = weight.detach().to(torch.float64).cpu()
    blocks = 3 if name.endswith("qkv.weight") and w.shape[0] % 3 == 0 else 1
    rms = torch.cat([b.pow(2).mean().sqrt().expand(b.shape[0]) for b in w.chunk(blocks, dim=0)])
    return (noise * (scale * rms).view(-1, *([1] * (w.dim() - 1)))).to(weight.dtype).to(weight.device)


@contextlib.contextmanager
def perturbed(model: nn.Module, scale: float, seed: int = 0) -> Iterator[nn.Module]:
    """Within the block, ``model``'s attention projection weights carry relative Gaussian noise ``scale``;
    the original weights are restored on exit (also on error)."""
    params = attention_projection_weights(model)
    saved = [p.detach().clone() for _, p in params]
    try:
        with torch.no_grad():
            if scale:
                for name, p in params:
                    p.add_(_noise_like(name, p, scale, seed))
        yield model
    finally:
        with torch.no_grad():
            for (_, p), s in zip(params, saved):
                p.copy_(s)


@torch.no_grad()
def robustness_curve(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 250,
) -> Dict[str, object]:
    """Top-1 accuracy of ``model`` on preprocessed ``images`` for each relative noise ``scale``.

    Returns ``{"scales", "seeds", "accuracy" (per scale, per seed), "mean", "std"}``; the clean
    accuracy (``scale = 0``) is computed once and repeated across seeds.
    """
    from ..measure import accuracy

    acc: List[List[float]] = []
    for scale in scales:
        row = []
        for seed in seeds:
            if not scale and row:
                row.append(row[0])
                continue
            with perturbed(model, scale, seed):
                row.append(accuracy(model, images, labels, batch_size))
        acc.append(row)
    t = torch.tensor(acc, dtype=torch.float64)
    return {"scales": [float(s) for s in scales], "seeds": [int(s) for s in seeds], "accuracy": acc,
            "mean": t.mean(1).tolist(), "std": (t.std(1, unbiased=False)).tolist()}


def plot_robustness(results: Dict[str, Dict[str, object]], path, title: Optional[str] = None):
    """Accuracy (mean +- std over seeds) vs relative noise scale, one line per model; saved as PNG."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, res in results.items():
        x = res["scales"]
        mean = torch.tensor(res["mean"])
        std = torch.tensor(res["std"])
        ax.plot(x, (100 * mean).tolist(), marker="o", ms=3, label=label)
        ax.fill_between(x, (100 * (mean - std)).tolist(), (100 * (mean + std)).tolist(), alpha=0.2)
    ax.set_xlabel("relative noise scale on attention projections (std / rms(W))")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
