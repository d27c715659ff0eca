"""Saving a converted model: safetensors weights plus one small JSON config, atomically.

A folder written by :func:`save_pretrained` (read back by :func:`vit2cbsa.hub.load.from_pretrained`)::

    model.safetensors          weights under the pretrained names plus ``mixer.*``; above
                               ``max_shard_size``: model-0000k-of-0000n.safetensors + model.safetensors.index.json
    config.json                transformers models: model_type "vit2cbsa" wrapping the base config
                               (see vit2cbsa.hub.transformers_auto: plain transformers refuses it, Auto classes
                               load it after ``import vit2cbsa``)
    preprocessor_config.json   optional: an image processor saved alongside
    vit2cbsa_config.json       written last: conversion options, how to rebuild the base
                               model, and the size and sha256 of every other file (vit2cbsa.hub.format)

Before anything is written the base architecture is rebuilt from what would be saved and checked to be
the same network (:mod:`vit2cbsa.hub.identity`). Everything goes into a temporary folder next to the target,
the marker ``vit2cbsa_config.json`` last, and the folder is then renamed into place (:mod:`vit2cbsa.hub.io`).
Every output-changing entry of the config is bound to the weights (:mod:`vit2cbsa.hub.weights`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..info import conversion_info
from ..errors import UnsupportedModelError, UsageError
from ..modeling import is_peft, uncompiled
from .format import (CONFIG_NAME, FORMAT_VERSION, config_text, conversion_json, dtype_name, folder_config,
                     hf_config_json)
from .identity import base_model_id, base_spec, set_class_names, verify_rebuild
from .io import atomic_folder, file_hashes, file_table, write_synced, write_weights
from .weights import BINDING_KEY, canonical, make_binding

PathLike = Union[str, "os.PathLike[str]"]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    base_model: Optional[str] = None,
    image_processor: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    class_names: Optional[Sequence[str]] = None,
) -> Path:
    """Save a converted model as safetensors plus ``vit2cbsa_config.json``, atomically.

    Args:
        model: a model returned by :func:`vit2cbsa.convert` (timm or transformers), also under
            ``torch.compile`` (the uncompiled module is saved).
        save_directory: the folder to create. An existing folder is replaced only if it is
            empty or an earlier vit2cbsa save; anything else raises ``FileExistsError``.
        model_kwargs: timm only: constructor kwargs that rebuild the architecture with
            ``timm.create_model(name, pretrained=False, **model_kwargs)`` (or the class itself
            for a model built without the registry). By default they are taken from what timm
            recorded, or read back from the modules; either way they are verified first.
        base_model: the Hub id of the original pretrained model, for the model card
            (default: timm's ``pretrained_cfg["hf_hub_id"]`` or the transformers name, if any).
        image_processor: optional (transformers) image processor saved next to the model.
        max_shard_size: weights above this size are split into shards plus an index file.
        class_names: the name of each output class, kept through loading (timm:
            ``pretrained_cfg["label_names"]``, transformers: ``config.id2label``). Default: the
            model's own (``pretrained_cfg["label_names"]`` or ``id2label``).

    Returns:
        The path of the saved folder.

    Raises:
        ValueError (:class:`~vit2cbsa.errors.UsageError`) if the model is not converted or its architecture
        cannot be rebuilt exactly from what would be saved, TypeError for an unmerged PEFT model (nothing is
        written then); FileExistsError if ``save_directory`` is something else.
    """
    model = uncompiled(model)
    if is_peft(model):
        raise UnsupportedModelError(
            f"this is a PEFT {type(model).__name__} (LoRA adapters on top of the model): save the merged model "
            "with save_pretrained(model.merge_and_unload(), ...), or only the adapters with PEFT's "
            "model.save_pretrained(folder)")
    info = conversion_info(model)
    if info is None:
        raise UsageError("this model is not converted; call vit2cbsa.convert(model, ...) first")
    spec = base_spec(model, model_kwargs)
    if class_names is not None:
        set_class_names(spec, class_names)
    verify_rebuild(spec, model, info)
    base_model = base_model or base_model_id(model, spec)

    target = Path(save_directory).expanduser().absolute()
    with atomic_folder(target, CONFIG_NAME) as tmp:
        if spec.library == "transformers":
            config_json = hf_config_json(spec.hf_config, spec.task, type(model).__name__)
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if image_processor is not None:
            image_processor.save_pretrained(str(tmp))
        conversion = conversion_json(info)
        dtype = dtype_name(_model_dtype(model))
        binding = make_binding(FORMAT_VERSION, conversion, spec.to_json(), dtype, file_hashes(tmp))
        state = {k: v.detach() for k, v in model.state_dict().items()}
        weights = write_weights(state, tmp, max_shard_size, {"format": "pt", BINDING_KEY: canonical(binding)})
        config = folder_config(conversion, spec.to_json(), base_model, dtype, weights, file_table(tmp))
        write_synced(tmp / CONFIG_NAME, config_text(config))  # the marker: written last
    return target


__all__ = ["save_pretrained"]
