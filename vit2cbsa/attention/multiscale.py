"""Multiscale attention: exact for the prefix tokens, fine near each patch, coarse far away, in one softmax.

A dense-features variant: every patch token keeps its exact neighbourhood structure (what segmentation and patch
features need) while the cost stays linear in ``N``. Per head (``Q, K, V``: ``N x d`` from the pretrained
projections, ``s`` the pretrained scale, the first ``t`` tokens are prefix tokens, the rest an ``h x w`` grid)::

    prefix token i:   out_i = kappa softmax(s q_i K^T) V                         (all N keys: exact)

    patch token i in window W (the grid cut into b x b windows, b = ``window``):
        groups G(i) -- a partition of the N keys, each key in exactly one group:
            every prefix key on its own                                          (n_g = 1)
            the f x f cells (f = ``fine_pool``) of W and of its 8 neighbours     (near field, fine)
            the rest of each cell of a gh x gw grid over the patches             (far field, coarse:
              (``num_representatives``), less the keys already in the near field   cell minus near field)
        k_g = mean of the keys in g,  v_g = mean of their values,  n_g = |g|
        out_i = kappa sum_g softmax_g(s q_i . k_g + beta log n_g) v_g

``beta log n_g`` is the size bias (ToMe's proportional attention, PVT's spatial reduction with the group's size
restored): with ``beta = 1`` a group of ``n`` identical keys gets exactly the weight its ``n`` keys get in the
pretrained softmax, so when every key of a group is the same the layer *is* the pretrained layer, and with
``fine_pool = 1`` and a near field covering the whole grid it is the pretrained layer exactly. The class token
is exact at conversion whatever the grid. ``kappa`` (broadcast step, starts at 1) and ``beta`` (``size_bias``,
starts at 1) are learnable per head. Near and far groups of a window are shared by its ``b^2`` queries, so per
patch token the softmax runs over ``t + 9 (b/f)^2 + gh gw`` groups, a count that does not grow with ``N``: the
cost per head is ``O(N (t + 9 (b/f)^2 + gh gw) d)`` plus ``O(t N d)`` for the prefix: linear in ``N``.

The far groups' sums come from an integral image of the patch keys and values (cell sum minus the sum of its
intersection with the window's near field, four look-ups each), so no ``N x N`` or per-token gather is formed.
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

from typing import Any, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..layout import TokenLayout, is_concrete, is_tracing
from ..pooling import _sym_min
from .base import Mixer
from .cbsa_explicit import _without_autocast, compute_dtype
from .registry import register_variant

# under torch.fx, q.dtype is a graph value: compute_dtype becomes a node of the graph, not a Python branch
torch.fx.wrap("compute_dtype")

#: the logit of an empty group (a padded cell, a far cell wholly inside the near field): exp() of it is 0
MASKED = -1e30


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive int, got {value!r}")
    return value


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


def _integral(x: torch.Tensor) -> torch.Tensor:
    """``B x H x h x w x d`` -> its integral image ``B x H x (h+1) x (w+1) x d`` (``S[r, c]``: sum over ``< r, < c``)."""
    return F.pad(x.cumsum(2).cumsum(3), (0, 0, 1, 0, 1, 0))


def _rect(S: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Sums over the rectangles ``[r0, r1) x [c0, c1)`` (index tensors broadcast together) from an integral image."""
    return S[:, :, r1, c1] - S[:, :, r0, c1] - S[:, :, r1, c0] + S[:, :, r0, c0]


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
        _positive("window", window)
        _positive("fine_pool", fine_pool)
        if window % fine_pool:
            raise UsageError(f"fine_pool={fine_pool} must divide window={window} (the near field's cells tile the "
                             f"windows); use e.g. window={window - window % fine_pool or fine_pool}")

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
        if is_tracing(q):
            return self._mix(q.to(work), k.to(work), v.to(work), layout).to(q.dtype)
        with _without_autocast(q.device.type):
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
        def near(x: torch.Tensor) -> torch.Tensor:  # n0 n1 hw e -> n0 n1 nbh nbw (2 halo + 1)^2 c^2 e (cell sums)
            x = windows(x)
            x = x.reshape(x.shape[0], x.shape[1], nbh, nbw, c * c, f * f, x.shape[-1]).sum(-2)
            if not self.halo:
                return x
            x = F.pad(x, (0, 0, 0, 0, self.halo, self.halo, self.halo, self.halo))  # empty windows around the grid
            span = 2 * self.halo + 1
            return torch.cat([x[:, :, i:i + nbh, j:j + nbw] for i in range(span) for j in range(span)], dim=-2)

        near_n = near(qs.new_ones(1, 1, h * w, 1))[0, 0, ..., 0]  # nbh nbw L_near: tokens in each cell
        kx, vx = k[:, :, t:], v[:, :, t:]
        keys, values, sizes = [near(kx)], [near(vx)], [near_n]

        if self.far_field:  # the rest of each coarse cell: cell sum minus its intersection with the near field
            gh, gw = _sym_min(self.far_grid[0], h), _sym_min(self.far_grid[1], w)
            er, ec = _edges(h, gh, qs), _edges(w, gw, qs)
            blk_h = torch.arange(nbh, device=qs.device)
            blk_w = torch.arange(nbw, device=qs.device)
            lo_h = ((blk_h - self.halo) * b).clamp(min=0)[:, None]  # near rows of each window row: [lo, hi)
            hi_h = torch.minimum(((blk_h + 1 + self.halo) * b)[:, None], er[-1:])
            lo_w = ((blk_w - self.halo) * b).clamp(min=0)[:, None]
            hi_w = torch.minimum(((blk_w + 1 + self.halo) * b)[:, None], ec[-1:])
            a_h = torch.maximum(er[None, :-1], lo_h)  # nbh x gh: intersection rows [a_h, z_h)
            z_h = torch.maximum(a_h, torch.minimum(er[None, 1:], hi_h))
            a_w = torch.maximum(ec[None, :-1], lo_w)
            z_w = torch.maximum(a_w, torch.minimum(ec[None, 1:], hi_w))
            cell_n = (er[1:] - er[:-1])[:, None] * (ec[1:] - ec[:-1])[None, :]  # gh x gw
            inter_n = (z_h - a_h)[:, None, :, None] * (z_w - a_w)[None, :, None, :]  # nbh nbw gh gw
            far_n = (cell_n - inter_n).reshape(nbh, nbw, gh * gw).to(qs.dtype)
            rows = (er[:-1][:, None], er[1:][:, None], ec[:-1][None, :], ec[1:][None, :])
            inter = (a_h[:, None, :, None], z_h[:, None, :, None], a_w[None, :, None, :], z_w[None, :, None, :])
            for x, width, out in ((kx, d, keys), (vx, dv, values)):
                S = _integral(x.reshape(B, H, h, w, width))
                rest = _rect(S, *rows)[:, :, None, None] - _rect(S, *inter)  # B H nbh nbw gh gw e
                out.append(rest.reshape(B, H, nbh, nbw, gh * gw, width))
            sizes.append(far_n)

        n = torch.cat(sizes, dim=-1)  # nbh nbw L (patch groups)
        mean = n.clamp(min=1)[..., None]
        kg = torch.cat(keys, dim=-2) / mean
        vg = torch.cat(values, dim=-2) / mean
        # prefix keys: one group each, size bias beta log 1 = 0; shared by every window
        kp = k[:, :, :t][:, :, None, None].expand(B, H, nbh, nbw, t, d)
        vp = v[:, :, :t][:, :, None, None].expand(B, H, nbh, nbw, t, dv)
        kg, vg = torch.cat([kp, kg], dim=-2), torch.cat([vp, vg], dim=-2)
        bias = torch.cat([torch.zeros(1, H, nbh, nbw, t, dtype=qs.dtype, device=qs.device),
                          _log_size(n[None, None], beta).expand(1, H, nbh, nbw, n.shape[-1])], dim=-1)
        attn = torch.softmax(qb @ kg.transpose(-2, -1) + bias[..., None, :], dim=-1)  # B H nbh nbw b^2 (t+L)
        out = (attn @ vg).reshape(B, H, nbh * nbw * b * b, dv)  # window order
        return out.index_select(2, scatter)


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
        _positive("window", window)

    @classmethod
    def from_options(cls, num_heads: int, head_dim: int, *, scale: Optional[float] = None, window: int = 8,
                     **_: Any) -> "WindowMixer":
        """The mixer of one layer: only ``window`` applies."""
        return cls(num_heads, head_dim, window=window, scale=scale)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"


__all__ = ["MASKED", "MultiscaleMixer", "WindowMixer"]
