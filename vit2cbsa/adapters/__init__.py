"""Registry of model-family adapters. Adding a ViT family = adding an adapter file and one line here.

The adapter is the one place that knows a family: which attention modules it converts (:meth:`Adapter.matches`),
their shape (:meth:`Adapter.describe`), their replacement (:meth:`Adapter.build`) and the names of their q/k/v/output
projections (:attr:`Adapter.projections`), from which LoRA's default targets (:func:`lora_target_modules`) and the
robustness analysis' perturbed weights (:func:`projection_modules`) are derived.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from torch import nn

from .base import Adapter, AttentionSpec, ConvertedAttention
from .hf_clip import HF_CLIP
from .hf_vit import HF_VIT
from .timm_vit import TimmViTAdapter

ADAPTERS: List[Adapter] = [TimmViTAdapter(), HF_VIT, HF_CLIP]


def register_adapter(adapter: Adapter) -> None:
    """Add an adapter for a new model family (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def find_adapter(module: nn.Module) -> Optional[Adapter]:
    """The adapter that can convert ``module``, or ``None``."""
    for adapter in ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None


def adapter_of(module: nn.Module) -> Optional[Adapter]:
    """The adapter of an attention module, converted (the adapter that built it) or not (the one that matches it)."""
    if isinstance(module, ConvertedAttention):
        return next((a for a in ADAPTERS if a.name == module.spec.family), None)
    return find_adapter(module)


def _projections_by_layer(model: nn.Module) -> List[Tuple[str, Adapter, List[Tuple[str, nn.Linear]]]]:
    """``(layer name, its adapter, [(full name, Linear)])`` for every attention layer with projections, in block
    order."""
    out = []
    for name, module in model.named_modules():
        adapter = adapter_of(module)
        if adapter is None:
            continue
        linears = [(f"{name}.{child}" if name else child, lin) for child in adapter.projections
                   if isinstance(lin := getattr(module, child, None), nn.Linear)]
        if linears:
            out.append((name, adapter, linears))
    return out


def projection_modules(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """``(full name, Linear)`` of the q/k/v/output projections of every attention layer of ``model`` (converted or
    not), in block order, as each layer's adapter names them."""
    return [pair for _, _, linears in _projections_by_layer(model) for pair in linears]


def lora_target_modules(model: nn.Module) -> Optional[str]:
    """A regular expression for PEFT's ``LoraConfig(target_modules=...)`` (matched with ``re.fullmatch`` against
    module names) selecting exactly the attention projections of :func:`projection_modules`; ``None`` if the model
    has none. Per adapter: ``(?:<attention layer names>)\\.(?:<its projection names>)``."""
    layers: Dict[Tuple[str, ...], List[str]] = {}
    for name, adapter, _ in _projections_by_layer(model):
        layers.setdefault(adapter.projections, []).append(name)
    if not layers:
        return None
    parts = [rf"(?:{'|'.join(map(re.escape, parents))})\.(?:{'|'.join(map(re.escape, projs))})"
             for projs, parents in layers.items()]
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


__all__ = ["ADAPTERS", "Adapter", "AttentionSpec", "ConvertedAttention", "adapter_of", "find_adapter",
           "lora_target_modules", "projection_modules", "register_adapter"]
