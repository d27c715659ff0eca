"""Adapter for timm's ``VisionTransformer`` family (``timm.layers.Attention``).

Covers ViT, DeiT / distilled DeiT, DeiT-III, register models, DINOv2-in-timm, models without a
class token and ``dynamic_img_size=True``: all use ``Attention`` with a fused ``qkv`` Linear,
optional per-head ``q_norm``/``k_norm``, optional ``norm`` (scale-norm) and ``gate``, and ``proj``.
Converted: ``out = proj(norm(merge(mixer(q_norm(Q), k_norm(K), V))) [* sigmoid(gate(x))])``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layout import TokenLayout
from .base import Adapter, AttentionSpec, ConvertedAttention, refuse_masks


class TimmConvertedAttention(ConvertedAttention):
    """Drop-in replacement for ``timm.layers.Attention`` (same parameter names and signature)."""

    family = "timm"

    def __init__(self, orig: nn.Module, spec: AttentionSpec, mixer: nn.Module, layout: TokenLayout) -> None:
        super().__init__(spec, mixer, layout)
        self.qkv = orig.qkv
        self.q_norm = orig.q_norm
        self.k_norm = orig.k_norm
        self.norm = getattr(orig, "norm", nn.Identity())
        self.gate = getattr(orig, "gate", None)
        self.proj = orig.proj
        self.proj_drop = orig.proj_drop

    def project(self, x: torch.Tensor):
        b, n, _ = x.shape
        # views, no copies: the mixers read strided heads (matmuls take the row stride as it is)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        refuse_masks(attn_mask, is_causal)
        out = self.norm(self.mix(x))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


class TimmViTAdapter(Adapter):
    name = "timm"
    projections = ("qkv", "proj")

    def matches(self, module: nn.Module) -> bool:
        try:
            from timm.layers import Attention
        except ImportError:  # pragma: no cover - timm is a dependency
            return False
        return type(module) is Attention

    def describe(self, module: nn.Module) -> AttentionSpec:
        return AttentionSpec(
            family=self.name,
            dim=module.qkv.in_features,
            num_heads=module.num_heads,
            head_dim=module.head_dim,
            scale=float(module.scale),
        )

    def build(self, module: nn.Module, mixer: nn.Module, layout: TokenLayout) -> ConvertedAttention:
        return TimmConvertedAttention(module, self.describe(module), mixer, layout)
