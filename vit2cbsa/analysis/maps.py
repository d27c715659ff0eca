"""Attention maps of original and converted layers, recomputed from captured ``q, k, v`` by the mixer itself.

Every converted layer's mixer is one linear operator on the values, ``out = kappa E V``
(:class:`~vit2cbsa.attention.Mixer`), and an original layer's is ``E = softmax(s Q K^T)``.
:func:`attention_operator` returns ``E`` (``N x N``) of any captured layer: the original's softmax, or
the mixer's own :meth:`~vit2cbsa.attention.Mixer.operator`, built on the forward steps it runs. For a
representative variant (CBSA, :mod:`vit2cbsa.attention.cbsa`), :func:`cbsa_maps` returns those steps,
:meth:`~vit2cbsa.attention.Mixer.maps` on the ``q, k, v`` the mixer received::

    P   = [Q[:t]; pool(Q[t:])]               pooled queries (m x d) and the extra representatives
    A   = softmax(s e^a P K^T)               representative <- token: which tokens each representative gathers
    S   = softmax(s e^a P K_r^T)             contraction among representatives (m x m), K_r = A K
    C   = (I + gamma S) A V                  contracted representatives
    B   = softmax(s e^b Q K_r^T)             token <- representative (broadcast="key");
          softmax(s e^b Q P^T) ("query"),  A^T / A^T 1 ("transpose"); one-hot rows for prefix tokens
          that read only their own representative
    out = kappa B C                          = the mixer's output

so ``E = B (I + gamma S) A`` (row-stochastic when ``gamma = 0``); linear attention's ``E`` is its
normalised kernel matrix. The class-token row of ``E`` is the map compared with the original model's
class-token attention. :func:`layer_maps` puts one layer's maps of one image on the patch grid
(:class:`LayerMaps`), :func:`explain` does it for a model's selected layers; the figure is drawn by
:mod:`vit2cbsa.analysis.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..attention import CBSAMaps, Mixer
from ..errors import UnsupportedModelError
from ..layout import TokenLayout
from .capture import AttentionCapture, LayerRecord, LayerSpec

#: attribute set by :func:`mark_random_weights` on a model whose weights are random (untrained)
RANDOM_WEIGHTS_ATTR = "vit2cbsa_random_weights"
#: an original layer in plain words, and its operator
SOFTMAX_DESCRIPTION, SOFTMAX_FORMULA = "softmax attention", "softmax(s q K^T)"


def _as_mixer(mixer: nn.Module) -> Mixer:
    if not isinstance(mixer, Mixer):
        raise UnsupportedModelError(f"{type(mixer).__name__} is not a vit2cbsa.attention.Mixer, so it has no maps")
    return mixer


def cbsa_maps(mixer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
              grid: Union[Tuple[int, int], TokenLayout]) -> CBSAMaps:
    """``A``, ``B`` (and ``S``, ``C``, the output) of a representative mixer, from its own forward steps.

    Args:
        mixer: a mixer with ``uses_representatives`` (:class:`~vit2cbsa.attention.CBSAMixer`, ...); any other
            raises :class:`~vit2cbsa.errors.UnsupportedModelError` (a ``TypeError``).
        q, k, v: ``B x H x N x d`` as the mixer received them (``v`` may be ``None``: no ``C``/output).
        grid: the patch grid ``(h, w)`` of the input (or a :class:`~vit2cbsa.layout.TokenLayout`).
    """
    layout = grid if isinstance(grid, TokenLayout) else TokenLayout(tuple(grid))
    with torch.no_grad():
        return _as_mixer(mixer).maps(q, k, v, layout)


def _operator(rec: LayerRecord, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if not rec.converted:
        return torch.softmax((q @ k.transpose(-2, -1)) * rec.scale, dim=-1)
    with torch.no_grad():
        return _as_mixer(rec.mixer).operator(q, k, rec.layout)


def attention_operator(rec: LayerRecord) -> torch.Tensor:
    """The token-to-token operator ``E`` (``B x H x N x N``) of a captured layer, such that the layer's
    context is ``E V`` (an original softmax layer) or ``kappa E V`` (a converted layer:
    :meth:`Mixer.operator <vit2cbsa.attention.Mixer.operator>`, e.g. ``E = B (I + gamma S) A`` for CBSA,
    the normalised kernel matrix for linear attention)."""
    q, k, _ = rec.qkv()
    return _operator(rec, q, k)


# --------------------------------------------------------------------------- per-layer maps on the grid


@dataclass
class LayerMaps:
    """Maps of one layer for one image, on the patch grid (``h x w``), per head."""

    index: int
    name: str
    kind: str  # "softmax" or the mixer's variant name
    grid: Tuple[int, int]
    prefix: int
    cls: np.ndarray  # H x h x w: class-token row of E over the patches (mean over tokens if no prefix)
    gather: Optional[np.ndarray] = None  # H x m x h x w: A restricted to the patches
    broadcast: Optional[np.ndarray] = None  # H x h x w x m: B of the patch tokens
    cls_broadcast: Optional[np.ndarray] = None  # H x m: B of the class token (mean over tokens if no prefix)
    rep_grid: Optional[Tuple[int, int]] = None
    lead: int = 0  # representatives 0 .. lead-1 are prefix tokens
    has_global: bool = False  # the last representative is the global one
    random_weights: bool = False  # the model's weights are random (:func:`mark_random_weights`)
    converted: bool = False  # a converted layer (else an original softmax one)
    description: str = ""  # the layer's attention in plain words (Mixer.description)
    formula: str = "E"  # its operator E in the paper's notation (Mixer.formula)

    def rep_name(self, i: int) -> str:
        """``"cls"``/``"prefix j"``, ``"global"`` or ``"r{row},{col}"`` (pooling window) for representative ``i``."""
        if i < self.lead:
            return "cls" if i == 0 else f"prefix {i}"
        if self.has_global and i == self.gather.shape[1] - 1:
            return "global"
        row, col = divmod(i - self.lead, self.rep_grid[1])
        return f"r{row},{col}"

    @property
    def num_heads(self) -> int:
        return self.cls.shape[0]

    @property
    def has_representatives(self) -> bool:
        """Whether the layer mixes through representatives (``gather``, ``broadcast`` are set)."""
        return self.gather is not None


def _first_row(e: torch.Tensor, prefix: int) -> torch.Tensor:
    """Row of the first prefix token (``... x N x M -> ... x M``), or the mean over all rows without one."""
    return e[..., 0, :] if prefix > 0 else e.mean(dim=-2)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


def layer_maps(rec: LayerRecord, image: int = 0) -> LayerMaps:
    """The maps of one captured layer for image ``image`` of the batch."""
    (h, w), t = rec.grid, rec.prefix
    q, k, _ = (x[image:image + 1] for x in rec.qkv())
    mixer = rec.mixer
    if mixer is None:
        words = dict(description=SOFTMAX_DESCRIPTION, formula=SOFTMAX_FORMULA)
    else:
        words = dict(converted=True, description=getattr(mixer, "description", "") or rec.kind,
                     formula=getattr(mixer, "formula", "E"))
    if getattr(mixer, "uses_representatives", False):
        maps = cbsa_maps(mixer, q, k, None, rec.layout)
        e, b, a = maps.operator()[0], maps.B[0], maps.A[0]
        nh, m = a.shape[0], a.shape[1]
        return LayerMaps(
            rec.index, rec.name, rec.kind, (h, w), t,
            cls=_numpy(_first_row(e, t)[:, t:].reshape(nh, h, w)),
            gather=_numpy(a[:, :, t:].reshape(nh, m, h, w)),
            broadcast=_numpy(b[:, t:, :].reshape(nh, h, w, m)),
            cls_broadcast=_numpy(_first_row(b, t)),
            rep_grid=maps.rep_grid, lead=maps.lead, has_global=maps.has_global, **words,
        )
    e = _operator(rec, q, k)[0]
    return LayerMaps(rec.index, rec.name, rec.kind, (h, w), t, cls=_numpy(_first_row(e, t)[:, t:].reshape(-1, h, w)),
                     **words)


def mark_random_weights(model: nn.Module, random: bool = True) -> nn.Module:
    """Record on ``model`` that its weights are random (untrained); :func:`explain` passes it on to the maps,
    and :func:`~vit2cbsa.analysis.figures.plot_explanation` writes "random weights" on the figure. Returns
    ``model``."""
    object.__setattr__(model, RANDOM_WEIGHTS_ATTR, bool(random))
    return model


@torch.no_grad()
def explain(model: nn.Module, pixel_values: torch.Tensor, layers: LayerSpec = -1) -> Tuple[List[LayerMaps], torch.Tensor]:
    """Attention maps of ``layers`` for the first image of ``pixel_values``: ``(maps, model output)``.

    The maps of a model marked by :func:`mark_random_weights` say so (``LayerMaps.random_weights``)."""
    with AttentionCapture(model, layers) as cap:
        output = cap.run(pixel_values[:1])
    maps = [layer_maps(rec) for rec in cap.records]
    for lm in maps:
        lm.random_weights = bool(getattr(model, RANDOM_WEIGHTS_ATTR, False))
    return maps, output


def rep_window(i: int, rep_grid: Tuple[int, int], grid: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Patch rows ``[r0, r1)`` and columns ``[c0, c1)`` pooled into representative ``i`` (adaptive pooling)."""
    gh, gw = rep_grid
    h, w = grid
    r, c = divmod(i, gw)
    return (r * h) // gh, -((-(r + 1) * h) // gh), (c * w) // gw, -((-(c + 1) * w) // gw)
