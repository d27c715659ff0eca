"""Contraction-free CBSA (Agent-Attention-like) for a pretrained softmax-attention layer.

CBSA with step 3 removed: representatives are extracted and broadcast back unchanged.
Per head (``s = d^-1/2``, the first ``t`` tokens are prefix tokens)::

    P   = pool(Q[t:])                                  m x d
    A   = softmax(s P K^T);   K_r = A K,  V_r = A V    m x d
    out = kappa * softmax(s Q K_r^T) V_r               broadcast="key" (default)
    out = kappa * softmax(s Q P^T)   V_r               broadcast="query": Agent Attention with
                                                       pooled agents (the paper's adaptation code,
                                                       but pooling only patch tokens)
    out = kappa * (A^T / A^T 1)      V_r               broadcast="transpose"

``kappa`` is a learnable per-head step size (unconstrained sign, initialised to 1).
Cost per head ``O(N m d)``. The whole layer is ``out = kappa E V`` with ``E = B A`` (``B``: the broadcast
weights above), row-stochastic.
"""

from __future__ import annotations

from .cbsa import CBSAMixer
from .registry import register_variant


@register_variant
class ContractionFreeMixer(CBSAMixer):
    """:class:`CBSAMixer` without the contraction among representatives: ``E = B A``."""

    name = "contraction_free"
    description = "CBSA, no contraction"
    formula = "E = BA"
    contraction = False
