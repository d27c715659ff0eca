"""Multiscale attention: exact for the prefix tokens, fine near each patch, coarse far away, in one softmax.

A dense-features variant: every patch token keeps its exact neighbourhood structure (what segmentation and patch
features need) while the cost stays linear in ``N``. Per head (``Q, K, V``: ``N x d`` from the pretrained
projections, ``s`` the pretrained scale, the first ``t`` tokens are prefix tokens, the rest an ``h x w`` grid)::

    prefix token i:   out_i = kappa softmax(s q_i K^T) V                         (all N keys: exact)

    patch token i in window W (the grid cut into b x b windows, b = ``window``), one softmax over the groups:
        every prefix key on its own                                 k_g = k_j,            n_g = 1
        the f x f cells (f = ``fine_pool``) of W and of its          k_g, v_g: the cell's   n_g = its keys
          8 neighbouring windows (near field, fine)                   mean key and value
        each cell c of a gh x gw grid over the patches              k_c, v_c: the cell's   n_g = its keys outside
          (``num_representatives``; far field, coarse)                mean key and value     the near field of W
        out_i = kappa sum_g softmax_g(s q_i . k_g + beta log n_g) v_g

Every key is counted once: a far cell lying wholly in the near field has ``n_g = 0`` and is masked out; one that
overlaps its edge is weighted by the keys it has left. ``beta log n_g`` is the size bias (ToMe's proportional
attention, PVT's spatial reduction with the group's size restored): with ``beta = 1`` a group of ``n`` identical
keys gets exactly the weight its ``n`` keys get in the pretrained softmax, so when the keys and values of every
group are equal the layer *is* the pretrained layer, and with ``fine_pool = 1`` and a near field covering the whole
grid it is the pretrained layer exactly. The class token is exact at conversion whatever the grid. ``kappa``
(broadcast step, starts at 1) and ``beta`` (``size_bias``, starts at 1) are learnable per head.

Per patch token the softmax runs over ``9 (b/f)^2`` near groups and ``t + gh gw`` shared ones, counts that do not
grow with ``N``: the cost per head is ``O(N (9 (b/f)^2 + t + gh gw) d)`` plus ``O(t N d)`` for the prefix, linear
in ``N``. The near groups are gathered per window and shared by its ``b^2`` queries, the prefix keys and the far
cells' means are the same for every window (the window enters only through the counts ``n_g``): one fused
``scaled_dot_product_attention`` call over every (head, window), the size biases as its additive mask. The tokens
are gathered into window order once (and back); the cells' means are two separable averaging matmuls over the
patch keys and values, the counts come from the cell and window edges; no ``N x N`` array is formed.

Grids not divisible by ``b`` are padded; padded keys form empty groups, masked out of the softmax. Traced with
symbolic sizes (``torch.export``, ``torch.fx``) the steps are the same, through index gathers built from the sizes,
so the program holds for every grid.

:class:`WindowMixer` (``"window"``) is the anchor that ViTDet and SAM's image encoder use to run a plain ViT at
high resolution: each patch token attends exactly to the keys of its own ``b x b`` window and to the prefix
keys (the same steps with no neighbours, ``f = 1`` and no far field); the prefix tokens attend globally.

Both compute in float32 for half inputs and are differentiated by autograd; :meth:`MultiscaleMixer.operator`
gives the whole layer as one token-to-token operator ``out = kappa E V`` (the same steps applied to ``V = I``).
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..layout import TokenLayout, is_concrete, is_tracing
from ..pooling import _sym_min
from ..specs import check_positive_int
from .base import Mixer
from .cbsa_explicit import _without_autocast, compute_dtype
from .registry import register_variant

# under torch.fx, q.dtype is a graph value: compute_dtype becomes a node of the graph, not a Python branch
torch.fx.wrap("compute_dtype")

#: the largest window side accepted (patch tokens): a window is padded to ``window^2`` tokens, so a saved config
#: naming a huge one would allocate that much at the first forward pass
MAX_WINDOW = 256

#: the logit of an empty group (a padded cell, a far cell wholly inside the near field): exp() of it is 0
MASKED = -1e30


def _check_window(window: Any) -> None:
    check_positive_int("window", window)
    if window > MAX_WINDOW:
        raise UsageError(f"window={window} is larger than {MAX_WINDOW} patch tokens (each window is padded to "
                         f"window^2 tokens); use a window of at most {MAX_WINDOW}, e.g. 8 or 16")


def _log_size(count: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``beta log n`` where ``n > 0``, :data:`MASKED` where the group is empty."""
    return torch.where(count > 0, beta * count.clamp(min=1).log(), torch.full_like(count, MASKED))


def _window_order(h, w, nbh, nbw, c: int, f: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index tensors between the row-major ``h x w`` tokens and *window order* ``(I, J, cy, cx, fy, fx)``: window
    ``(I, J)`` of the ``nbh x nbw`` windows, cell ``(cy, cx)`` of its ``c x c`` cells, token ``(fy, fx)`` of the
    ``f x f`` cell. ``gather`` (``nbh nbw c^2 f^2``): the token at each window-order position, ``h w`` (a zero
    row appended after the tokens) where the position is padding; ``scatter`` (``h w``): each token's position.
    Gathers and splits of contiguous dimensions keep a traced program free of guards on the grid."""
    b = c * f
    dev = like.device
    I, J = torch.arange(nbh, device=dev), torch.arange(nbw, device=dev)
    cc, ff = torch.arange(c, device=dev), torch.arange(f, device=dev)
    y = I.view(-1, 1, 1, 1, 1, 1) * b + cc.view(1, 1, -1, 1, 1, 1) * f + ff.view(1, 1, 1, 1, -1, 1)
    x = J.view(1, -1, 1, 1, 1, 1) * b + cc.view(1, 1, 1, -1, 1, 1) * f + ff.view(1, 1, 1, 1, 1, -1)
    gather = torch.where((y < h) & (x < w), y * w + x, h * w).reshape(-1)
    ty, tx = torch.arange(h, device=dev).view(-1, 1), torch.arange(w, device=dev).view(1, -1)
    scatter = (((((ty // b) * nbw + tx // b) * c + (ty % b) // f) * c + (tx % b) // f) * f + ty % f) * f + tx % f
    return gather, scatter.reshape(-1)


def _edges(size, cells, like: torch.Tensor) -> torch.Tensor:
    """``cells + 1`` edges ``floor(j size / cells)`` cutting ``0 .. size`` into ``cells`` non-overlapping runs."""
    return torch.div(torch.arange(cells + 1, device=like.device) * size, cells, rounding_mode="floor")


def _cell_means(edges: torch.Tensor, size, like: torch.Tensor) -> torch.Tensor:
    """``cells x size`` matrix averaging a 1-D axis over the runs ``[edges[j], edges[j+1])``."""
    r = torch.arange(size, device=like.device)
    inside = ((r >= edges[:-1, None]) & (r < edges[1:, None])).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


@register_variant
class MultiscaleMixer(Mixer):
    """Token mixer ``(q, k, v) -> context`` (``B x H x N x d``): exact prefix, fine near field, coarse far field.

    Args:
        num_heads: number of heads ``H``.
        head_dim: width ``d`` of a head.
        far_grid: the coarse grid ``(gh, gw)`` of the far field (``num_representatives``; clamped to the patch grid).
        window: side ``b`` of the windows, in patch tokens (``window``).
        fine_pool: side ``f`` of the near field's pooling cells (``fine_pool``; 1: exact keys); divides ``window``.
        scale: attention scale; defaults to ``head_dim ** -0.5`` as in the pretrained layer.
    """

    name = "multiscale"
    uses_representatives = False
    description = "multiscale attention"
    formula = "softmax(s q·k_g + β log n_g): fine near, coarse far"
    #: windows on each side of a token's window that are in its near field (1: the 3 x 3 windows around it)
    halo: int = 1
    #: whether the keys outside the near field are attended to, as far groups
    far_field: bool = True

    def __init__(self, num_heads: int, head_dim: int, far_grid: Tuple[int, int] = (16, 16), window: int = 8,
                 fine_pool: int = 2, scale: Optional[float] = None) -> None:
        super().__init__()
        self.check_options(window=window, fine_pool=fine_pool)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.far_grid = (int(far_grid[0]), int(far_grid[1]))
        self.window, self.fine_pool = window, fine_pool
        self.scale = float(scale) if scale is not None else head_dim ** -0.5
        self.kappa = nn.Parameter(torch.ones(num_heads))
        self.size_bias = nn.Parameter(torch.ones(num_heads))

    @classmethod
    def check_options(cls, *, window: int = 8, fine_pool: int = 2, **_: Any) -> None:
        """Refuse (:class:`~vit2cbsa.errors.UsageError`) options this variant cannot use."""
        _check_window(window)
        check_positive_int("fine_pool", fine_pool)
        if window % fine_pool:
            raise UsageError(f"fine_pool={fine_pool} must divide window={window} (the near field's cells tile the "
                             f"windows); use e.g. window={window - window % fine_pool or fine_pool}")

    @classmethod
    def options_text(cls, *, rep_grid: Tuple[int, int] = (16, 16), window: int = 8, fine_pool: int = 2,
                     **_: Any) -> str:
        return f"window={window}, fine_pool={fine_pool}, far grid {rep_grid[0]}x{rep_grid[1]}"

    @classmethod
    def from_options(cls, num_heads: int, head_dim: int, *, rep_grid: Tuple[int, int], scale: Optional[float] = None,
                     window: int = 8, fine_pool: int = 2, **_: Any) -> "MultiscaleMixer":
        """The mixer of one layer: ``rep_grid`` is the far grid, ``window`` / ``fine_pool`` as in the config."""
        return cls(num_heads, head_dim, rep_grid, window=window, fine_pool=fine_pool, scale=scale)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"fine_pool={self.fine_pool}, far_grid={self.far_grid[0]}x{self.far_grid[1]}")

    # ------------------------------------------------------------------ forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``kappa E V`` (``B x H x N x d``): the module docstring's steps, in float32 for half inputs."""
        work = compute_dtype(q.dtype)
        with contextlib.nullcontext() if is_tracing(q) else _without_autocast(q.device.type):
            return self._mix(q.to(work), k.to(work), v.to(work), layout).to(q.dtype)

    @torch.no_grad()
    def operator(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``E`` (``B x H x N x N``) with ``forward(q, k, v, layout) == kappa E V``: the steps applied to ``V = I``."""
        work = compute_dtype(q.dtype)
        B, H, N = q.shape[:3]
        eye = torch.eye(N, dtype=work, device=q.device).expand(B, H, N, N)
        with _without_autocast(q.device.type):
            return self._mix(q.to(work), k.to(work), eye, layout, kappa=False)

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
             kappa: bool = True) -> torch.Tensor:
        t, h, w = layout.split(q.shape[-2])
        qs = q * self.scale
        prefix = torch.softmax(qs[:, :, :t] @ k.transpose(-2, -1), dim=-1) @ v  # B H t dv: exact
        patches = self._patches(qs[:, :, t:], k, v, t, h, w)
        out = torch.cat([prefix, patches], dim=2)
        if kappa:
            out = out * self.kappa.to(out.dtype).view(1, -1, 1, 1)
        return out

    def _patches(self, qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t, h, w) -> torch.Tensor:
        """The patch tokens' outputs ``B x H x hw x dv`` (``qs``: their scaled queries)."""
        B, H, d, dv = qs.shape[0], qs.shape[1], qs.shape[-1], v.shape[-1]
        b, f = self.window, self.fine_pool
        c = b // f  # fine cells per window side
        beta = self.size_bias.to(qs.dtype).view(1, -1, 1, 1, 1)
        # windows, the last ones padded; traced with symbolic sizes, one more empty row and column of windows, so
        # that no count of windows can be 1 (torch.export would otherwise specialise the program on it)
        extra = 0 if is_concrete(h, w) else 1
        nbh, nbw = (h + b - 1) // b + extra, (w + b - 1) // b + extra

        gather, scatter = _window_order(h, w, nbh, nbw, c, f, qs)

        def windows(x: torch.Tensor) -> torch.Tensor:  # n0 n1 hw e -> n0 n1 nbh nbw b^2 e (window order, zero-padded)
            n0, n1, e = x.shape[0], x.shape[1], x.shape[-1]
            x = torch.cat([x, x.new_zeros(n0, n1, 1, e)], dim=2).index_select(2, gather)
            return x.reshape(n0, n1, nbh, nbw, b * b, e)

        qb = windows(qs)  # B H nbh nbw b^2 d

        # near field: f x f cells of the window and of its neighbours (zero-padded: empty cells)
        def cells(x: torch.Tensor) -> torch.Tensor:  # n0 n1 hw e -> n0 n1 nbh nbw c^2 e: each window's cell sums
            x = windows(x)
            return x.reshape(x.shape[0], x.shape[1], nbh, nbw, c * c, f * f, x.shape[-1]).sum(-2)

        def near(x: torch.Tensor) -> List[torch.Tensor]:  # the window's and its neighbours' cells (empty off the grid)
            if not self.halo:
                return [x]
            x = F.pad(x, (0, 0, 0, 0, self.halo, self.halo, self.halo, self.halo))
            span = 2 * self.halo + 1
            return [x[:, :, i:i + nbh, j:j + nbw] for i in range(span) for j in range(span)]

        cell_n = cells(qs.new_ones(1, 1, h * w, 1))  # 1 1 nbh nbw c^2 1: tokens in each cell
        near_n = torch.cat(near(cell_n), dim=-2)[0, 0, ..., 0]  # nbh nbw Ln
        kx, vx = k[:, :, t:], v[:, :, t:]
        kn, vn = near(cells(kx) / cell_n.clamp(min=1)), near(cells(vx) / cell_n.clamp(min=1))  # cell means
        bias_n = _log_size(near_n, beta)  # 1 H nbh nbw Ln

        # shared groups, the same keys for every window: the prefix keys (one group each, bias beta log 1 = 0) and
        # the far cells' mean keys, weighted by the number of their keys outside the window's near field
        # (and one empty group, masked, so that the shared part is never empty: no prefix and no far field)
        ks, vs = [k[:, :, :t], qs.new_zeros(B, H, 1, d)], [v[:, :, :t], v.new_zeros(B, H, 1, dv)]
        bias_s = [qs.new_zeros(1, H, nbh, nbw, t), qs.new_full((1, H, nbh, nbw, 1), MASKED)]
        if self.far_field:
            gh, gw = _sym_min(self.far_grid[0], h), _sym_min(self.far_grid[1], w)
            er, ec = _edges(h, gh, qs), _edges(w, gw, qs)
            rows, cols = _cell_means(er, h, qs), _cell_means(ec, w, qs)  # gh x h, gw x w
            def means(x, width):
                x = rows @ x.reshape(B, H, h, w * width)  # B H gh (w e)
                x = cols @ x.reshape(B, H, gh, w, width)  # B H gh gw e: the cells' means
                return x.reshape(B, H, gh * gw, width)
            ks.append(means(kx, d))
            vs.append(means(vx, dv))
            bias_s.append(_log_size(self._far_counts(er, ec, nbh, nbw).to(qs.dtype), beta))
        ks, vs, bias_s = torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), torch.cat(bias_s, dim=-1)

        # one softmax per window over [near groups | shared groups] (the window's b^2 queries share its keys and
        # biases): one fused attention call over every (head, window), the size bias as its additive mask
        L = near_n.shape[-1] + ks.shape[-2]
        keys = torch.cat(kn + [ks[:, :, None, None].expand(B, H, nbh, nbw, ks.shape[-2], ks.shape[-1])], dim=-2)
        vals = torch.cat(vn + [vs[:, :, None, None].expand(B, H, nbh, nbw, vs.shape[-2], dv)], dim=-2)
        bias = torch.cat([bias_n, bias_s], dim=-1)  # 1 H nbh nbw L
        out = F.scaled_dot_product_attention(
            qb.reshape(B, H * nbh * nbw, b * b, -1), keys.reshape(B, H * nbh * nbw, L, -1),
            vals.reshape(B, H * nbh * nbw, L, dv), attn_mask=bias.reshape(1, H * nbh * nbw, 1, L), scale=1.0)
        out = out.reshape(B, H, nbh * nbw * b * b, dv)  # window order
        return out.index_select(2, scatter)

    def _far_counts(self, er: torch.Tensor, ec: torch.Tensor, nbh, nbw) -> torch.Tensor:
        """``nbh x nbw x (gh gw)``: the keys of each far cell outside each window's near field (cell edges ``er``,
        ``ec``; the near field of window ``(I, J)`` is rows ``[(I - halo) b, (I + 1 + halo) b)``, columns alike)."""
        b = self.window

        def overlap(edges: torch.Tensor, blocks) -> torch.Tensor:  # blocks x cells: rows of each cell in the near field
            i = torch.arange(blocks, device=edges.device)[:, None]
            lo = ((i - self.halo) * b).clamp(min=0)
            hi = torch.minimum((i + 1 + self.halo) * b, edges[-1:])
            return (torch.minimum(edges[None, 1:], hi) - torch.maximum(edges[None, :-1], lo)).clamp(min=0)

        rows, cols = overlap(er, nbh), overlap(ec, nbw)  # nbh x gh, nbw x gw
        cell = (er[1:] - er[:-1])[:, None] * (ec[1:] - ec[:-1])[None, :]  # gh x gw
        inside = rows[:, None, :, None] * cols[None, :, None, :]  # nbh nbw gh gw
        return (cell - inside).reshape(nbh, nbw, -1)


@register_variant
class WindowMixer(MultiscaleMixer):
    """Windowed attention (ViTDet / SAM's image encoder): each patch token attends exactly to its own
    ``window x window`` window and the prefix keys; the prefix tokens attend to every token. Keep a few blocks
    global (``layers``) as ViTDet does."""

    name = "window"
    description = "window attention"
    formula = "softmax within b×b windows (+ prefix)"
    halo = 0
    far_field = False

    def __init__(self, num_heads: int, head_dim: int, window: int = 8, scale: Optional[float] = None) -> None:
        super().__init__(num_heads, head_dim, (1, 1), window=window, fine_pool=1, scale=scale)

    @classmethod
    def check_options(cls, *, window: int = 8, **_: Any) -> None:
        _check_window(window)

    @classmethod
    def options_text(cls, *, window: int = 8, **_: Any) -> str:
        return f"window={window}"

    @classmethod
    def from_options(cls, num_heads: int, head_dim: int, *, scale: Optional[float] = None, window: int = 8,
                     **_: Any) -> "WindowMixer":
        """The mixer of one layer: only ``window`` applies."""
        return cls(num_heads, head_dim, window=window, scale=scale)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"


__all__ = ["MASKED", "MAX_WINDOW", "MultiscaleMixer", "WindowMixer"]
