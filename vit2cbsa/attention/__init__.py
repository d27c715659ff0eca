"""Attention variants: token mixers for converted layers, and the pure CBSA layer of the paper."""

from __future__ import annotations

from typing import Dict, Tuple, Type

from torch import nn

from .cbsa import BROADCASTS, PREFIX_BROADCASTS, CBSAMixer
from .cbsa_layer import CBSA
from .contraction_free import ContractionFreeMixer
from .linear import LinearMixer

VARIANTS: Dict[str, Type[nn.Module]] = {
    "cbsa": CBSAMixer,
    "contraction_free": ContractionFreeMixer,
    "linear": LinearMixer,
}


def build_mixer(variant: str, num_heads: int, head_dim: int, rep_grid: Tuple[int, int], broadcast: str,
                scale: float | None = None, extra_representatives: str = "none",
                prefix_broadcast: str = "all") -> nn.Module:
    """Instantiate the token mixer of ``variant`` for one layer."""
    if variant == "linear":
        return LinearMixer(num_heads, head_dim)
    return VARIANTS[variant](num_heads, head_dim, rep_grid, broadcast=broadcast, scale=scale,
                             extra_representatives=extra_representatives, prefix_broadcast=prefix_broadcast)


__all__ = ["BROADCASTS", "PREFIX_BROADCASTS", "CBSA", "CBSAMixer", "ContractionFreeMixer", "LinearMixer", "VARIANTS", "build_mixer"]
