"""Errors raised on bad input, each with a message that says what was wrong and what to do."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A vit2cbsa folder that cannot be loaded: a missing, truncated or corrupt file, an unknown
    option, an edited config, or weights that do not match the model the folder describes."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """``e``'s message on one line, at most ``limit`` characters (its class name if it has none)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < limit else text[: limit - 3] + "..."
