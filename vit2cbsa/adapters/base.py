"""What every adapter provides, and the module that replaces a pretrained attention layer.

A converted layer computes, for input tokens ``X`` (``B x N x D``)::

    Q, K, V = heads(X W_q + b_q), heads(X W_k + b_k), heads(X W_v + b_v)   (pretrained, nn.Linear)
    out     = merge_heads(mixer(Q, K, V)) W_o + b_o                          (pretrained W_o)

where ``mixer`` is one of the variants in :mod:`vit2cbsa.attention`. Adapters subclass
:class:`ConvertedAttention` only to keep the original module's parameter names and
call signature, so pretrained weights, PEFT LoRA targets and the host model's forward
all keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from ..layout import TokenLayout


@dataclass(frozen=True)
class AttentionSpec:
    """Shape of a pretrained attention module, as read by its adapter."""

    family: str
    dim: int
    num_heads: int
    head_dim: int
    scale: float


class ConvertedAttention(nn.Module):
    """Base class of every converted attention module.

    Subclasses register the pretrained projections under their original names and
    implement :meth:`project` (``x -> q, k, v`` as ``B x H x N x d``) and ``forward``.
    """

    family: str = ""

    def __init__(self, spec: AttentionSpec, mixer: nn.Module, layout: TokenLayout) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        self.spec = spec
        self.mixer = mixer
        self.layout = layout  # shared, not a submodule

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """``B x N x (H d)`` -> ``B x H x N x d`` (a view; the mixers read strided heads)."""
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Project and mix: the merged context ``B x N x (H d)``, before the output projection."""
        q, k, v = self.project(x)
        ctx = self.mixer(q, k, v, self.layout)
        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def new_parameters(self):
        """The parameters the conversion added (step sizes, feature maps): what alignment trains."""
        return list(self.mixer.parameters())


class Adapter:
    """One model family: recognises its attention modules and builds their replacements."""

    #: short name used in summaries and saved configs
    name: str = ""

    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` is an attention module of this family that can be converted."""
        raise NotImplementedError

    def describe(self, module: nn.Module) -> AttentionSpec:
        raise NotImplementedError

    def build(self, module: nn.Module, mixer: nn.Module, layout: TokenLayout) -> ConvertedAttention:
        """Return the replacement for ``module``, sharing its pretrained projection layers."""
        raise NotImplementedError
