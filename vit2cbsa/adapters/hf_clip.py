"""Adapter for the vision towers of Hugging Face CLIP and SigLIP.

Same q/k/v projections as :mod:`vit2cbsa.adapters.hf_vit`, output Linear named ``out_proj``.
CLIP and SigLIP share their attention class between the text and the vision tower; only
modules whose config is a vision config are converted (text attention is causal or masked
and has no patch grid). SigLIP's attention-pooling head (``nn.MultiheadAttention``, one
probe query) is left as it is. Converted: ``out = out_proj(merge(mixer(Q, K, V)))``.
"""

from __future__ import annotations

from torch import nn

from .hf_vit import HFQKVOAdapter


class HFVisionTowerAdapter(HFQKVOAdapter):
    def matches(self, module: nn.Module) -> bool:
        config = getattr(module, "config", None)
        return super().matches(module) and type(config).__name__.endswith("VisionConfig")


HF_CLIP = HFVisionTowerAdapter(
    "hf_clip",
    [
        "transformers.models.clip.modeling_clip.CLIPAttention",
        "transformers.models.siglip.modeling_siglip.SiglipAttention",
    ],
    out_name="out_proj",
)
