"""Progress bars of fine-tuning and evaluation: tqdm on a terminal, a line every few seconds in a log.

On an interactive stream (a terminal) the bar is tqdm's, redrawn in place. Written to a file or a pipe (CI logs,
``| tee``, a cluster job's output), a redrawn bar would leave every ``\\r`` update in the log, one per step; there
the same bar prints a plain line at most every :data:`LOG_INTERVAL_S` seconds (and when it closes), so a log reads
as a few timestamped lines per stage.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

#: seconds between two progress lines written to a file or a pipe
LOG_INTERVAL_S = 10.0


class LineStream:
    """A text stream that turns tqdm's in-place redraws (``\\r...``) into whole lines of ``stream``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def interactive(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def progress_bar(enabled: bool = True, stream: Optional[TextIO] = None, **kwargs: Any):
    """A ``tqdm`` bar (``kwargs`` as tqdm's), shown only when ``enabled`` (the main process): redrawn in place on a
    terminal, a line at most every :data:`LOG_INTERVAL_S` seconds on a file or a pipe."""
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    if interactive(stream):
        return tqdm(disable=not enabled, file=stream, dynamic_ncols=True, **kwargs)
    return tqdm(disable=not enabled, file=LineStream(stream), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                ncols=100, **kwargs)


__all__ = ["LOG_INTERVAL_S", "LineStream", "interactive", "progress_bar"]
