"""Attention variants: token mixers for converted layers (registered by name), and the pure CBSA layer of the paper.

* :mod:`.base` -- :class:`Mixer`, the interface of every variant (``forward``, and ``operator`` / ``maps`` for
  analysis: ``context = kappa E V``), and :class:`CBSAMaps`, the steps of a representative variant;
* :mod:`.registry` -- :data:`VARIANTS` (name -> class), :func:`register_variant`, :func:`build_mixer`;
* :mod:`.cbsa` (``"cbsa"``), :mod:`.contraction_free` (``"contraction_free"``), :mod:`.linear` (``"linear"``),
  :mod:`.multiscale` (``"multiscale"``, the dense-features variant, and ``"window"``, ViTDet's windowed attention):
  the built-in variants, each registering itself; :mod:`.cbsa_explicit`: CBSA's forward steps and backward pass;
* :mod:`.cbsa_layer` -- :class:`CBSA`, the paper's layer (eqs. 5-8) for building a model from scratch.
"""

from __future__ import annotations

from .base import CBSAMaps, Mixer
from .cbsa import BROADCASTS, PREFIX_BROADCASTS, CBSAMixer
from .cbsa_layer import CBSA
from .contraction_free import ContractionFreeMixer
from .linear import LinearMixer
from .multiscale import MultiscaleMixer, WindowMixer
from .registry import VARIANTS, build_mixer, register_variant, unregister_variant, variant_uses_representatives

__all__ = ["BROADCASTS", "PREFIX_BROADCASTS", "CBSA", "CBSAMaps", "CBSAMixer", "ContractionFreeMixer", "LinearMixer",
           "Mixer", "MultiscaleMixer", "WindowMixer", "VARIANTS", "build_mixer", "register_variant", "unregister_variant",
           "variant_uses_representatives"]
