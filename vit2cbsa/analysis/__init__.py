"""Interpretability analysis of original and converted ViTs (paper Figs. 4-6 and 8).

* :mod:`.coding_rate` -- coding rate ``R(W) = 1/2 logdet(I + p/(N eps^2) W^T W)``, the compression
  term ``sum_k R(X U_k)`` of the tokens entering each attention layer and of a converted layer's
  representatives (:func:`layer_coding_rates`).
* :mod:`.capture` -- hook-based capture of attention inputs and mixer ``q, k, v`` (:class:`AttentionCapture`).
* :mod:`.maps` -- every layer's token-to-token operator ``E`` (``out = kappa E V``, :func:`attention_operator`)
  and, for representative variants, ``A`` (representative <- token) and ``B`` (token <- representative)
  (:func:`cbsa_maps`), all from the mixer's own forward steps; class-token maps per layer (:func:`explain`).
* :mod:`.figures` -- the ``explain`` figure of those maps (:func:`plot_explanation`).
* :mod:`.robustness` -- accuracy under Gaussian noise on the attention projections (:func:`robustness_curve`).
* :mod:`.synthetic` -- the parameter-free linear variant of CBSA compressing a union of subspaces.
``vit2cbsa explain MODEL IMAGE`` (the command line, not part of this package) is :mod:`vit2cbsa.cli.explain`.
"""

from ..attention import CBSAMaps
from ..errors import ImageError, LayerError
from ..modeling import attention_layers
from .capture import AttentionCapture, LayerRecord
from .coding_rate import (
    coding_rate,
    compression_term,
    head_bases,
    layer_coding_rates,
    logdet_spd,
    representative_rate,
)
from .figures import plot_explanation
from .images import InputConfig, input_config, load_image, preprocess
from .maps import LayerMaps, attention_operator, cbsa_maps, explain, layer_maps
from .robustness import attention_projection_weights, perturbed, plot_robustness, robustness_curve
from .synthetic import compress_synthetic, linear_cbsa_step, plot_synthetic, union_of_subspaces

__all__ = [
    "AttentionCapture",
    "CBSAMaps",
    "ImageError",
    "InputConfig",
    "LayerError",
    "LayerMaps",
    "LayerRecord",
    "attention_layers",
    "attention_operator",
    "attention_projection_weights",
    "cbsa_maps",
    "coding_rate",
    "compress_synthetic",
    "compression_term",
    "explain",
    "head_bases",
    "input_config",
    "layer_coding_rates",
    "layer_maps",
    "linear_cbsa_step",
    "load_image",
    "logdet_spd",
    "perturbed",
    "plot_explanation",
    "plot_robustness",
    "plot_synthetic",
    "preprocess",
    "representative_rate",
    "robustness_curve",
    "union_of_subspaces",
]
