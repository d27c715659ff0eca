"""What the ``vit2cbsa`` command prints besides its results: warnings and errors, each on one line of stderr.

* :func:`warn` -- ``vit2cbsa: warning: <text>``;
* :func:`one_line_warnings` -- vit2cbsa's own warnings (:class:`vit2cbsa.errors.RepresentativesWarning`)
  raised while a command runs, printed with :func:`warn`, each once;
* :func:`run_command` -- runs a command: an error is printed as ``vit2cbsa: error: <one_line(e)>`` with exit
  status 1 (every :class:`vit2cbsa.errors.Vit2CBSAError` message is kept whole; ``--traceback`` raises it
  instead), an interrupt exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Callable, Iterator

from ..errors import RepresentativesWarning, one_line

PROG = "vit2cbsa"


def warn(text: str) -> None:
    """A warning, as one line on stderr (``vit2cbsa: warning: ...``)."""
    text = " ".join(str(text).split())
    if text.startswith(f"{PROG}: "):
        text = text[len(PROG) + 2:]
    print(f"{PROG}: warning: {text}", file=sys.stderr)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """vit2cbsa's own warnings (:class:`vit2cbsa.errors.RepresentativesWarning`) as ``vit2cbsa: warning: ...``
    lines on stderr, each once; other warnings as Python shows them."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RepresentativesWarning)
            yield
    finally:  # outside catch_warnings: what is re-emitted here is shown, not recorded again
        seen = set()
        for w in caught:
            if not issubclass(w.category, RepresentativesWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif str(w.message) not in seen:
                seen.add(str(w.message))
                warn(str(w.message))


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command(args)`` and return its exit status; an error is one line on stderr and status 1
    (``args.traceback``: raised with its full traceback instead)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own errors are the ones to read
    try:
        with one_line_warnings():
            return command(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "traceback", False):
            raise
        print(f"{PROG}: error: {one_line(e, limit=1000)}", file=sys.stderr)
        return 1
