"""The token-mixer interface every attention variant implements, and the maps record of representative variants.

A converted attention layer computes ``Q, K, V`` with its pretrained projections and hands them, per head
(``B x H x N x d``), to its **mixer**; the layer's context is the mixer's output (the owning module applies
``W_o``). Every mixer, whatever it computes, is one linear operator on the values::

    context = kappa E V          E: B x H x N x N (token <- token),  kappa: the mixer's per-head step
                                 (1 for a mixer without one)

:meth:`Mixer.forward` computes the context without forming ``E`` (that is the point of every variant:
linear in ``N``); :meth:`Mixer.operator` forms ``E`` for analysis, from the same forward steps.
Representative variants (``uses_representatives = True``) compute ``E = B (I + gamma S) A`` through ``m``
representatives and also return every step of it as a :class:`CBSAMaps` (:meth:`Mixer.maps`)::

    A  (m x N)  representative <- token       S  (m x m)  among representatives (None without contraction)
    B  (N x m)  token <- representative       E = B (A + gamma S A)

A variant is a :class:`Mixer` subclass with a ``name``, registered with
:func:`vit2cbsa.attention.register_variant` (one file and one decorator; see ``CONTRIBUTING.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..layout import TokenLayout


@dataclass
class CBSAMaps:
    """Everything a representative mixer computes for one batch (``B x H x ...``), from its forward steps."""

    A: torch.Tensor  # B H m N  extraction coefficients (rows sum to 1 over tokens)
    B: torch.Tensor  # B H N m  broadcast weights (rows sum to 1 over representatives)
    S: Optional[torch.Tensor]  # B H m m  contraction attention (None without contraction)
    P: torch.Tensor  # B H m d  pooled queries
    K_r: torch.Tensor  # B H m d  representative keys
    V_r: Optional[torch.Tensor]  # B H m d  representative values (None without v)
    C: Optional[torch.Tensor]  # B H m d  contracted representatives
    out: Optional[torch.Tensor]  # B H N d  the mixer's output
    gamma: Optional[torch.Tensor]  # H  contraction step (None without contraction)
    kappa: torch.Tensor  # H  broadcast step
    prefix: int
    grid: Tuple[int, int]
    rep_grid: Tuple[int, int]  # effective representative grid (clamped to the patch grid)
    lead: int = 0  # prefix tokens that are representatives 0 .. lead-1 (before the pooled grid)
    has_global: bool = False  # a global representative after the pooled grid

    def operator(self) -> torch.Tensor:
        """``E = B (I + gamma S) A`` (``B x H x N x N``): ``out = kappa E V``."""
        a = self.A
        if self.S is not None:
            a = a + self.gamma.view(1, -1, 1, 1).to(a.dtype) * (self.S @ a)
        return self.B @ a


class Mixer(nn.Module):
    """A token mixer ``(q, k, v, layout) -> context`` (all ``B x H x N x d``): one attention variant.

    Subclasses set the class attributes and implement :meth:`forward` and :meth:`operator`; representative
    variants also :meth:`maps`. :meth:`from_options` builds the mixer of one layer from the conversion options;
    the default calls ``cls(num_heads, head_dim)`` and ignores the representative options.

    Class attributes:
        name: the variant name (``vit2cbsa.convert(model, name)``, the registry key).
        uses_representatives: whether the variant mixes through representatives (``A``, ``B``): then the
            representative options apply, :meth:`maps` returns a :class:`CBSAMaps`, and analysis shows them.
        description: the variant in a few plain words (figure labels).
        formula: its token-to-token operator in the paper's notation (figure captions).
    """

    name: ClassVar[str] = ""
    uses_representatives: ClassVar[bool] = False
    description: ClassVar[str] = ""
    formula: ClassVar[str] = "E"

    @classmethod
    def from_options(cls, num_heads: int, head_dim: int, *, rep_grid: Tuple[int, int], broadcast: str = "key",
                     scale: Optional[float] = None, extra_representatives: str = "none",
                     prefix_broadcast: str = "all", **options: Any) -> "Mixer":
        """The mixer of one layer of ``num_heads`` heads of width ``head_dim``, from the conversion options
        (``scale``: the pretrained layer's attention scale; ``options``: every other
        :class:`~vit2cbsa.config.ConversionConfig` field but ``variant`` and ``layers``, by name, so a new option
        reaches the mixers that take it and no other code). Default: ``cls(num_heads, head_dim)``."""
        return cls(num_heads, head_dim)

    @classmethod
    def options_text(cls, **options: Any) -> str:
        """The options this variant reads besides the representative ones, in a few words (``ConversionInfo``'s
        summary, ``vit2cbsa inspect``); ``""`` for none. Default: none."""
        return ""

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Refuse (:class:`~vit2cbsa.errors.UsageError`) conversion options (``ConversionConfig`` fields, by name)
        that this variant cannot build from; called when a config naming the variant is made. Default: accept."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The context ``kappa E V`` (``B x H x N x d``) of ``q, k, v`` (``B x H x N x d``) laid out as ``layout``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(q, k, v, layout)")

    def operator(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``E`` (``B x H x N x N``) with ``forward(q, k, v, layout) == kappa E V``, without gradients."""
        raise UnsupportedModelError(f"the {self.name or type(self).__name__!r} mixer does not implement "
                                    "operator(q, k, layout), the token-to-token operator analysis needs")

    def maps(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], layout: TokenLayout) -> CBSAMaps:
        """Every step of ``E = B (I + gamma S) A`` as a :class:`CBSAMaps` (``v=None``: no ``V_r``, ``C``, output),
        without gradients. Only representative variants have them: the others raise
        :class:`~vit2cbsa.errors.UnsupportedModelError` (a ``TypeError``)."""
        raise UnsupportedModelError(f"the {self.name or type(self).__name__!r} mixer has no representatives, "
                                    "so no A/B maps; use its operator() instead")


__all__ = ["CBSAMaps", "Mixer"]
