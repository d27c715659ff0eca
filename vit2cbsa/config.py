"""``ConversionConfig``: every option of a conversion, validated once, in one frozen dataclass.

The same object is what :func:`vit2cbsa.convert` applies, what a converted model reports
(``conversion_info(model).config``), what ``save_pretrained`` writes and ``from_pretrained`` reads back
(the ``"conversion"`` entry of ``vit2cbsa_config.json``, bound to the weights' checksums), what fine-tuning
embeds (``FinetuneConfig.conversion``) and where the command line takes its conversion options from (the
fields' ``metadata``: flag, help text, choices)::

    config = vit2cbsa.ConversionConfig(variant="cbsa", num_representatives=(8, 8), layers="6:")
    model = vit2cbsa.convert(model, config)                 # or convert(model, "cbsa", 64, layers="6:")
    vit2cbsa.convert(other, config, broadcast="key")      # the same config with one field overridden
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import specs
from .attention import BROADCASTS, PREFIX_BROADCASTS, VARIANTS, variant_uses_representatives
from .errors import UsageError
from .layout import EXTRA_REPRESENTATIVES, as_grid
from .specs import Layers



def _grid(text: str) -> Tuple[int, int]:
    """``"64"`` -> ``(8, 8)``, ``"8x4"`` -> ``(8, 4)``: a representative grid, validated."""
    return as_grid(specs.parse_grid(text))


def _choices(values: Callable[[], Sequence[str]]) -> Dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class ConversionConfig:
    """How :func:`vit2cbsa.convert` converts a model. Frozen: derive variants with :meth:`replace`."""

    variant: str = field(default="cbsa", metadata={
        "flag": "--variant", **_choices(lambda: sorted(VARIANTS)),
        "help": "attention variant: cbsa (extract, contract among representatives, broadcast), contraction_free "
                "(no contraction; Agent-Attention-like), linear (kernelised linear attention), multiscale (exact "
                "class token, fine keys near each patch and coarse ones far away in one softmax: dense features; "
                "--preset dense) or window (ViTDet's windowed attention); see vit2cbsa.attention"})
    num_representatives: Tuple[int, int] = field(default=(8, 8), metadata={
        "flag": "--representatives", "parse": _grid, "metavar": "N|HxW",
        "help": "pooled representatives per head: a square count (64 = an 8x8 grid) or an HxW grid; an axis longer "
                "than the input's patch grid is clamped to it. multiscale: the coarse grid of its far field. "
                "Ignored by linear and window"})
    layers: Layers = field(default=None, metadata={
        "flag": "--layers", "parse": specs.parse_layers, "metavar": "SPEC",
        "help": "attention layers to convert, in block order: all, an index (-1: the last), indices 0,1,2 or a slice "
                "such as 6: (the paper's hybrid, first half kept softmax)"})
    broadcast: str = field(default="query", metadata={
        "flag": "--broadcast", **_choices(lambda: list(BROADCASTS)),
        "help": "how representatives are broadcast back to the tokens: query (softmax over the representatives' "
                "queries; best zero-shot accuracy), key (over the extracted keys) or transpose (the paper's A^T)"})
    extra_representatives: str = field(default="prefix", metadata={
        "flag": "--extra-representatives", **_choices(lambda: list(EXTRA_REPRESENTATIVES)),
        "help": "representatives next to the pooled grid: prefix (each class/distillation/register token is its "
                "own), global (one more: the mean patch query) or none"})
    prefix_broadcast: str = field(default="own", metadata={
        "flag": "--prefix-broadcast", **_choices(lambda: list(PREFIX_BROADCASTS)),
        "help": "own: a prefix token that is a representative reads back only its own representative (its output "
                "is the pretrained attention's at conversion); all: it reads all of them"})
    window: int = field(default=8, metadata={
        "flag": "--window", "parse": int, "metavar": "B",
        "help": "multiscale and window: side, in patch tokens, of the windows the patch grid is cut into; window "
                "attends within its own window, multiscale at fine resolution to its window and the 8 around it"})
    fine_pool: int = field(default=2, metadata={
        "flag": "--fine-pool", "parse": int, "metavar": "F",
        "help": "multiscale: side of the FxF cells its near field is average-pooled into (1: exact keys); divides "
                "--window"})

    def __post_init__(self) -> None:
        def choose(name: str, value: Any, choices: Sequence[str]) -> None:
            if not isinstance(value, str) or value not in choices:
                raise UsageError(f"unknown {name} {value!r}; choose one of {list(choices)}")

        choose("variant", self.variant, sorted(VARIANTS))
        choose("broadcast", self.broadcast, BROADCASTS)
        choose("extra_representatives", self.extra_representatives, EXTRA_REPRESENTATIVES)
        choose("prefix_broadcast", self.prefix_broadcast, PREFIX_BROADCASTS)
        try:
            reps = self.num_representatives
            grid = as_grid(specs.parse_grid(reps) if isinstance(reps, str) else reps)
        except ValueError as e:
            raise UsageError(str(e)) from None
        object.__setattr__(self, "num_representatives", grid)
        object.__setattr__(self, "layers", specs.normalize_layers(self.layers))
        for name in ("window", "fine_pool"):
            specs.check_positive_int(name, getattr(self, name))
        VARIANTS[self.variant].check_options(**self.mixer_options())
        if not variant_uses_representatives(self.variant):  # nothing to place next to the grid or broadcast
            object.__setattr__(self, "extra_representatives", "none")
            object.__setattr__(self, "prefix_broadcast", "all")

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, config: Union["ConversionConfig", str, None] = None, *args: Any,
              **overrides: Any) -> "ConversionConfig":
        """``config`` (a ConversionConfig, a variant name, or ``None`` for the defaults) with positional
        ``num_representatives, layers`` and keyword overrides of any field applied (today's ``convert`` call)."""
        if len(args) > 2:
            raise UsageError(f"convert takes at most 3 positional options (variant, num_representatives, layers), "
                             f"got {1 + len(args)}")
        for name, value in zip(("num_representatives", "layers"), args):
            if name in overrides:
                raise UsageError(f"convert got {name} twice (positionally and as a keyword)")
            overrides[name] = value
        if isinstance(config, str):
            if "variant" in overrides:
                raise UsageError("convert got variant twice (positionally and as a keyword)")
            overrides["variant"], config = config, None
        if config is not None and not isinstance(config, ConversionConfig):
            raise UsageError(f"config must be a vit2cbsa.ConversionConfig, a variant name or None, got "
                             f"{type(config).__name__}")
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise UsageError(f"unknown conversion option {unknown[0]!r}; options: {', '.join(cls.field_names())}")
        return (config or cls()).replace(**overrides) if overrides else (config or cls())

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ConversionConfig":
        """A named set of options (:data:`PRESETS`), with keyword ``overrides`` of any field; e.g.
        ``ConversionConfig.preset("dense")`` (``--preset dense``): the ``multiscale`` variant for patch features at
        high resolution (segmentation, DINOv2 / CLIP features)."""
        return cls.build(None, **{**preset_options(name), **overrides})

    def mixer_options(self) -> Dict[str, Any]:
        """The options every layer's mixer is built from: the fields but ``variant`` and ``layers``, by the
        keyword names of :func:`vit2cbsa.attention.build_mixer` (``rep_grid`` for ``num_representatives``)."""
        d = self.as_kwargs()
        del d["variant"], d["layers"]
        d["rep_grid"] = d.pop("num_representatives")
        return d

    def replace(self, **changes: Any) -> "ConversionConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> Dict[str, Any]:
        """The fields as :func:`vit2cbsa.convert` keyword arguments (``layers`` as a list of indices)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.layers, tuple):
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    # ------------------------------------------------------------------ saving
    def options(self) -> Dict[str, Any]:
        """:meth:`to_dict` without ``layers``: the options a saved conversion lists beside its ``converted_layers``
        (``vit2cbsa_config.json``, the model card, ``vit2cbsa inspect --json``)."""
        d = self.to_dict()
        del d["layers"]
        return d

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: the grid as ``[h, w]``, layers as ``None``, a list of indices or the slice as ``"6:"``."""
        if callable(self.layers) and not isinstance(self.layers, slice):
            raise UsageError("a conversion whose layers are a predicate cannot be written out; pass the indices "
                             "(conversion_info(model).config holds the converted indices)")
        layers: Any = self.layers
        if isinstance(layers, slice):
            layers = ":".join("" if v is None else str(v) for v in (layers.start, layers.stop, layers.step)).rstrip(":")
            layers = layers if ":" in layers else layers + ":"
        elif layers is not None:
            layers = list(layers)
        return {**self.as_kwargs(), "num_representatives": list(self.num_representatives), "layers": layers}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None) -> "ConversionConfig":
        """The config of :meth:`to_dict`'s output; ``defaults`` fill keys an older writer left out. An unknown key
        or a bad value is a :class:`~vit2cbsa.errors.UsageError` naming it."""
        if not isinstance(d, Mapping):
            raise UsageError(f"a conversion config must be a JSON object, got {type(d).__name__}")
        values = {**(defaults or {}), **d}
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise UsageError(f"unknown conversion option {unknown[0]!r}; options: {', '.join(cls.field_names())}")
        return cls(**values)

    # ------------------------------------------------------------------ command line
    @classmethod
    def argument_names(cls) -> List[str]:
        """The ``argparse`` destinations :meth:`add_arguments` adds: every field and ``preset``."""
        return cls.field_names() + ["preset"]

    @classmethod
    def cli_fields(cls) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """``(field name, its metadata)`` for every field, in declaration order (the command-line options)."""
        for f in dataclasses.fields(cls):
            yield f.name, dict(f.metadata)

    @classmethod
    def add_arguments(cls, parser: Any, defaults: Optional["ConversionConfig"] = None,
                      only: Optional[Sequence[str]] = None) -> None:
        """Add one option per field (or per field named in ``only``) to ``parser`` (an ``ArgumentParser`` or an
        argument group; flag, help and choices from the field metadata). Every option defaults to ``None`` (not
        given), so :meth:`given` / :meth:`from_arguments` can tell what the user set."""
        shown = defaults or cls()
        if only is None:
            parser.add_argument("--preset", dest="preset", default=None, choices=sorted(PRESETS),
                                help="start from a named set of conversion options, which the options given "
                                     "here override: " + "; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items()))
        for name, meta in cls.cli_fields():
            if only is not None and name not in only:
                continue
            kwargs: Dict[str, Any] = {"dest": name, "default": None, "metavar": meta.get("metavar")}
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]()
            if "parse" in meta:
                kwargs["type"] = specs.argparse_type(meta["parse"])
            default = shown.to_dict()[name]
            text = meta["help"] + (f" (default: {_cli_text(default)})" if default is not None else " (default: all)")
            parser.add_argument(meta["flag"], help=text, **kwargs)

    @classmethod
    def given(cls, namespace: argparse.Namespace) -> Dict[str, Any]:
        """The conversion options the user set on the command line (those not ``None``), over the options of the
        ``--preset`` given, if any."""
        preset = getattr(namespace, "preset", None)
        return {**(preset_options(preset) if preset else {}),
                **{name: getattr(namespace, name) for name, _ in cls.cli_fields()
                   if getattr(namespace, name, None) is not None}}

    @classmethod
    def from_arguments(cls, namespace: argparse.Namespace,
                       base: Optional["ConversionConfig"] = None) -> "ConversionConfig":
        """``base`` (default: the defaults) with the options given on the command line applied."""
        return (base or cls()).replace(**cls.given(namespace))


#: named sets of conversion options (:meth:`ConversionConfig.preset`, ``--preset``): name -> fields and a "help"
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {"help": "the defaults (cbsa: the class token exact at conversion, classification)"},
    "dense": {"variant": "multiscale", "num_representatives": (24, 24), "window": 8, "fine_pool": 2,
              "help": "patch tokens that stay close to the original's at high resolution (segmentation, dense "
                      "features): multiscale with 8x8-token windows, 2x2 cells near each token, a 24x24 far grid"},
    "dense-fast": {"variant": "multiscale", "num_representatives": (16, 16), "window": 8, "fine_pool": 2,
                   "help": "dense with a 16x16 far grid: faster, patch tokens further from the original's"},
}


def preset_options(name: str) -> Dict[str, Any]:
    """The fields of preset ``name`` (:data:`PRESETS`); an unknown name is a :class:`~vit2cbsa.errors.UsageError`."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return {k: v for k, v in PRESETS[name].items() if k != "help"}


def _cli_text(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value)) if len(value) == 2 else ",".join(map(str, value))
    return str(value)


__all__ = ["ConversionConfig", "Layers", "PRESETS", "preset_options"]
