"""Hook-based capture of what every attention layer sees, for original and converted models alike.

:class:`AttentionCapture` registers, for the selected attention layers only and only while the
``with`` block is open,

* a forward pre-hook on the attention module: its input tokens ``X`` (``B x N x D``, after the
  block's norm);
* for a converted layer, a forward pre-hook and a forward hook on its mixer: the ``q, k, v``
  the mixer received (``B x H x N x d``) and its output;
* a forward hook on the patch embedding: the patch grid of the input.

Nothing in the model is changed and no attention is recomputed during the forward pass. For an
original (softmax) layer, ``q, k, v`` are computed on demand from the captured ``X`` with the
layer's own projections (through its adapter's :meth:`~vit2cbsa.adapters.ConvertedAttention.project`,
so q/k norms and biases are applied exactly as the converted layer would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..adapters import ConvertedAttention, find_adapter
from ..layout import TokenLayout
from ..modeling import LayerSelector as LayerSpec
from ..modeling import PatchGridWatch, attention_layers, model_output, select_layers


def layer_kind(module: nn.Module) -> str:
    """``softmax`` for an original layer, else the name of the converted layer's mixer (``cbsa``, ...)."""
    if isinstance(module, ConvertedAttention):
        return getattr(module.mixer, "name", None) or type(module.mixer).__name__
    return "softmax"


def _num_heads(module: nn.Module) -> int:
    if isinstance(module, ConvertedAttention):
        return module.num_heads
    adapter = find_adapter(module)
    return adapter.describe(module).num_heads


@dataclass
class LayerRecord:
    """What one attention layer saw in the last forward pass."""

    index: int
    name: str
    module: nn.Module
    kind: str
    num_heads: int
    x: Optional[torch.Tensor] = None  # B x N x D input tokens
    grid: Optional[Tuple[int, int]] = None  # patch grid (h, w)
    mixer_out: Optional[torch.Tensor] = None  # converted layers: B x H x N x d
    _qkv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    @property
    def converted(self) -> bool:
        return isinstance(self.module, ConvertedAttention)

    @property
    def mixer(self) -> Optional[nn.Module]:
        """The converted layer's mixer (a :class:`~vit2cbsa.attention.Mixer`), ``None`` for an original layer."""
        return self.module.mixer if self.converted else None

    @property
    def layout(self) -> TokenLayout:
        """The token layout of the captured input (its patch grid)."""
        return TokenLayout(self.grid)

    @property
    def prefix(self) -> int:
        """Number of prefix tokens (class, distillation, register) before the patch grid."""
        return self.x.shape[1] - self.grid[0] * self.grid[1]

    @property
    def scale(self) -> float:
        """Attention scale of the layer (the mixer's for converted layers)."""
        if self.converted:
            return float(getattr(self.module.mixer, "scale", self.module.head_dim ** -0.5))
        return find_adapter(self.module).describe(self.module).scale

    def qkv(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` (``B x H x N x d``): captured from the mixer, or projected from ``x`` for an original layer."""
        if self._qkv is None:
            if self.x is None:
                raise RuntimeError(f"layer {self.index} ({self.name}) did not run in the captured forward pass")
            adapter = find_adapter(self.module)
            projector = adapter.build(self.module, nn.Identity(), TokenLayout(self.grid))
            with torch.no_grad():
                self._qkv = tuple(t.detach() for t in projector.project(self.x))
        return self._qkv

    q = property(lambda self: self.qkv()[0])
    k = property(lambda self: self.qkv()[1])
    v = property(lambda self: self.qkv()[2])


class AttentionCapture:
    """Context manager capturing the inputs (and mixer inputs/outputs) of selected attention layers.

    Example::

        with AttentionCapture(model, layers=[-1]) as cap:
            logits = cap.run(pixel_values)
        rec = cap.records[0]            # rec.x, rec.q, rec.k, rec.grid, rec.module
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = None) -> None:
        self.model = model
        all_layers = attention_layers(model)
        self.indices = select_layers(layers, all_layers)
        self.num_layers = len(all_layers)
        self.records: List[LayerRecord] = []
        for i in self.indices:
            name, module = all_layers[i]
            self.records.append(LayerRecord(i, name, module, layer_kind(module), _num_heads(module)))
        self._watch = PatchGridWatch(model)
        self._handles: list = []

    # hooks -------------------------------------------------------------------------------
    @property
    def _grid(self) -> Optional[Tuple[int, int]]:
        grid = self._watch.grid
        return None if grid is None else (int(grid[0]), int(grid[1]))

    def _input_hook(self, rec: LayerRecord):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            rec.x = x.detach()
            rec.grid = self._grid
            rec._qkv = None
        return hook

    def _mixer_pre_hook(self, rec: LayerRecord):
        def hook(module, args):
            rec._qkv = tuple(t.detach() for t in args[:3])
        return hook

    def _mixer_hook(self, rec: LayerRecord):
        def hook(module, args, output):
            rec.mixer_out = output.detach()
        return hook

    def __enter__(self) -> "AttentionCapture":
        self._watch.__enter__()
        for rec in self.records:
            self._handles.append(rec.module.register_forward_pre_hook(self._input_hook(rec), with_kwargs=True))
            if rec.converted:
                self._handles.append(rec.module.mixer.register_forward_pre_hook(self._mixer_pre_hook(rec)))
                self._handles.append(rec.module.mixer.register_forward_hook(self._mixer_hook(rec)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        self._watch.__exit__()
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def run(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the model on ``pixel_values`` (no gradients) and return its logits/features."""
        return model_output(self.model, pixel_values)
