"""What every ``vit2cbsa`` sub-command shares: how a sub-command is declared, and the conversion options.

* :func:`add_command` -- one sub-command: its help, a description wrapped as a paragraph, examples, the
  MODEL argument, ``--traceback`` and the function that runs it;
* :func:`add_conversion_options` -- the options of :func:`vit2cbsa.convert` (``--variant``,
  ``--representatives``, ``--layers``, ``--broadcast``, ``--extra-representatives``, ``--prefix-broadcast``),
  taken from :class:`~vit2cbsa.config.ConversionConfig`'s fields (flags, help, choices), for every command that
  converts;
* :func:`asked_options` -- the options given on the command line (those not given are left out: a saved
  conversion is then not contradicted).
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, Callable, Dict, Optional, Sequence

from ..config import ConversionConfig
from ..loading import TEACHER

MODEL_HELP = f"{TEACHER}, a local folder, a timm model name or a Hub repo id"

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
    """Add the conversion options (all :class:`~vit2cbsa.config.ConversionConfig` fields, or the ones named in
    ``only``) to ``p`` as a group; returns the group. Each defaults to ``None`` (not given)."""
    g = p.add_argument_group(title)
    ConversionConfig.add_arguments(g, only=only)
    return g


def asked_options(args: argparse.Namespace, only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The conversion options given on the command line, by :class:`~vit2cbsa.config.ConversionConfig` field name
    (only those given; only the fields in ``only``, default all)."""
    return {k: v for k, v in ConversionConfig.given(args).items() if only is None or k in only}
