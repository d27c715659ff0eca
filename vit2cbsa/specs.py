"""Text forms of the conversion options, shared by every command line of the project.

``vit2cbsa convert``, ``vit2cbsa explain``, ``examples/finetune.py`` and the benchmarks all take
the same two specs; each parses them here and wraps the ``ValueError`` into its own usage error.

* representatives: ``"64"`` -> ``64`` (a square count, an 8x8 grid), ``"8x4"`` / ``"8,4"`` -> ``(8, 4)``;
* layers: ``"all"`` / ``""`` -> ``None`` (every attention layer), ``"3"`` -> ``[3]``, ``"0,2"`` -> ``[0, 2]``,
  ``"-1"`` -> ``[-1]`` (the last), ``"6:"`` / ``"::2"`` -> ``slice(6, None)`` / ``slice(None, None, 2)``;
* representative design (benchmarks): ``"EXTRA[-PREFIX_BROADCAST]/BROADCAST"``, e.g. ``"prefix-own/query"`` (the
  default of ``convert``) or ``"none/key"`` (the pooled grid alone, the design before 2026-12-01).
"""

from __future__ import annotations

import argparse
import operator
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .errors import LayerError, UsageError

GRID_FORMS = "a count such as 64 or a grid such as 8x8"
LAYER_FORMS = "all, an index, a list such as 0,1,2 or a slice such as 6:"


def parse_grid(text: Union[str, int]) -> Union[int, Tuple[int, int]]:
    """``"64" -> 64``, ``"8x8" -> (8, 8)``; raises ``ValueError`` naming the accepted forms."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        parts = [int(p) for p in str(text).strip().lower().replace(",", "x").split("x")]
    except ValueError:
        raise ValueError(f"expected {GRID_FORMS}, got {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(f"expected {GRID_FORMS}, got {text!r}")


def parse_design(text: str) -> Dict[str, str]:
    """``"prefix-own/query"`` -> ``{"extra_representatives": "prefix", "prefix_broadcast": "own", "broadcast": "query"}``
    (``prefix_broadcast`` defaults to ``"all"``); the values are checked by ``convert``."""
    extra, sep, broadcast = str(text).partition("/")
    extra, _, prefix_broadcast = extra.partition("-")
    if not (sep and extra and broadcast):
        raise ValueError(f"expected a design such as prefix-own/query or none/key, got {text!r}")
    return {"extra_representatives": extra, "prefix_broadcast": prefix_broadcast or "all", "broadcast": broadcast}


def parse_layers(text: Optional[str]) -> Union[None, slice, List[int]]:
    """``"all" -> None``, ``"0,1" -> [0, 1]``, ``"6:" -> slice(6, None)``; raises ``ValueError``."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lower() in ("all", ""):
        return None
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*parts)
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"expected {LAYER_FORMS}, got {text!r}") from None


#: what ``layers=`` accepts, for error messages
LAYER_SELECTORS = ("None (all), an index, a sequence of indices, a slice such as slice(6, None), a string as on "
                   "the command line ('all', '3', '0,1,2', '6:') or a predicate f(index, name, module)")


def as_index(value: object) -> Optional[int]:
    """``value`` as a Python int if it is an integer (also numpy / 0-d torch integers), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


#: a layer selection once normalised: all (``None``), block indices, a slice, or a predicate ``f(index, name, module)``
Layers = Union[None, Tuple[int, ...], slice, Callable[..., bool]]


def normalize_layers(value: Any) -> Layers:
    """A layer selection normalised: ``"6:"`` -> ``slice(6, None)``, ``[0, 2]`` / ``"0,2"`` -> ``(0, 2)``, ``3`` ->
    ``(3,)``; ``None``, slices and predicates kept. Raises :class:`~vit2cbsa.errors.LayerError` for a string that is
    not a layer spec, ``TypeError`` for anything else that is not a selector. Whether the indices exist is checked
    against a model by :func:`vit2cbsa.modeling.select_layers`."""
    if isinstance(value, str):
        try:
            value = parse_layers(value)
        except ValueError:
            raise LayerError(f"layers={value!r} is not a layer spec; layers accepts {LAYER_SELECTORS}") from None
    if value is None or isinstance(value, slice) or callable(value):
        return value
    if as_index(value) is not None:
        return (as_index(value),)
    if isinstance(value, (list, tuple, range)) or (
            hasattr(value, "__iter__") and not isinstance(value, (dict, bytes, bytearray, str))):
        items = list(value)
        bad = [i for i in items if as_index(i) is None]
        if bad:
            raise TypeError(f"layers must hold integer block indices, got {bad[0]!r}; layers accepts {LAYER_SELECTORS}")
        return tuple(as_index(i) for i in items)
    raise TypeError(f"layers={value!r} ({type(value).__name__}) is not a layer selector; layers accepts "
                    f"{LAYER_SELECTORS}")


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type=``: its ``ValueError`` becomes the option's one-line usage error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive int (not a bool); else a :class:`~vit2cbsa.errors.UsageError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive int, got {value!r}")
    return value
