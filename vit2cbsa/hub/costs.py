"""What a conversion costs: tokens, FLOPs and parameters of one image before and after, and the attention table.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` for one image (batch 1)
on deep copies of the models, so the caller's models are untouched. The counter sees matrix
multiplications, convolutions and fused attention (2 FLOPs per multiply-add), not element-wise
ops such as softmax or normalisation. Used by the model card (:mod:`vit2cbsa.hub.card`) and
``vit2cbsa inspect``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adapters import ConvertedAttention, find_adapter
from ..measure import count_flops
from ..modeling import InputSize, PatchGridWatch, forward_pixels, input_size_of


@dataclass
class CostReport:
    """Tokens, FLOPs and parameters of a model before and after conversion, for one image."""

    input_size: InputSize
    num_tokens: int
    num_prefix_tokens: int
    patch_grid: Tuple[int, int]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int

    def to_dict(self) -> Dict[str, Any]:
        """The report as JSON-ready values (lists instead of tuples)."""
        d = asdict(self)
        d["input_size"], d["patch_grid"] = list(self.input_size), list(self.patch_grid)
        return d


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _measure(model: nn.Module, input_size: InputSize) -> Tuple[int, int, Tuple[int, int]]:
    """FLOPs, tokens seen by the first attention layer, and patch grid of one forward pass."""
    model = copy.deepcopy(model).eval()
    ref = next(model.parameters())
    seen: Dict[str, Any] = {}
    attn = next(m for m in model.modules() if isinstance(m, ConvertedAttention) or find_adapter(m) is not None)

    def on_attn(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.setdefault("tokens", int(x.shape[1]))

    handle = attn.register_forward_pre_hook(on_attn, with_kwargs=True)
    pixels = torch.zeros(1, *input_size, device=ref.device, dtype=ref.dtype)
    try:
        with PatchGridWatch(model) as watch:
            flops = count_flops(forward_pixels, model, pixels)
    finally:
        handle.remove()
    return flops, seen["tokens"], tuple(int(v) for v in watch.grid)


def compare_costs(base: nn.Module, converted: nn.Module, input_size: Optional[InputSize] = None) -> CostReport:
    """Tokens, FLOPs and parameters of ``base`` (unconverted) vs ``converted`` for one image.

    ``input_size`` defaults to the converted model's own input size; both models run on copies.
    """
    input_size = tuple(input_size or input_size_of(converted))  # type: ignore[assignment]
    flops_before, tokens, grid = _measure(base, input_size)
    flops_after, _, _ = _measure(converted, input_size)
    return CostReport(input_size, tokens, tokens - grid[0] * grid[1], grid, flops_before, flops_after,
                      _param_count(base), _param_count(converted))


def human(n: float) -> str:
    """``1234567 -> '1.23 M'``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def change(before: float, after: float) -> str:
    """The relative change from ``before`` to ``after``: ``'+12.5%'`` (``'n/a'`` when ``before`` is 0)."""
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def attention_table(model: nn.Module, converted: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Every attention module an adapter recognises (or that is already converted), in block order."""
    rows = []
    for name, m in model.named_modules():
        adapter = find_adapter(m)
        if adapter is None and not isinstance(m, ConvertedAttention):
            continue
        spec = adapter.describe(m) if adapter is not None else m.spec
        rows.append({"index": len(rows), "name": name, "family": spec.family, "num_heads": spec.num_heads,
                     "head_dim": spec.head_dim, "converted": converted is not None and name in converted})
    return rows


__all__ = ["CostReport", "attention_table", "change", "compare_costs", "human"]
