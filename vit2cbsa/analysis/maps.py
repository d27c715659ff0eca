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
#: attribute set by :func:`mark_random_weights` on a model whose weights are random (untrained)
RANDOM_WEIGHTS_ATTR = "vit2cbsa_random_weights"


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
    random_weights: bool = False  # the model's weights are random (:func:`mark_random_weights`)

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


#: panel titles, captions and the suptitle (points)
TITLE_SIZE, CAPTION_SIZE, SUPTITLE_SIZE = 7.0, 5.5, 9.0
RANDOM_WEIGHTS_NOTE = "random weights: an untrained model, so these maps show no learned attention"
_KIND_WORDS = {"softmax": "softmax attention", "cbsa": "CBSA", "contraction_free": "CBSA, no contraction",
               "linear": "linear attention"}
_OPERATOR = {"softmax": "softmax(s q K^T)", "cbsa": "E = B(I+γS)A", "contraction_free": "E = BA",
             "linear": "normalised φ(Q)φ(K)^T"}


def _overlay(ax, img: np.ndarray, heat: Optional[np.ndarray], title: str, caption: str = "",
             cmap: str = "inferno", alpha: float = 0.6) -> None:
    """``img`` with ``heat`` scaled to its own range ``[0, 1]`` on top; a plain-words title, a small caption."""
    ax.imshow(img)
    if heat is not None:
        lo, hi = float(heat.min()), float(heat.max())
        ax.imshow((heat - lo) / max(hi - lo, 1e-12), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    ax.set_title(title, fontsize=TITLE_SIZE)
    if caption:
        ax.set_xlabel(caption, fontsize=CAPTION_SIZE, color="0.3", labelpad=2)
    ax.set_xticks([])
    ax.set_yticks([])


def _peak(values: np.ndarray, uniform: float) -> str:
    v = float(values.max())
    return f"max {v:.3g} ({v / uniform:.1f}x unif.)"


def _rep_words(lm: LayerMaps, i: int) -> str:
    """Representative ``i`` in plain words (a few words: it goes into a panel title)."""
    name = lm.rep_name(i)
    if name == "cls":
        return "the class token's rep."
    if name.startswith("prefix"):
        return f"{name}'s rep."
    if name == "global":
        return "the global rep."
    return f"rep. {name} (boxed)"


def _top_representatives(lm: LayerMaps, head: int, count: int) -> List[int]:
    """The representatives the class token reads most; when it reads only its own (one-hot row), that one
    first, then those the patches read most."""
    weights = lm.cls_broadcast[head].astype(np.float64)
    if weights.max() >= 1.0 - 1e-6:
        weights = weights + lm.broadcast[head].mean(axis=(0, 1)) * 1e-3
    return [int(i) for i in np.argsort(-weights, kind="stable")[:count]]


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped (at ``" | "`` first, then at spaces, then anywhere) to lines that fit ``width_in``."""
    import textwrap

    chars = max(12, int(width_in * 72 / (0.62 * fontsize)))  # a generous mean glyph width
    lines: List[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for part in paragraph.split(" | "):
            candidate = f"{current} | {part}" if current else part
            if len(candidate) <= chars:
                current = candidate
                continue
            if current:
                lines.append(current)
            pieces = textwrap.wrap(part, chars) or [""]
            lines += pieces[:-1]
            current = pieces[-1]
        lines.append(current)
    return "\n".join(lines)


def mark_random_weights(model: nn.Module, random: bool = True) -> nn.Module:
    """Record on ``model`` that its weights are random (untrained); :func:`explain` passes it on to the maps,
    and :func:`plot_explanation` writes "random weights" on the figure. Returns ``model``."""
    object.__setattr__(model, RANDOM_WEIGHTS_ATTR, bool(random))
    return model


def explanation_figure(
    image: np.ndarray,
    maps: Sequence[LayerMaps],
    reference: Optional[Sequence[LayerMaps]] = None,
    heads: Optional[Sequence[int]] = None,
    num_reps: int = 3,
    title: Optional[str] = None,
    mode: str = "bilinear",
    random_weights: bool = False,
):
    """The figure of :func:`plot_explanation`, as a ``matplotlib.figure.Figure`` (Agg canvas, not shown)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img = display_image(np.asarray(image))
    size = img.shape[:2]
    ref_by_index = {lm.index: lm for lm in (reference or [])}
    random_weights = bool(random_weights or any(lm.random_weights for lm in maps))
    rows = []
    for lm in maps:
        hs = list(range(lm.num_heads)) if heads is None else [h for h in heads if 0 <= h < lm.num_heads]
        if not hs:
            raise ValueError(f"heads {list(heads)} do not exist in layer {lm.index} ({lm.num_heads} heads)")
        rows += [(lm, h) for h in hs]
    has_cbsa = any(lm.kind in CBSA_KINDS for lm in maps)
    ncols = 2 + bool(reference) + (num_reps + 2 if has_cbsa else 0)
    width = 1.95 * ncols + 0.9  # + the colour bars
    heading = title or ""
    if random_weights:
        heading = f"{heading}\n{RANDOM_WEIGHTS_NOTE}" if heading else RANDOM_WEIGHTS_NOTE
    heading = _wrap(heading, width - 0.2, SUPTITLE_SIZE) if heading else ""
    # a row: two-line title, a square map 1.95 in wide, two-line caption, padding
    height = 2.5 * len(rows) + (0.2 * (heading.count("\n") + 1) + 0.15 if heading else 0.1)
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.04)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    mapped = []  # axes that show a map: the colour bars span them, random weights are written on them
    for r, (lm, head) in enumerate(rows):
        ax = list(axes[r])
        for a in ax:
            a.axis("off")
        ax[0].axis("on")
        _overlay(ax[0], img, None, "image")
        ax[0].set_ylabel(f"layer {lm.index}, head {head}\n{_KIND_WORDS.get(lm.kind, lm.kind)}", fontsize=TITLE_SIZE)
        col = 1
        who = "the class token" if lm.prefix > 0 else "the tokens (mean)"
        row_of = "class-token row" if lm.prefix > 0 else "mean row"
        unif_tok = 1.0 / (lm.prefix + lm.grid[0] * lm.grid[1])
        if reference:
            ref = ref_by_index.get(lm.index)
            if ref is not None:
                ax[col].axis("on")
                _overlay(ax[col], img, upsample(ref.cls[head], size, mode), f"original model:\nwhere {who} looks",
                         f"{row_of} of softmax(s q K^T)\n{_peak(ref.cls[head], unif_tok)}")
                mapped.append(ax[col])
            col += 1
        ax[col].axis("on")
        converted = lm.kind != "softmax"
        _overlay(ax[col], img, upsample(lm.cls[head], size, mode),
                 f"converted: where {who}\nlooks (whole layer)" if converted else f"where {who} looks",
                 f"{row_of} of {_OPERATOR.get(lm.kind, lm.kind)}\n{_peak(lm.cls[head], unif_tok)}")
        mapped.append(ax[col])
        col += 1
        if lm.kind not in CBSA_KINDS:
            continue
        sy, sx = size[0] / lm.grid[0], size[1] / lm.grid[1]
        top = _top_representatives(lm, head, num_reps)
        for i in top:
            a = lm.gather[head, i]
            ax[col].axis("on")
            _overlay(ax[col], img, upsample(a, size, mode), f"where {_rep_words(lm, i)}\nreads from (extraction)",
                     f"A[{lm.rep_name(i)}], read by the class token: B_cls {lm.cls_broadcast[head, i]:.2f}\n"
                     f"{_peak(a, unif_tok)}")
            if lm.rep_name(i).startswith("r"):  # a pooled representative: box its window
                r0, r1, c0, c1 = rep_window(i - lm.lead, lm.rep_grid, lm.grid)
                ax[col].add_patch(Rectangle((c0 * sx - 0.5, r0 * sy - 0.5), (c1 - c0) * sx, (r1 - r0) * sy,
                                            fill=False, edgecolor="cyan", linewidth=1.2))
            mapped.append(ax[col])
            col += 1
        col = ncols - 2
        i = top[0]
        m = lm.broadcast.shape[-1]
        bmap = lm.broadcast[head, :, :, i]
        ax[col].axis("on")
        _overlay(ax[col], img, upsample(bmap, size, mode), f"how each patch reads back\n{_rep_words(lm, i)} (broadcast)",
                 f"B[:, {lm.rep_name(i)}]\n{_peak(bmap, 1.0 / m)}", cmap="viridis")
        mapped.append(ax[col])
        assign = lm.broadcast[head].argmax(-1)  # h x w
        last = ax[ncols - 1]
        last.axis("on")
        last.imshow(img)
        last.imshow(upsample(assign.astype(np.float32), size, "nearest"), cmap="tab20" if m <= 20 else "hsv",
                    vmin=0, vmax=max(m - 1, 1), alpha=0.55, interpolation="nearest")
        last.set_title("which representative each\npatch reads back most", fontsize=TITLE_SIZE)
        last.set_xlabel(f"argmax_r B: {len(np.unique(assign))} of {m} reps used", fontsize=CAPTION_SIZE, color="0.3",
                        labelpad=2)
        last.set_xticks([])
        last.set_yticks([])
        mapped.append(last)
    # colour bars: every map is scaled to its own range, so the bar reads "lowest .. highest of that panel"
    bars = [("inferno", "where it looks / reads from")] + ([("viridis", "how much is read back")] if has_cbsa else [])
    for cmap, what in bars:
        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), ax=axes.ravel().tolist(), location="right",
                           shrink=min(0.9, 0.45 + 0.1 * len(rows)) / len(bars), aspect=25, pad=0.01)
        bar.set_ticks([0, 0.5, 1], labels=["min", "", "max"])
        bar.ax.tick_params(labelsize=CAPTION_SIZE)
        bar.set_label(f"{what}\n(each panel scaled to its own range)", fontsize=CAPTION_SIZE)
    if random_weights:  # also on every map, so a crop of the figure still says it
        for a in mapped:
            a.text(0.5, 0.5, "random weights", transform=a.transAxes, ha="center", va="center", rotation=30,
                   fontsize=9, color="white", alpha=0.6, fontweight="bold")
    if heading:
        fig.suptitle(heading, fontsize=SUPTITLE_SIZE, color="firebrick" if random_weights else "black")
    return fig


def plot_explanation(
    image: np.ndarray,
    maps: Sequence[LayerMaps],
    path: Union[str, Path],
    reference: Optional[Sequence[LayerMaps]] = None,
    heads: Optional[Sequence[int]] = None,
    num_reps: int = 3,
    title: Optional[str] = None,
    mode: str = "bilinear",
    random_weights: bool = False,
) -> Path:
    """Save a PNG with one row per (layer, head); panels titled in plain words, the notation in captions.

    Columns: the image; the reference model's class-token attention, "where the class token looks"
    (if ``reference``); the model's class-token map (for a converted layer, the class-token row of
    ``E = B (I + gamma S) A``, or ``E = BA`` without contraction: the whole layer); for CBSA-type
    layers, the gather maps ``A[r]`` ("where the representative reads from", extraction) of the
    ``num_reps`` representatives with the largest broadcast weight to the class token (their pooling
    window boxed), the broadcast map ``B[:, r]`` of the first of them ("how each patch reads back")
    and the assignment ``argmax_r B`` of every patch. Maps are upsampled (``mode``) onto the image and
    scaled to their own range (colour bars on the right; the maximum is in each caption). ``title``
    is wrapped to the figure's width (``constrained_layout``: nothing is clipped). With
    ``random_weights`` (or maps of a model marked by :func:`mark_random_weights`) "random weights"
    is written in the title and on every map.
    """
    fig = explanation_figure(image, maps, reference=reference, heads=heads, num_reps=num_reps, title=title,
                             mode=mode, random_weights=random_weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
