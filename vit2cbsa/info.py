"""What a conversion did, kept on the converted model: :class:`ConversionInfo` and its accessors.

``convert`` attaches a :class:`ConversionInfo` (``model.vit2cbsa_info``): the :class:`~vit2cbsa.config.ConversionConfig`
applied (``info.config``), the layers converted, the patch embedding whose output grid ``(h, w)`` the converted
layers read (``N = prefix + h*w`` tokens), and the parameters added. It is found through ``torch.compile`` and PEFT
wrappers (:func:`conversion_info`), and it is what ``save_pretrained`` writes out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Mapping, Optional, Tuple

from torch import nn

from ._version import __version__
from .adapters import ConvertedAttention
from .attention import VARIANTS, variant_uses_representatives
from .config import ConversionConfig
from .errors import UsageError
from .layout import TokenLayout
from .pooling import effective_grid
from .modeling import unwrapped

_INFO_ATTR = "vit2cbsa_info"
_LAYOUT_ATTR = "_vit2cbsa_layout"
_HOOK_ATTR = "_vit2cbsa_hook"


@dataclass
class ConvertedLayer:
    index: int
    name: str
    family: str
    num_heads: int
    head_dim: int


@dataclass
class ConversionInfo:
    """What :func:`convert` did; attached to the model as ``model.vit2cbsa_info``."""

    #: the options applied (``layers`` left ``None``: :attr:`config` has the indices converted)
    conversion: ConversionConfig
    num_attention_layers: int
    converted: List[ConvertedLayer] = field(default_factory=list)
    patch_embedding: str = ""
    new_parameters: int = 0
    library_version: str = __version__
    #: the patch grid of the model's own input size, where the model has one (``None`` otherwise)
    patch_grid: Optional[Tuple[int, int]] = None

    # the options, read from the one ConversionConfig (a new option needs no field here)
    @property
    def variant(self) -> str:
        return self.conversion.variant

    @property
    def num_representatives(self) -> Tuple[int, int]:
        return self.conversion.num_representatives

    @property
    def broadcast(self) -> str:
        return self.conversion.broadcast

    @property
    def extra_representatives(self) -> str:
        return self.conversion.extra_representatives

    @property
    def prefix_broadcast(self) -> str:
        return self.conversion.prefix_broadcast

    @property
    def converted_indices(self) -> List[int]:
        return [layer.index for layer in self.converted]

    def grid_used(self, patch_grid: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """The pooled representative grid used on a ``patch_grid`` input (default: the model's own): the asked
        grid, each axis clamped to the patch grid."""
        patch_grid = patch_grid or self.patch_grid
        if patch_grid is None:
            return tuple(self.num_representatives)
        return effective_grid(tuple(self.num_representatives), *patch_grid)

    def saves_nothing(self, patch_grid: Optional[Tuple[int, int]] = None) -> bool:
        """True when, on a ``patch_grid`` input, the pooled representatives are not fewer than the patches
        (every patch is its own representative): the converted layers then cost more than softmax."""
        patch_grid = patch_grid or self.patch_grid
        if patch_grid is None or not variant_uses_representatives(self.variant):
            return False
        gh, gw = self.grid_used(patch_grid)
        return gh * gw >= patch_grid[0] * patch_grid[1]

    def representatives_text(self, num_prefix: Optional[int] = None,
                             patch_grid: Optional[Tuple[int, int]] = None) -> str:
        """E.g. ``"4x4=16 pooled + one per prefix token (read back by that token alone) representatives"``; with
        ``num_prefix`` (the prefix tokens of an input) the count instead of "one per prefix token"; with
        ``patch_grid`` (the patch grid of an input) the grid actually used on it, e.g.
        ``"14x14=196 pooled (100x100 asked, clamped to the 14x14 patch grid) + 1 prefix ..."``."""
        gh, gw = self.num_representatives
        clamped = ""
        if patch_grid is not None:
            uh, uw = self.grid_used(patch_grid)
            if (uh, uw) != (gh, gw):
                clamped = f" ({gh}x{gw} asked, clamped to the {patch_grid[0]}x{patch_grid[1]} patch grid)"
                gh, gw = uh, uw
        per_prefix = "one per prefix token" if num_prefix is None else f"{num_prefix} prefix"
        extra = {"prefix": f" pooled{clamped} + {per_prefix}", "global": f" pooled{clamped} + 1 global",
                 "none": f"{clamped}"}[self.extra_representatives]
        if self.extra_representatives == "prefix":
            extra += " (read back " + ("by that token alone)" if self.prefix_broadcast == "own" else "by all tokens)")
        return f"{gh}x{gw}={gh * gw}{extra} representatives"

    @property
    def config(self) -> ConversionConfig:
        """The :class:`~vit2cbsa.config.ConversionConfig` that rebuilds this conversion on the original model
        (``layers``: the indices converted)."""
        return self.conversion.replace(layers=tuple(self.converted_indices))

    def options_text(self) -> str:
        """The options a variant without representatives reads, e.g. ``" (window=8, fine_pool=2, far grid 24x24)"``
        for multiscale; ``""`` for one that reads none (linear)."""
        text = VARIANTS[self.variant].options_text(**self.conversion.mixer_options())
        return f" ({text})" if text else ""

    def to_dict(self) -> dict:
        """JSON-ready: the options (:meth:`ConversionConfig.to_dict`, ``layers`` the indices converted) and what
        was converted."""
        d = {k: v for k, v in asdict(self).items() if k != "conversion"}
        d["patch_grid"] = list(self.patch_grid) if self.patch_grid is not None else None
        return {**self.config.to_dict(), **d}

    def __str__(self) -> str:
        if variant_uses_representatives(self.variant):
            how = f" ({self.representatives_text(patch_grid=self.patch_grid)}, broadcast={self.broadcast!r})"
        else:
            how = self.options_text()
        rows = [
            f"vit2cbsa: converted {len(self.converted)}/{self.num_attention_layers} attention layers to "
            f"{self.variant!r}{how}; patch grid from {self.patch_embedding!r}; {self.new_parameters} new parameters",
        ]
        rows += [f"  [{l.index:>2}] {l.name}  ({l.family}, {l.num_heads} heads x {l.head_dim})" for l in self.converted]
        return "\n".join(rows)


def is_converted(model: nn.Module) -> bool:
    """True if ``model`` contains attention layers converted by vit2cbsa."""
    return any(isinstance(m, ConvertedAttention) for m in model.modules())


def representatives_warning(info: ConversionInfo, patch_grid: Tuple[int, int],
                            input_size: Optional[Tuple[int, int]] = None) -> str:
    """The warning for a representative grid that is not smaller than ``patch_grid`` (one line)."""
    gh, gw = info.num_representatives
    ph, pw = patch_grid
    at = f" of a {input_size[0]}x{input_size[1]} input" if input_size else " of the model's own input size"
    suggest = f"{max(1, ph // 2)}x{max(1, pw // 2)}"
    return (f"vit2cbsa: {gh}x{gw} representatives are not fewer than the {ph}x{pw}={ph * pw} patches{at}: every "
            f"patch is its own representative ({ph}x{pw} used), so the converted layers save nothing there and cost "
            f"more than softmax; use fewer than {ph}x{pw}, e.g. {suggest}")


#: options of a saved conversion that folders written before the option existed leave out: the behaviour then
SAVED_DEFAULTS = {"extra_representatives": "none", "prefix_broadcast": "all"}


def saved_config(conv: Mapping[str, Any]) -> ConversionConfig:
    """The :class:`~vit2cbsa.config.ConversionConfig` of the ``"conversion"`` entry of a saved
    ``vit2cbsa_config.json`` (``converted_layers`` are its layers; options newer than the folder take
    :data:`SAVED_DEFAULTS`). A bad value is a :class:`~vit2cbsa.errors.UsageError` naming it."""
    options = {k: conv[k] for k in ConversionConfig.field_names() if k in conv and k != "layers"}
    return ConversionConfig.from_dict(
        {**options, "num_representatives": tuple(conv["num_representatives"]), "layers": list(conv["converted_layers"]),
         **{k: conv.get(k, v) for k, v in SAVED_DEFAULTS.items()}})


def conversion_info(model: nn.Module) -> Optional[ConversionInfo]:
    """The :class:`ConversionInfo` of a converted model, or ``None``; found through ``torch.compile`` and PEFT
    wrappers (it is kept on the model they wrap, which ``merge_and_unload()`` returns)."""
    info = getattr(model, _INFO_ATTR, None)
    return info if info is not None else getattr(unwrapped(model), _INFO_ATTR, None)


def layout_of(model: nn.Module) -> TokenLayout:
    """The shared :class:`TokenLayout` of a converted model (to set the grid by hand)."""
    layout = getattr(model, _LAYOUT_ATTR, None) or getattr(unwrapped(model), _LAYOUT_ATTR, None)
    if layout is None:
        raise UsageError("vit2cbsa: this model was not converted with vit2cbsa.convert")
    return layout


def new_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters added by the conversion (step sizes, feature maps) across all converted layers."""
    return [p for m in model.modules() if isinstance(m, ConvertedAttention) for p in m.new_parameters()]
