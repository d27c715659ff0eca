"""Adapter for Hugging Face ViT-style encoders: ViT, DeiT, DINOv2, DINOv2 with registers.

transformers (>= 5) gives these models one attention module with separate ``q_proj``,
``k_proj``, ``v_proj`` Linears and an output Linear (``o_proj`` here, ``out_proj`` in the
CLIP family, see :mod:`vit2cbsa.adapters.hf_clip`); it is called as
``attn(hidden_states, attention_mask, **kwargs)`` and returns ``(output, weights)``.
Converted: ``out = o_proj(merge(mixer(Q, K, V)))``, weights returned as ``None``.
"""

from __future__ import annotations

import inspect
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


#: ``forward`` parameters a plain self-attention module may take (anything else -- rotary ``position_embeddings``,
#: a cross-attention ``key_value_states``, ``query, key, value`` -- means it computes something converted layers do not)
_PLAIN_FORWARD_PARAMS = {"self", "hidden_states", "attention_mask", "causal_attention_mask", "head_mask",
                         "output_attentions", "kwargs", "args"}


def _plain_forward(module: nn.Module) -> bool:
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return set(params) <= _PLAIN_FORWARD_PARAMS


def _vision_config(config: object) -> bool:
    """A vision config: it has an image and a patch size (a text config of a shared CLIP-style class has neither)."""
    return config is not None and hasattr(config, "image_size") and hasattr(config, "patch_size")


class HFQKVOAdapter(Adapter):
    """Adapter for transformers attention modules with ``q_proj/k_proj/v_proj`` Linears and an output Linear.

    Matched by class (``class_paths``, the fast path), else by structure: a transformers module whose only
    children are the four projection Linears (and dropouts), with no parameters of its own (no relative-position
    tables), a plain ``forward(hidden_states, attention_mask, **kwargs)`` (no rotary ``position_embeddings``),
    ``num_heads``/``head_dim`` attributes and a vision config. That way a new ViT copy in transformers (e.g.
    ViT-MSN, I-JEPA) converts the day it appears, while attention that adds anything to ``softmax(q k^T) v``
    is left alone."""

    def __init__(self, name: str, class_paths: Sequence[str], out_name: str) -> None:
        self.name = name
        self.class_paths = tuple(class_paths)
        self.out_name = out_name
        self.projections = ("q_proj", "k_proj", "v_proj", out_name)

    @property
    def classes(self) -> tuple:
        return tuple(c for c in map(_resolve, self.class_paths) if c is not None)

    def matches(self, module: nn.Module) -> bool:
        return type(module) in self.classes or self.matches_structure(module)

    def matches_structure(self, module: nn.Module) -> bool:
        """True for a plain q/k/v/o self-attention module of a transformers vision model (see the class docstring)."""
        if not type(module).__module__.startswith("transformers.") or not _vision_config(getattr(module, "config", None)):
            return False
        children = dict(module.named_children())
        if not all(isinstance(children.get(n), nn.Linear) for n in self.projections):
            return False
        others = [m for n, m in children.items() if n not in self.projections]
        if any(not isinstance(m, nn.Dropout) for m in others) or any(True for _ in module.parameters(recurse=False)):
            return False
        heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
        return isinstance(heads, int) and isinstance(getattr(module, "head_dim", None), int) and _plain_forward(module)

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
