"""The registry of attention variants: name -> :class:`~vit2cbsa.attention.base.Mixer` subclass.

:func:`register_variant` (a class decorator) adds a variant, :func:`build_mixer` builds one layer's mixer
of a variant by name through :meth:`Mixer.from_options <vit2cbsa.attention.base.Mixer.from_options>`;
``vit2cbsa.convert``, the command line and saved configs all read :data:`VARIANTS`. The built-in variants
register themselves in their own files (``cbsa``, ``contraction_free``, ``linear``, ``multiscale``, ``window``).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple, Type

from ..errors import UsageError
from .base import Mixer

#: the registered variants, in registration order: name -> Mixer subclass
VARIANTS: Dict[str, Type[Mixer]] = {}

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def register_variant(cls: Type[Mixer]) -> Type[Mixer]:
    """Register ``cls`` (a :class:`Mixer` subclass) under ``cls.name``; returns ``cls`` (use as a decorator).

    Refuses (:class:`~vit2cbsa.errors.UsageError`) a class that is not a Mixer, has no name of its own
    (letters, digits, ``_ . -``) or whose name is taken (a subclass must set its own ``name``)."""
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise UsageError(f"register_variant needs a vit2cbsa.attention.Mixer subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"{cls.__name__} has no variant name: set the class attribute name (letters, digits, "
                         f"'_', '.', '-'), got {name!r}")
    if name in VARIANTS:
        raise UsageError(f"variant {name!r} is already registered (by {VARIANTS[name].__qualname__}); "
                         "give the new class a name of its own")
    VARIANTS[name] = cls
    return cls


def unregister_variant(name: str) -> Type[Mixer]:
    """Remove variant ``name`` from the registry and return its class (for tests registering a toy variant)."""
    _known(name)
    return VARIANTS.pop(name)


def _known(name: str) -> Type[Mixer]:
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}") from None


def variant_uses_representatives(name: str) -> bool:
    """Whether variant ``name`` mixes through representatives (so the representative options apply)."""
    return _known(name).uses_representatives


def build_mixer(variant: str, num_heads: int, head_dim: int, rep_grid: Tuple[int, int], broadcast: str,
                scale: Optional[float] = None, extra_representatives: str = "none",
                prefix_broadcast: str = "all", **options: Any) -> Mixer:
    """The token mixer of ``variant`` for one layer (:meth:`Mixer.from_options` of its registered class;
    ``options``: the other conversion options by field name, e.g. ``window=8``)."""
    cls = _known(variant)
    cls.check_options(**options)
    return cls.from_options(num_heads, head_dim, rep_grid=rep_grid, broadcast=broadcast, scale=scale,
                            extra_representatives=extra_representatives, prefix_broadcast=prefix_broadcast, **options)


__all__ = ["VARIANTS", "build_mixer", "register_variant", "unregister_variant", "variant_uses_representatives"]
