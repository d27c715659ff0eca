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
from typing import Any, Optional, Tuple

import torch
import torch.fx
from torch import nn

from ..layout import TokenLayout

#: what ``torch.jit.script`` of a converted model raises (:meth:`ConvertedAttention.__prepare_scriptable__`)
TORCHSCRIPT_MESSAGE = (
    "vit2cbsa: converted attention does not support TorchScript (torch.jit.script, deprecated upstream); "
    "export the model with torch.export.export (dynamic batch and image size supported) or trace it with torch.fx"
)

MASK_MESSAGE = "vit2cbsa: converted attention does not support attention masks or causal attention"


def refuse_masks(attn_mask: Any, is_causal: Any = False) -> None:
    """Raise ``ValueError`` if an attention mask or causal attention is asked for: converted attention has neither.

    Traced, a mask can be there without masking anything, and its value is unknown while tracing:

    * ``torch.fx``: the host model's ``attn_mask=None, is_causal=False`` defaults are graph inputs (``Proxy``); the
      check becomes a node of the graph, run on the values the traced model is called with;
    * ``torch.export``: transformers builds an all-visible mask instead of ``None`` (it cannot look into a traced
      mask); the exported program asserts at run time that the mask masks nothing.
    """
    if isinstance(attn_mask, torch.fx.Proxy) or isinstance(is_causal, torch.fx.Proxy):
        _refuse_masks_at_run_time(attn_mask, is_causal)
    elif is_causal:
        raise ValueError(MASK_MESSAGE)
    elif attn_mask is not None:
        if not torch.compiler.is_exporting():
            raise ValueError(MASK_MESSAGE)
        torch._assert_async(_masks_nothing(attn_mask), MASK_MESSAGE)


def _masks_nothing(mask: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: ``mask`` lets every query see every key (all ``True``, or an additive mask of zeros)."""
    if mask.dtype == torch.bool:
        return mask.all()
    return (mask == 0).all()


@torch.fx.node.has_side_effect  # kept by dead-code elimination (e.g. create_feature_extractor's) though unused
def _refuse_masks_at_run_time(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    # typed, and the message written out, so that TorchScript compiles it in a scripted fx graph
    if is_causal:
        raise ValueError("vit2cbsa: converted attention does not support attention masks or causal attention")
    if attn_mask is not None:
        if not bool(_masks_nothing(attn_mask)):
            raise ValueError("vit2cbsa: converted attention does not support attention masks or causal attention")


torch.fx.wrap("_refuse_masks_at_run_time")


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

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this on every submodule first: fail there with one clear line."""
        raise RuntimeError(TORCHSCRIPT_MESSAGE)


class Adapter:
    """One model family: recognises its attention modules and builds their replacements."""

    #: short name used in summaries and saved configs
    name: str = ""
    #: names of the attention module's q/k/v/output projection ``nn.Linear`` children (a converted layer keeps them):
    #: what LoRA adapts by default and what the robustness analysis perturbs
    projections: Tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` is an attention module of this family that can be converted."""
        raise NotImplementedError

    def describe(self, module: nn.Module) -> AttentionSpec:
        raise NotImplementedError

    def build(self, module: nn.Module, mixer: nn.Module, layout: TokenLayout) -> ConvertedAttention:
        """Return the replacement for ``module``, sharing its pretrained projection layers."""
        raise NotImplementedError
