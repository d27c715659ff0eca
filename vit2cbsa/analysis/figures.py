"""The ``vit2cbsa explain`` figure: the maps of :mod:`vit2cbsa.analysis.maps` drawn over the image (matplotlib).

One row per (layer, head); panel titles in plain words, the paper's notation in the captions:

* the image; the reference (original) model's class-token attention ``softmax(s q K^T)``;
* the layer's class-token row of its token-to-token operator ``E`` (``out = kappa E V``: the whole layer; the
  variant's own ``Mixer.formula`` in the caption);
* for representative variants: the gather maps ``A[r]`` of the representatives the class token reads most
  (pooling windows boxed, :func:`~vit2cbsa.analysis.maps.rep_window`), the broadcast map ``B[:, r]`` of the
  first of them, and ``argmax_r B`` (the representative each patch reads back most).

Every map is upsampled onto the image and scaled to its own range (colour bars: "min .. max of that panel").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .maps import LayerMaps, rep_window


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
    has_cbsa = any(lm.has_representatives for lm in maps)
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
        ax[0].set_ylabel(f"layer {lm.index}, head {head}\n{lm.description or lm.kind}", fontsize=TITLE_SIZE)
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
        _overlay(ax[col], img, upsample(lm.cls[head], size, mode),
                 f"converted: where {who}\nlooks (whole layer)" if lm.converted else f"where {who} looks",
                 f"{row_of} of {lm.formula}\n{_peak(lm.cls[head], unif_tok)}")
        mapped.append(ax[col])
        col += 1
        if not lm.has_representatives:
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
    ``random_weights`` (or maps of a model marked by :func:`~vit2cbsa.analysis.maps.mark_random_weights`) "random weights"
    is written in the title and on every map.
    """
    fig = explanation_figure(image, maps, reference=reference, heads=heads, num_reps=num_reps, title=title,
                             mode=mode, random_weights=random_weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
