"""Attention maps of original and converted layers, recomputed from captured ``q, k, v``.

For a converted CBSA-type layer (see :mod:`vit2cbsa.attention.cbsa`), :func:`cbsa_maps` reruns the
mixer's own forward steps (:meth:`~vit2cbsa.attention.CBSAMixer.steps`) on the ``q, k, v`` it received::

    P   = [Q[:t]; pool(Q[t:])]               pooled queries (m x d) and the extra representatives
    A   = softmax(s e^a P K^T)               representative <- token: which tokens each representative gathers
    S   = softmax(s e^a P K_r^T)             contraction among representatives (m x m), K_r = A K
    C   = (I + gamma S) A V                  contracted representatives
    B   = softmax(s e^b Q K_r^T)             token <- representative (broadcast="key");
          softmax(s e^b Q P^T) ("query"),  A^T / A^T 1 ("transpose"); one-hot rows for prefix tokens
          that read only their own representative
    out = kappa B C                          = the mixer's output

so the whole layer is the linear operator ``out = kappa E V`` with ``E = B (I + gamma S) A``
(``N x N``, row-stochastic when ``gamma = 0``): :func:`attention_operator` returns ``E`` for every
kind of layer (softmax: ``softmax(s Q K^T)``; linear: the normalised kernel matrix), and its
class-token row is the map compared with the original model's class-token attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layout import TokenLayout, effective_grid, extra_parts
from .capture import AttentionCapture, LayerRecord, LayerSpec

CBSA_KINDS = ("cbsa", "contraction_free")


@dataclass
class CBSAMaps:
    """Everything a CBSA-type mixer computes for one batch (``B x H x ...``)."""

    A: torch.Tensor  # B H m N  extraction coefficients (rows sum to 1 over tokens)
    B: torch.Tensor  # B H N m  broadcast weights (rows sum to 1 over representatives)
    S: Optional[torch.Tensor]  # B H m m  contraction attention (None without contraction)
    P: torch.Tensor  # B H m d  pooled queries
    K_r: torch.Tensor  # B H m d  representative keys
    V_r: Optional[torch.Tensor]  # B H m d  representative values (None without v)
    C: Optional[torch.Tensor]  # B H m d  contracted representatives
    out: Optional[torch.Tensor]  # B H N d  the mixer's output
    gamma: Optional[torch.Tensor]  # H  contraction step (None without contraction)
    kappa: torch.Tensor  # H  broadcast step
    prefix: int
    grid: Tuple[int, int]
    rep_grid: Tuple[int, int]  # effective representative grid (clamped to the patch grid)
    lead: int = 0  # prefix tokens that are representatives 0 .. lead-1 (before the pooled grid)
    has_global: bool = False  # a global representative after the pooled grid

    def operator(self) -> torch.Tensor:
        """``E = B (I + gamma S) A`` (``B x H x N x N``): ``out = kappa E V``."""
        a = self.A
        if self.S is not None:
            a = a + self.gamma.view(1, -1, 1, 1).to(a.dtype) * (self.S @ a)
        return self.B @ a


def cbsa_maps(mixer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
              grid: Union[Tuple[int, int], TokenLayout]) -> CBSAMaps:
    """``A``, ``B`` (and ``S``, ``C``, the output) of a CBSA-type mixer, from the mixer's own forward steps.

    Args:
        mixer: a :class:`~vit2cbsa.attention.CBSAMixer` or :class:`~vit2cbsa.attention.ContractionFreeMixer`.
        q, k, v: ``B x H x N x d`` as the mixer received them (``v`` may be ``None``: no ``C``/output).
        grid: the patch grid ``(h, w)`` of the input (or a :class:`~vit2cbsa.layout.TokenLayout`).
    """
    if getattr(mixer, "variant", None) not in CBSA_KINDS:
        raise TypeError(f"cbsa_maps needs a CBSA-type mixer, got {type(mixer).__name__}")
    layout = grid if isinstance(grid, TokenLayout) else TokenLayout(tuple(grid))
    geo = mixer.geometry(q.shape[-2], layout)
    with torch.no_grad():
        st = mixer.steps(q, k, k if v is None else v, layout)
        k_r = st.kr if st.kr is not None else st.a @ k
        gamma = mixer.gamma.detach() if mixer.contraction else None
        v_r, c, out = (None, None, None) if v is None else (st.vr, st.cc, st.out)
    lead, glob = extra_parts(geo.extra, geo.prefix)
    return CBSAMaps(st.a, st.bm, st.g, st.p, k_r, v_r, c, out, gamma, mixer.kappa.detach(), geo.prefix,
                    (geo.h, geo.w), effective_grid(mixer.rep_grid, geo.h, geo.w), lead, glob)


def attention_operator(rec: LayerRecord) -> torch.Tensor:
    """The token-to-token operator ``E`` (``B x H x N x N``) of a captured layer, such that the layer's
    context is ``E V`` (softmax), ``kappa E V`` (CBSA-type, ``E = B (I + gamma S) A``) or
    ``kappa E V`` (linear attention, the normalised kernel matrix)."""
    q, k, v = rec.qkv()
    if rec.kind == "softmax":
        return torch.softmax((q @ k.transpose(-2, -1)) * rec.scale, dim=-1)
    mixer = rec.module.mixer
    if rec.kind in CBSA_KINDS:
        return cbsa_maps(mixer, q, k, None, rec.grid).operator()
    if rec.kind == "linear":
        with torch.no_grad():
            fq, fk = mixer.phi(q), mixer.phi(k)
            denom = (fq * fk.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + mixer.eps
            return (fq @ fk.transpose(-2, -1)) / denom
    raise TypeError(f"no attention operator for layer kind {rec.kind!r}")


# --------------------------------------------------------------------------- per-layer maps on the grid


@dataclass
class LayerMaps:
    """Maps of one layer for one image, on the patch grid (``h x w``), per head."""

    index: int
    name: str
    kind: str
    grid: Tuple[int, int]
    prefix: int
    cls: np.ndarray  # H x h x w: class-token row of E over the patches (mean over tokens if no prefix)
    gather: Optional[np.ndarray] = None  # H x m x h x w: A restricted to the patches
    broadcast: Optional[np.ndarray] = None  # H x h x w x m: B of the patch tokens
    cls_broadcast: Optional[np.ndarray] = None  # H x m: B of the class token (mean over tokens if no prefix)
    rep_grid: Optional[Tuple[int, int]] = None
    lead: int = 0  # representatives 0 .. lead-1 are prefix tokens
    has_global: bool = False  # the last representative is the global one

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


def _first_row(e: torch.Tensor, prefix: int) -> torch.Tensor:
    """Row of the first prefix token (``... x N x M -> ... x M``), or the mean over all rows without one."""
    return e[..., 0, :] if prefix > 0 else e.mean(dim=-2)


def layer_maps(rec: LayerRecord, image: int = 0) -> LayerMaps:
    """The maps of one captured layer for image ``image`` of the batch."""
    h, w = rec.grid
    t = rec.prefix
    if rec.kind in CBSA_KINDS:
        q, k, v = rec.qkv()
        maps = cbsa_maps(rec.module.mixer, q[image:image + 1], k[image:image + 1], None, rec.grid)
        e = maps.operator()[0]
        b = maps.B[0]
        a = maps.A[0]
        nh, m = a.shape[0], a.shape[1]
        return LayerMaps(
            rec.index, rec.name, rec.kind, (h, w), t,
            cls=_first_row(e, t)[:, t:].reshape(nh, h, w).float().cpu().numpy(),
            gather=a[:, :, t:].reshape(nh, m, h, w).float().cpu().numpy(),
            broadcast=b[:, t:, :].reshape(nh, h, w, m).float().cpu().numpy(),
            cls_broadcast=_first_row(b, t).float().cpu().numpy(),
            rep_grid=maps.rep_grid, lead=maps.lead, has_global=maps.has_global,
        )
    q, k, v = rec.qkv()
    sub = LayerRecord(rec.index, rec.name, rec.module, rec.kind, rec.num_heads, rec.x[image:image + 1], rec.grid,
                      _qkv=(q[image:image + 1], k[image:image + 1], v[image:image + 1]))
    e = attention_operator(sub)[0]
    return LayerMaps(rec.index, rec.name, rec.kind, (h, w), t,
                     cls=_first_row(e, t)[:, t:].reshape(e.shape[0], h, w).float().cpu().numpy())


@torch.no_grad()
def explain(model: nn.Module, pixel_values: torch.Tensor, layers: LayerSpec = -1) -> Tuple[List[LayerMaps], torch.Tensor]:
    """Attention maps of ``layers`` for the first image of ``pixel_values``: ``(maps, model output)``."""
    with AttentionCapture(model, layers) as cap:
        output = cap.run(pixel_values[:1])
    return [layer_maps(rec) for rec in cap.records], output


def rep_window(i: int, rep_grid: Tuple[int, int], grid: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """Patch rows ``[r0, r1)`` and columns ``[c0, c1)`` pooled into representative ``i`` (adaptive pooling)."""
    gh, gw = rep_grid
    h, w = grid
    r, c = divmod(i, gw)
    return (r * h) // gh, -((-(r + 1) * h) // gh), (c * w) // gw, -((-(c + 1) * w) // gw)


# --------------------------------------------------------------------------- figures


def upsample(maps: np.ndarray, size: Tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Upsample ``(..., h, w)`` maps onto an image of ``size`` (``H, W``)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:])
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(t, size=tuple(size), mode=mode, **kwargs)
    return out.reshape(*lead, *size).numpy()


def display_image(image: np.ndarray, min_side: int = 224) -> np.ndarray:
    """Enlarge a small image (``H x W x 3`` uint8) for display, by an integer factor (nearest)."""
    factor = max(1, math.ceil(min_side / max(1, min(image.shape[:2]))))
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def _overlay(ax, img: np.ndarray, heat: Optional[np.ndarray], title: str, cmap: str = "inferno",
             alpha: float = 0.6, vmax: Optional[float] = None) -> None:
    ax.imshow(img)
    if heat is not None:
        lo, hi = float(heat.min()), float(heat.max() if vmax is None else vmax)
        ax.imshow((heat - lo) / max(hi - lo, 1e-12), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _peak(values: np.ndarray, uniform: float) -> str:
    v = float(values.max())
    return f"max {v:.3g} ({v / uniform:.1f}x unif.)"


def _top_representatives(lm: LayerMaps, head: int, count: int) -> List[int]:
    """The representatives the class token reads most; when it reads only its own (one-hot row), that one
    first, then those the patches read most."""
    weights = lm.cls_broadcast[head].astype(np.float64)
    if weights.max() >= 1.0 - 1e-6:
        weights = weights + lm.broadcast[head].mean(axis=(0, 1)) * 1e-3
    return [int(i) for i in np.argsort(-weights, kind="stable")[:count]]


def plot_explanation(
    image: np.ndarray,
    maps: Sequence[LayerMaps],
    path: Union[str, Path],
    reference: Optional[Sequence[LayerMaps]] = None,
    heads: Optional[Sequence[int]] = None,
    num_reps: int = 3,
    title: Optional[str] = None,
    mode: str = "bilinear",
) -> Path:
    """Save a PNG with one row per (layer, head).

    Columns: the image; the reference model's class-token attention (if ``reference``); the
    model's class-token map (for a converted layer, the class-token row of ``E = B (I + gamma S) A``,
    titled ``E=B(I+gS)A``, or ``E=BA`` without contraction);
    for CBSA-type layers, the gather maps ``A[r]`` of the ``num_reps`` representatives with the
    largest broadcast weight to the class token (their pooling window boxed), the broadcast map
    ``B[:, r]`` of the first of them, and the assignment ``argmax_r B`` of every patch. Maps are
    upsampled (``mode``) onto the image and scaled to their own range (the maximum is in the title).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img = display_image(np.asarray(image))
    size = img.shape[:2]
    ref_by_index = {lm.index: lm for lm in (reference or [])}
    rows = []
    for lm in maps:
        hs = list(range(lm.num_heads)) if heads is None else [h for h in heads if 0 <= h < lm.num_heads]
        if not hs:
            raise ValueError(f"heads {list(heads)} do not exist in layer {lm.index} ({lm.num_heads} heads)")
        rows += [(lm, h) for h in hs]
    has_cbsa = any(lm.kind in CBSA_KINDS for lm in maps)
    ncols = 2 + bool(reference) + (num_reps + 2 if has_cbsa else 0)
    height = 1.7 * len(rows) + (0.45 if title else 0.1)
    fig = Figure(figsize=(1.95 * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (lm, head) in enumerate(rows):
        ax = list(axes[r])
        for a in ax:
            a.axis("off")
        ax[0].axis("on")
        _overlay(ax[0], img, None, "image")
        ax[0].set_ylabel(f"layer {lm.index} head {head}\n{lm.kind}", fontsize=7)
        col = 1
        cls_name = "class token" if lm.prefix > 0 else "mean over tokens"
        unif_tok = 1.0 / (lm.prefix + lm.grid[0] * lm.grid[1])
        if reference:
            ref = ref_by_index.get(lm.index)
            if ref is not None:
                ax[col].axis("on")
                heat = upsample(ref.cls[head], size, mode)
                _overlay(ax[col], img, heat, f"original softmax: {cls_name}\n{_peak(ref.cls[head], unif_tok)}")
            col += 1
        ax[col].axis("on")
        label = {"softmax": "", "cbsa": " E=B(I+gS)A", "contraction_free": " E=BA", "linear": " kernel"}.get(lm.kind, "")
        _overlay(ax[col], img, upsample(lm.cls[head], size, mode),
                 f"{lm.kind}{label}: {cls_name}\n{_peak(lm.cls[head], unif_tok)}")
        col += 1
        if lm.kind not in CBSA_KINDS:
            continue
        sy, sx = size[0] / lm.grid[0], size[1] / lm.grid[1]
        top = _top_representatives(lm, head, num_reps)
        for i in top:
            a = lm.gather[head, i]
            ax[col].axis("on")
            _overlay(ax[col], img, upsample(a, size, mode),
                     f"gather A[{lm.rep_name(i)}] (B_cls {lm.cls_broadcast[head, i]:.2f})\n{_peak(a, unif_tok)}")
            if lm.rep_name(i).startswith("r"):  # a pooled representative: box its window
                r0, r1, c0, c1 = rep_window(i - lm.lead, lm.rep_grid, lm.grid)
                ax[col].add_patch(Rectangle((c0 * sx - 0.5, r0 * sy - 0.5), (c1 - c0) * sx, (r1 - r0) * sy,
                                            fill=False, edgecolor="cyan", linewidth=1.2))
            col += 1
        col = ncols - 2
        i = top[0]
        m = lm.broadcast.shape[-1]
        bmap = lm.broadcast[head, :, :, i]
        ax[col].axis("on")
        _overlay(ax[col], img, upsample(bmap, size, mode),
                 f"broadcast B[:, {lm.rep_name(i)}]\n{_peak(bmap, 1.0 / m)}", cmap="viridis")
        assign = lm.broadcast[head].argmax(-1)  # h x w
        ax[ncols - 1].axis("on")
        ax[ncols - 1].imshow(img)
        ax[ncols - 1].imshow(upsample(assign.astype(np.float32), size, "nearest"), cmap="tab20" if m <= 20 else "hsv",
                             vmin=0, vmax=max(m - 1, 1), alpha=0.55, interpolation="nearest")
        ax[ncols - 1].set_title(f"argmax_r B\n{len(np.unique(assign))} of {m} reps used", fontsize=7)
        ax[ncols - 1].set_xticks([])
        ax[ncols - 1].set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.4 / height if title else 0)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
