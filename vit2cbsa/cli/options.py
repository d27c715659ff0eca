"""What every ``vit2cbsa`` sub-command shares: how a sub-command is declared, and the conversion options.

* :func:`add_command` -- one sub-command: its help, a description wrapped as a paragraph, examples, the
  MODEL argument, ``--traceback`` and the function that runs it;
* :func:`add_conversion_options` -- the options of :func:`vit2cbsa.convert` (``--variant``,
  ``--representatives``, ``--layers``, ``--broadcast``, ``--extra-representatives``, ``--prefix-broadcast``),
  defined here only, for every command that converts;
* :func:`asked_options` / :func:`conversion_options` -- the options given on the command line (``None`` where
  not given: a saved conversion is then not contradicted) and the :func:`vit2cbsa.convert` keywords with
  the defaults filled in.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, Callable, Dict, Optional, Sequence

from ..attention import BROADCASTS, PREFIX_BROADCASTS, VARIANTS
from ..layout import EXTRA_REPRESENTATIVES
from ..loading import TEACHER
from .parsing import parse_grid, parse_layers

MODEL_HELP = f"{TEACHER}, a local folder, a timm model name or a Hub repo id"

#: option dest -> (the :func:`vit2cbsa.convert` keyword, its default)
CONVERT_KEYWORDS: Dict[str, tuple] = {
    "variant": ("variant", "cbsa"),
    "representatives": ("num_representatives", 64),
    "layers": ("layers", None),
    "broadcast": ("broadcast", "query"),
    "extra_representatives": ("extra_representatives", "prefix"),
    "prefix_broadcast": ("prefix_broadcast", "own"),
}


def paragraph(text: str) -> str:
    """``text`` re-wrapped as one paragraph of 88 columns (a sub-command's description)."""
    return textwrap.fill(" ".join(text.split()), width=88)


def add_command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], *, help: str, description: str,
                epilog: str, model_help: Optional[str] = MODEL_HELP, wrap: bool = True) -> argparse.ArgumentParser:
    """Add the sub-command ``name`` to ``sub`` (``add_subparsers()``); returns its parser.

    ``description`` is wrapped as one paragraph unless ``wrap=False``; ``epilog`` (the examples) is kept as
    written. ``model_help``: the help of the MODEL argument (``None``: the command takes no MODEL)."""
    p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, help=help,
                       description=paragraph(description) if wrap else description, epilog=epilog)
    if model_help is not None:
        p.add_argument("model", metavar="MODEL", help=model_help)
    add_traceback_option(p, default=argparse.SUPPRESS)  # SUPPRESS: `vit2cbsa --traceback CMD` is kept
    p.set_defaults(func=func)
    return p


def add_traceback_option(p: argparse.ArgumentParser, default: Any = False) -> None:
    """``--traceback``: show the full traceback of an error instead of one line."""
    p.add_argument("--traceback", action="store_true", default=default, help="show the full traceback of an error")


def add_conversion_options(p: argparse.ArgumentParser, title: str = "conversion options",
                           only: Optional[Sequence[str]] = None) -> Any:
    """Add the conversion options (all, or the dests in ``only``) to ``p`` as a group; returns the group.
    Each defaults to ``None`` (not given); :func:`conversion_options` fills in :func:`vit2cbsa.convert`'s
    defaults."""
    g = p.add_argument_group(title)
    options = {
        "variant": (["--variant"], dict(choices=sorted(VARIANTS), help="attention to convert to (default: cbsa)")),
        "representatives": (["--representatives"], dict(
            type=parse_grid, metavar="N|HxW",
            help="representatives per head: a square count or a grid (default: 64 = 8x8)")),
        "layers": (["--layers"], dict(
            type=parse_layers, metavar="SPEC",
            help="attention layers to convert, in block order: all, 3, 0,1,2 or 6: (default: all)")),
        "broadcast": (["--broadcast"], dict(
            choices=list(BROADCASTS), help="how representatives are broadcast back to tokens (default: query)")),
        "extra_representatives": (["--extra-representatives"], dict(
            choices=list(EXTRA_REPRESENTATIVES),
            help="representatives next to the pooled grid: prefix (each class/register token its own, "
                 "default), global (the mean of the patch queries) or none")),
        "prefix_broadcast": (["--prefix-broadcast"], dict(
            choices=list(PREFIX_BROADCASTS),
            help="own (default): a prefix token reads back only its own representative; all: every one")),
    }
    for dest in only or CONVERT_KEYWORDS:
        flags, kwargs = options[dest]
        g.add_argument(*flags, dest=dest, default=None, **kwargs)
    return g


def asked_options(args: argparse.Namespace, only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The :func:`vit2cbsa.convert` keywords given on the command line (``None`` where an option was not given;
    only the dests in ``only``, default all)."""
    return {CONVERT_KEYWORDS[dest][0]: getattr(args, dest, None) for dest in only or CONVERT_KEYWORDS}


def conversion_options(asked: Dict[str, Any]) -> Dict[str, Any]:
    """``asked`` (:func:`asked_options`) with :func:`vit2cbsa.convert`'s defaults for the options not given."""
    defaults = dict(CONVERT_KEYWORDS.values())
    return {key: default if asked.get(key) is None else asked[key] for key, default in defaults.items()}
