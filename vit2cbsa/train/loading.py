"""What a fine-tuning run trains: the model (through :func:`vit2cbsa.loading.load`, the one loader of every
command) with a classifier for the dataset's classes and its preprocessing, its converted copy, and the
datasets it reads.

* :func:`load_model`: MODEL loaded with a ``num_classes`` head, and the train / eval transforms that go with
  it (timm's data config, a transformers image processor, the embedded teacher's mean/std);
* :func:`converted_copy`: the one :func:`vit2cbsa.convert` call of training (``FinetuneConfig.conversion``, a
  :class:`~vit2cbsa.config.ConversionConfig`), and
  :func:`plain_copy`, the unsharded model a sharded one's gathered weights go into (FSDP);
* :func:`load_data` and :func:`training_datasets`: the image folder / ``datasets`` splits, and the
  training, evaluation and evaluation-subset datasets (:class:`~vit2cbsa.train.data.TransformedDataset`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..convert import convert
from ..errors import DataError, LoadError, UsageError
from ..loading import load
from .config import FinetuneConfig
from .data import (ImageData, TransformedDataset, Transforms, hf_transforms, load_image_data, subset_indices,
                   teacher_transforms, timm_transforms)
from .lora import Targets, apply_lora


@dataclass
class TrainingModel:
    """The original model of a run, in train mode, and how to feed it."""

    model: nn.Module
    library: str                 # "timm" (also the embedded teacher) or "transformers"
    transforms: Transforms
    head_names: List[str]        # classifier modules (kept fully trainable under LoRA)
    head_reset: bool             # the head was replaced to match the dataset's classes
    class_names: Optional[List[str]] = None


def load_model(spec: str, num_classes: int, class_names: List[str], checkpoint: Optional[str] = None,
               model_kwargs: Optional[dict] = None) -> TrainingModel:
    """Load MODEL with the one resolver every command uses (:func:`vit2cbsa.loading.load`: ``cifar10-teacher``,
    ``timm:NAME`` or a timm name (``--checkpoint`` for local weights, else ``pretrained=True``), ``hf:ID_OR_PATH``
    or a local transformers folder), with a classifier of ``num_classes`` outputs (a head of another size is
    replaced), and the preprocessing that goes with it. Raises a one-line :class:`UsageError`."""
    try:
        lm = load(spec, checkpoint_path=checkpoint, model_kwargs=model_kwargs, num_classes=num_classes,
                  class_names=class_names)
    except LoadError as e:
        raise UsageError(str(e)) from None
    if lm.converted:
        raise UsageError(f"{spec} is a converted vit2cbsa folder; fine-tune from the original model (it is the "
                         "teacher for distillation, and --variant/--representatives convert it)")
    if lm.source.kind == "teacher":
        transforms = teacher_transforms(lm.config)
    elif lm.library == "timm":
        transforms = timm_transforms(lm.model)
    elif lm.image_processor is None:
        raise UsageError(f"transformers model {spec!r} has no image processor (preprocessor_config.json): "
                         "save one next to it, e.g. AutoImageProcessor.from_pretrained(...).save_pretrained(folder)")
    else:
        transforms = hf_transforms(lm.image_processor)
    return TrainingModel(lm.model.train(), lm.library, transforms, lm.head_names, lm.head_reset, lm.class_names)


def converted_copy(original: nn.Module, config: FinetuneConfig) -> nn.Module:
    """A fresh converted copy of ``original``, as ``config`` says (the original is left as it is)."""
    return convert(copy.deepcopy(original), config.conversion)


def plain_copy(original: nn.Module, config: FinetuneConfig, state: Dict[str, torch.Tensor],
               lora_targets: Optional[Targets] = None, head_names: Sequence[str] = ()) -> nn.Module:
    """An unsharded converted copy of ``original`` holding ``state`` (gathered from a sharded model); with
    ``lora_targets``, ``state`` is the PEFT model's (``config.lora_rank`` adapters on those targets), whose adapters
    are merged."""
    model = converted_copy(original, config)
    if lora_targets is not None:
        model = apply_lora(model, lora_targets, head_names, config.lora_rank, config.lora_alpha, config.lora_dropout)
    model.load_state_dict(state, strict=True)
    return model.merge_and_unload() if lora_targets is not None else model


def load_data(config: FinetuneConfig) -> ImageData:
    """The raw training and evaluation splits of ``config.dataset``; a one-line :class:`UsageError` when they
    cannot be read."""
    try:
        return load_image_data(config.dataset, config.train_split, config.eval_split)
    except DataError as e:
        raise UsageError(str(e)) from None


@dataclass
class TrainingDatasets:
    """The datasets of a run: ``train`` (augmented), ``eval`` (the whole evaluation split, or
    ``max_eval_samples`` of it) and ``eval_subset`` (the ``eval_subset`` images of the evaluations during
    training; ``eval`` itself when that is all of it)."""

    train: TransformedDataset
    eval: TransformedDataset
    eval_subset: TransformedDataset


def training_datasets(config: FinetuneConfig, data: ImageData, transforms: Transforms) -> TrainingDatasets:
    """The run's datasets (fixed random subsets drawn with ``config.seed``); a :class:`UsageError` when the
    training split holds less than one batch."""
    c, skip = config, config.skip_bad_images
    train = TransformedDataset(data.train, transforms.train, seed=c.seed, skip_bad=skip,
                               indices=subset_indices(len(data.train), c.max_train_samples, c.seed))
    evaluate = TransformedDataset(data.eval, transforms.eval, skip_bad=skip,
                                  indices=subset_indices(len(data.eval), c.max_eval_samples, c.seed))
    sub = subset_indices(len(evaluate), c.eval_subset or None, c.seed)
    eval_sub = evaluate if sub is None else TransformedDataset(
        data.eval, transforms.eval, skip_bad=skip, indices=[evaluate.indices[i] for i in sub])
    if len(train) < c.batch_size:
        raise UsageError(f"the training split has {len(train)} images, fewer than one batch of {c.batch_size}")
    return TrainingDatasets(train, evaluate, eval_sub)
