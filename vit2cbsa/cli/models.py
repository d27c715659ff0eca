"""The one model loader of the ``vit2cbsa`` commands: MODEL, loaded and converted as a command asks.

``convert``, ``export``, ``inspect`` and ``explain`` all read MODEL through :func:`load_model`:
:func:`vit2cbsa.loading.load` (the resolver of every command), then the conversion asked on the command line
(:func:`vit2cbsa.cli.options.asked_options`, applied as a :class:`~vit2cbsa.config.ConversionConfig`), or, for a converted folder, the conversion saved in it -- which
the options given must not contradict (a folder is converted once; convert the original model instead).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

from ..config import ConversionConfig
from ..convert import convert
from ..errors import UsageError
from ..layout import as_grid
from ..loading import LoadedModel, Source, load
from .console import warn


@dataclass
class CommandModel:
    """What :func:`load_model` returns: ``loaded`` (:class:`vit2cbsa.loading.LoadedModel`: data config, image
    processor, class names, base model id ...), ``model`` (converted as asked, or as saved; eval mode) and
    ``base`` (the unconverted model, when kept, else ``None``)."""

    loaded: LoadedModel
    model: nn.Module
    base: Optional[nn.Module] = None


def _refuse_changes(model: str, asked: Dict[str, Any], saved: ConversionConfig) -> None:
    """A converted folder is converted once: the options given must agree with the saved ones."""
    given = {k: (as_grid(v) if k == "num_representatives" else v) for k, v in asked.items()
             if v is not None and k != "layers"}
    clash = [f"{k}={v!r} (saved: {getattr(saved, k)!r})" for k, v in given.items() if v != getattr(saved, k)]
    if clash or asked.get("layers") is not None:
        raise UsageError(f"{model} is already converted; cannot change " + (", ".join(clash) or "layers")
                         + " -- convert the original model instead")


def load_model(model: Union[str, Path, Source], asked: Optional[Dict[str, Any]] = None, *, pretrained: bool = True,
               fallback_to_random: bool = False, img_size: Optional[Tuple[int, int]] = None,
               keep_base: bool = False) -> CommandModel:
    """MODEL for a command, converted as asked.

    Args:
        model: a MODEL string (or a :class:`vit2cbsa.loading.Source`).
        asked: the :func:`vit2cbsa.convert` keywords given on the command line (``None`` values: not given,
            convert's defaults); ``None``: no conversion is asked (the model as loaded, converted or not).
        pretrained, fallback_to_random, img_size: as :func:`vit2cbsa.loading.load` (its warnings are printed
            as ``vit2cbsa: warning: ...``).
        keep_base: also return the unconverted model (the converted one is then a copy).

    Raises:
        UsageError: options that contradict a converted folder's saved conversion; LoadError (loading).
    """
    loaded = load(model, pretrained=pretrained, fallback_to_random=fallback_to_random, img_size=img_size, warn=warn)
    result = CommandModel(loaded, loaded.model.eval())
    if loaded.conversion is not None:  # a vit2cbsa folder
        if asked is not None:
            _refuse_changes(str(model.location if isinstance(model, Source) else model), asked, loaded.conversion)
        if not pretrained:  # its base architecture, with random weights: convert it as saved
            result.base = loaded.model
            result.model = convert(copy.deepcopy(loaded.model), loaded.conversion).eval()
    elif asked is not None:
        result.model = convert(loaded.model, ConversionConfig.build(**asked), inplace=not keep_base).eval()
        result.base = loaded.model if keep_base else None
    return result
