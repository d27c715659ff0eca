"""One error family: every error vit2cbsa raises on bad input is a :class:`Vit2CBSAError`.

Each class also subclasses the built-in a caller would already catch (``ValueError`` for bad values,
``TypeError`` for a model of the wrong kind), and its message says what was wrong and what to do, on
one line (:func:`one_line` is how the command line prints any error).
"""

from __future__ import annotations


class Vit2CBSAError(Exception):
    """Base class of every error vit2cbsa raises on bad input."""


class UsageError(Vit2CBSAError, ValueError):
    """An option, argument or combination of them that cannot work (command line or Python API)."""


class UnsupportedModelError(Vit2CBSAError, TypeError, ValueError):
    """A model vit2cbsa cannot convert or handle (an unknown family, a CNN stem, a wrapped sub-module)."""


class LayerError(UsageError):
    """A layer selection that is not one, selects nothing, or names a layer that does not exist."""


class CheckpointError(Vit2CBSAError, ValueError):
    """A vit2cbsa folder that cannot be loaded: a missing, truncated or corrupt file, an unknown
    option, an edited config, or weights that do not match the model the folder describes."""


class LoadError(Vit2CBSAError, ValueError):
    """A model that cannot be resolved or loaded (a typo, a Hub id unreachable offline, a bad checkpoint)."""


class DataError(Vit2CBSAError, ValueError):
    """A dataset that cannot be read (a missing folder, no images, an unknown split)."""


class BadImageError(DataError):
    """An image that cannot be decoded; the one-line message names the file (``.path``).

    A DataLoader worker re-raises it in the main process as ``BadImageError("Caught BadImageError in
    DataLoader worker process 0. Original Traceback ...")``: the original one-line message is kept."""

    def __init__(self, message: str, path: str | None = None) -> None:
        if message.startswith(f"Caught {type(self).__name__}"):
            last = message.strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)
        self.path = path


class ImageError(Vit2CBSAError, ValueError):
    """An input image that cannot be read."""


class ExportError(Vit2CBSAError, ValueError):
    """A model that cannot be exported as asked (a dynamic size it does not support, a failed check)."""


class Vit2CBSAWarning(UserWarning):
    """Base class of vit2cbsa's warnings."""


class RepresentativesWarning(Vit2CBSAWarning):
    """The representative grid is not smaller than the patch grid: the conversion saves nothing there."""


def one_line(e: BaseException, limit: int = 240) -> str:
    """``e``'s message on one line (its class name if it has none). vit2cbsa's own messages are kept whole;
    another library's are cut at ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, Vit2CBSAError) or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


__all__ = ["BadImageError", "CheckpointError", "DataError", "ExportError", "ImageError", "LayerError", "LoadError",
           "RepresentativesWarning", "UnsupportedModelError", "UsageError", "Vit2CBSAError", "Vit2CBSAWarning", "one_line"]
