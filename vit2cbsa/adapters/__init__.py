"""Registry of model-family adapters. Adding a ViT family = adding an adapter file and one line here."""

from __future__ import annotations

from typing import List, Optional

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


__all__ = ["ADAPTERS", "Adapter", "AttentionSpec", "ConvertedAttention", "find_adapter", "register_adapter"]
