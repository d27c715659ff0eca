"""Token layout of a ViT sequence: the patch grid recorded from the patch embedding, the prefix tokens derived.

A ViT attention layer sees ``N = t + h * w`` tokens: ``t`` prefix tokens (class,
distillation, register tokens) followed by the ``h x w`` patch grid in row-major order.
The grid is never guessed from ``N`` (no ``int(sqrt(N))``): the model's patch-embedding
convolution records the grid of the *actual* input, its output's spatial shape, and each
converted attention layer reads it and derives ``t = N - h * w``.

Traced, the grid is data of the traced program, never a constant of the trace. In eager
execution (and under ``torch.compile``) a forward hook (:class:`GridRecorder`) records Python
ints. Under ``torch.export`` the hook runs too and keeps the sizes symbolic (``SymInt``): the
exported program computes ``h, w`` from its input's shape. Under ``torch.fx`` symbolic tracing
a ``torch.nn`` convolution is a leaf whose hooks never run, so the convolution's class is swapped
to :class:`GridConv2d` (no leaf; same parameters, names and computation), which records the grid
as graph values (``Proxy``) computed from its input's shape. Every size that
is not a Python int takes a branch-free path (:func:`is_concrete`): no Python ``if`` on it, the
clamp to the patch grid as ``sym_min``, pooling as two separable window matrices built from the
sizes (:func:`pool_patches`), and the prefix tokens always concatenated, even when there are none.

The pooling of the patch tokens into representatives is in :mod:`vit2cbsa.pooling`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.fx
from torch import nn

GridLike = Union[int, Tuple[int, int]]

#: choices of extra representatives next to the pooled grid (module docstring)
EXTRA_REPRESENTATIVES = ("prefix", "global", "none")


def as_grid(num_representatives: GridLike) -> Tuple[int, int]:
    """Normalise ``num_representatives`` (a square count such as 64, or ``(gh, gw)``) to a grid.

    Raises ``ValueError`` for non-positive values or a count that is not a perfect square.
    """
    if isinstance(num_representatives, bool):
        raise TypeError("num_representatives must be an int or an (h, w) tuple, not a bool")
    if isinstance(num_representatives, int):
        if num_representatives <= 0:
            raise ValueError(
                f"num_representatives must be positive, got {num_representatives}; "
                "use e.g. 64 (an 8x8 grid) or a tuple such as (4, 8)"
            )
        side = int(round(num_representatives ** 0.5))
        if side * side != num_representatives:
            raise ValueError(
                f"num_representatives={num_representatives} is not a square number, so it cannot be "
                f"laid out as a square grid; pass an (h, w) tuple instead, e.g. "
                f"({_near_factor(num_representatives)}, {num_representatives // _near_factor(num_representatives)})"
            )
        return side, side
    if isinstance(num_representatives, (tuple, list)) and len(num_representatives) == 2:
        gh, gw = num_representatives
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (gh, gw)):
            raise TypeError(f"representative grid must hold two ints, got {num_representatives!r}")
        if gh <= 0 or gw <= 0:
            raise ValueError(f"representative grid must be positive, got {tuple(num_representatives)}")
        return int(gh), int(gw)
    raise TypeError(
        f"num_representatives must be an int (e.g. 64) or an (h, w) tuple, got {num_representatives!r}"
    )


def _near_factor(n: int) -> int:
    best = 1
    for f in range(1, int(n ** 0.5) + 1):
        if n % f == 0:
            best = f
    return best


def is_concrete(*sizes) -> bool:
    """True when every size is a Python int: eager execution, ``torch.compile``, or a static export. Otherwise
    (``SymInt`` under ``torch.export`` with dynamic shapes, ``torch.fx.Proxy`` under fx tracing) the code takes its
    branch-free path, so that the traced program holds for every grid, not just the one traced."""
    for size in sizes:
        if not isinstance(size, int):
            return False
    return True


def is_tracing(x: torch.Tensor) -> bool:
    """True while ``x`` is traced by ``torch.fx`` (a ``Proxy``) or ``torch.export``: the converted layers then
    run their autograd-traceable forward (inference, or training through the traced program's autograd)."""
    return isinstance(x, torch.fx.Proxy) or torch.compiler.is_exporting()


class TokenLayout:
    """Where the patch grid of the current forward pass lives; shared by all converted layers.

    ``grid`` is set from the patch-embedding output on every forward pass (:class:`GridRecorder`, or
    :class:`GridConv2d` under fx tracing), or by :meth:`use_grid` for callers that run attention layers
    on their own. While a model is traced it holds the tracer's sizes (``SymInt`` / ``Proxy``); copies
    and pickles of the layout keep only a concrete grid.
    """

    def __init__(self, grid: Optional[Tuple[int, int]] = None) -> None:
        self.grid = grid
        #: prefix tokens of the model, learnt from the first sequence split: a later sequence with another count
        #: means the grid was not recorded for it (a patch embedding replaced after conversion)
        self.num_prefix: Optional[int] = None

    def use_grid(self, grid: Tuple[int, int]) -> "TokenLayout":
        """Set the patch grid explicitly (for running converted blocks without the model)."""
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix = None
        return self

    def record(self, feature_map: torch.Tensor) -> None:
        """Set the grid from the patch embedding's ``B x C x h x w`` output (its last two sizes, as they come:
        ints, or the tracer's symbolic sizes under ``torch.export`` / ``torch.fx``). Under ``torch.compile`` the
        sizes are specialised to ints, one graph per grid, as the eager path branches on them."""
        h, w = feature_map.shape[-2], feature_map.shape[-1]
        if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
            if not torch.compiler.is_exporting():
                h, w = int(h), int(w)
        self.grid = (h, w)

    def split(self, num_tokens: int) -> Tuple[int, int, int]:
        """Return ``(num_prefix, h, w)`` for a sequence of ``num_tokens`` tokens."""
        grid = self.grid
        if grid is None:
            raise ValueError(
                "vit2cbsa: the patch grid of this input is unknown. Converted attention layers read it "
                "from the model's patch embedding, so call the whole model (not a block on its own), "
                "or set it explicitly with `vit2cbsa.layout_of(model).use_grid((h, w))`."
            )
        h, w = grid[0], grid[1]
        prefix = num_tokens - h * w
        if isinstance(prefix, int):
            if prefix < 0:
                raise ValueError(_merged_tokens_message(num_tokens, h, w))
            if self.num_prefix is None:
                self.num_prefix = prefix
            elif prefix != self.num_prefix:
                raise ValueError(
                    f"vit2cbsa: attention received {num_tokens} tokens, {prefix} more than the {h}x{w} patch grid "
                    f"last recorded, but this model has {self.num_prefix} prefix tokens: the patch grid of this input "
                    "was not recorded. Was the patch embedding replaced after conversion (e.g. timm "
                    "set_input_size(patch_size=...))? Change the patch size before converting."
                )
        elif isinstance(prefix, torch.SymInt):  # torch.export: a runtime assertion where it is not decided
            torch._check(prefix >= 0, lambda: _merged_tokens_message(num_tokens, h, w))
        else:  # torch.fx: an assertion node of the traced graph
            torch._assert(prefix >= 0, "vit2cbsa: attention received fewer tokens than the patch grid has "
                                       "patches (token merging/pooling is not supported)")
        return prefix, h, w

    def __getstate__(self) -> dict:
        grid = self.grid
        return {"grid": grid if grid is not None and is_concrete(*grid) else None, "num_prefix": self.num_prefix}

    def __setstate__(self, state: dict) -> None:
        self.grid = state.get("grid")
        self.num_prefix = state.get("num_prefix")

    def __repr__(self) -> str:
        return f"TokenLayout(grid={self.grid})"


def _merged_tokens_message(num_tokens, h, w) -> str:
    return (f"vit2cbsa: attention received {num_tokens} tokens but the patch grid is {h}x{w} = {h * w} "
            "patches; this model changes the token count between the patch embedding and attention "
            "(token merging/pooling), which converted layers do not support.")


class GridRecorder:
    """Forward hook for a patch-embedding ``Conv2d``: records its output's spatial size."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if isinstance(output, torch.fx.Proxy):  # fx tracing: GridConv2d records (hooks of fx leaf modules never run)
            return
        if output.dim() == 4:
            self.layout.record(output)


class GridConv2d(nn.Conv2d):
    """The patch-embedding ``nn.Conv2d`` of a converted model (:func:`vit2cbsa.convert` swaps its class; the
    parameters, their names and the computation are the convolution's own).

    Under ``torch.fx`` symbolic tracing, where the forward hooks of leaf modules (``torch.nn`` modules) never run,
    it records the grid in the layout as graph values, so that the traced graph computes each input's grid: fx
    traces through it (it is no ``torch.nn`` leaf) and records its ``conv2d``. The grid is computed from the input's
    shape before the convolution, so the ``conv2d`` stays the module's last node (``return_nodes=["...proj"]`` of
    ``create_feature_extractor`` still returns the convolution's output). Otherwise the :class:`GridRecorder`
    hook records."""

    _vit2cbsa_layout: Optional[TokenLayout] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy) and self._vit2cbsa_layout is not None:
            self._vit2cbsa_layout.grid = (self._output_size(input, 0), self._output_size(input, 1))
        return self._conv_forward(input, self.weight, self.bias)

    def _output_size(self, input, axis: int):
        """The output size along spatial ``axis`` of an input (``nn.Conv2d``'s formula; padding modes other than
        zeros pad by the same amounts)."""
        size = input.shape[axis - 2]
        pad = 0 if self.padding == "valid" else self.padding[axis]  # "same" needs stride 1: never a patch embedding
        span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
        return (size + 2 * pad - span) // self.stride[axis] + 1
