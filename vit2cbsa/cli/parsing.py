"""Argument types of the ``vit2cbsa`` command line: the text forms of its options, as argparse ``type=``s.

Each wraps the ``ValueError`` of :mod:`vit2cbsa.specs` (the forms every command line of the project shares)
into an ``argparse.ArgumentTypeError``, so that a bad value is a usage error (exit status 2):

* :func:`parse_grid` -- representatives: ``"64" -> 64`` (a square count), ``"8x8" -> (8, 8)``; positive;
* :func:`parse_resolution` -- an input size: ``"224" -> (224, 224)``, ``"224x320" -> (224, 320)`` (H x W);
* :func:`parse_layers` -- ``"all" -> None``, ``"3" -> [3]``, ``"0,1" -> [0, 1]``, ``"6:" -> slice(6, None)``;
* :func:`parse_metric` -- ``"top1=80.4" -> ("top1", 80.4)``.
"""

from __future__ import annotations

import argparse
from typing import List, Tuple, Union

from .. import specs

Grid = Union[int, Tuple[int, int]]


def _sides(text: str) -> Tuple[int, int]:
    value = specs.argparse_type(specs.parse_grid)(text)
    return (value, value) if isinstance(value, int) else value


def parse_grid(text: str) -> Grid:
    """``"64" -> 64``, ``"8x8" -> (8, 8)`` (:func:`vit2cbsa.specs.parse_grid`); every side must be positive."""
    if min(_sides(text)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count such as 64 or a grid such as 8x8, got {text!r}")
    return specs.parse_grid(text)


def parse_resolution(text: str) -> Tuple[int, int]:
    """``"224" -> (224, 224)``, ``"224x320" -> (224, 320)`` (height x width), both positive."""
    h, w = _sides(text)
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {text!r}")
    return h, w


def parse_layers(text: str) -> Union[None, slice, List[int]]:
    """``"all" -> None``, ``"3" -> [3]``, ``"0,1" -> [0, 1]``, ``"6:" -> slice(6, None)``
    (:func:`vit2cbsa.specs.parse_layers`)."""
    return specs.argparse_type(specs.parse_layers)(text)


def parse_metric(text: str) -> Tuple[str, float]:
    """``"top1=80.4" -> ("top1", 80.4)``: a result for the model card."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE such as top1=80.4, got {text!r}") from None
