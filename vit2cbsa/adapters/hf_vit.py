"""Adapter for Hugging Face ViT-style encoders: ViT, DeiT, DINOv2, DINOv2 with registers.

transformers (>= 5) gives these models one attention module with separate ``q_proj``,
``k_proj``, ``v_proj`` Linears and an output Linear (``o_proj`` here, ``out_proj`` in the
CLIP family, see :mod:`vit2cbsa.adapters.hf_clip`); it is called as
``attn(hidden_states, attention_mask, **kwargs)`` and returns ``(output, weights)``.
Converted: ``out = o_proj(merge(mixer(Q, K, V)))``, weights returned as ``None``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..layout import TokenLayout
from .base import Adapter, AttentionSpec, ConvertedAttention, refuse_masks


class HFConvertedAttention(ConvertedAttention):
    """Drop-in replacement for a transformers attention module with q/k/v/out Linears."""

    family = "hf"

    def __init__(self, orig: nn.Module, spec: AttentionSpec, mixer: nn.Module, layout: TokenLayout, out_name: str) -> None:
        super().__init__(spec, mixer, layout)
        self.config = getattr(orig, "config", None)
        self.q_proj, self.k_proj, self.v_proj = orig.q_proj, orig.k_proj, orig.v_proj
        self.out_name = out_name
        self.add_module(out_name, getattr(orig, out_name))

    def project(self, x: torch.Tensor):
        return self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *args, **kwargs) -> Tuple[torch.Tensor, None]:
        refuse_masks(attention_mask)
        return getattr(self, self.out_name)(self.mix(hidden_states)), None


def _resolve(path: str):
    """The class at ``path`` if its module is already imported, else ``None``.

    A model of a class whose module was never imported cannot exist, so nothing is imported
    here (importing every transformers model family would cost seconds per process).
    """
    module, _, name = path.rpartition(".")
    return getattr(sys.modules.get(module), name, None)


class HFQKVOAdapter(Adapter):
    """Adapter for transformers attention classes with ``q_proj/k_proj/v_proj`` and an output Linear."""

    def __init__(self, name: str, class_paths: Sequence[str], out_name: str) -> None:
        self.name = name
        self.class_paths = tuple(class_paths)
        self.out_name = out_name

    @property
    def classes(self) -> tuple:
        return tuple(c for c in map(_resolve, self.class_paths) if c is not None)

    def matches(self, module: nn.Module) -> bool:
        return type(module) in self.classes

    def describe(self, module: nn.Module) -> AttentionSpec:
        num_heads = getattr(module, "num_attention_heads", None) or module.num_heads
        scale = getattr(module, "scaling", None) or getattr(module, "scale", None) or module.head_dim ** -0.5
        return AttentionSpec(self.name, module.q_proj.in_features, int(num_heads), int(module.head_dim), float(scale))

    def build(self, module: nn.Module, mixer: nn.Module, layout: TokenLayout) -> ConvertedAttention:
        return HFConvertedAttention(module, self.describe(module), mixer, layout, self.out_name)


HF_VIT = HFQKVOAdapter(
    "hf_vit",
    [
        "transformers.models.vit.modeling_vit.ViTAttention",
        "transformers.models.deit.modeling_deit.DeiTAttention",
        "transformers.models.dinov2.modeling_dinov2.Dinov2Attention",
        "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersAttention",
    ],
    out_name="o_proj",
)
