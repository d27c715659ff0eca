"""What a loaded model expects and knows: its input configuration, image processor and class names.

* :func:`data_config` -- ``{"input_size": [C, H, W], "mean", "std"}`` (plus timm's ``interpolation`` /
  ``crop_pct`` / ``crop_mode``) of a timm or transformers model, what the analysis and training read;
* :func:`image_processor` -- the transformers image processor saved in a folder (never running its code);
* :func:`teacher_processor` -- one made from the embedded teacher's mean/std, saved next to a converted teacher;
* :func:`class_names_of` -- index -> name of a classifier where known (timm label names, transformers
  ``id2label``, ImageNet's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from ..errors import LoadError, one_line
from .sources import check_no_remote_code

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def teacher_processor(config: dict) -> Any:
    """A transformers image processor with the teacher's input size and mean/std, saved next to a converted
    teacher so that its folder says how to preprocess images (``vit2cbsa explain`` reads it)."""
    try:
        from transformers import ViTImageProcessor
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    h, w = config.get("input_size", [3, 32, 32])[-2:]
    return ViTImageProcessor(do_resize=True, size={"height": int(h), "width": int(w)}, resample=2,
                             image_mean=list(config["mean"]), image_std=list(config["std"]))


def image_processor(folder: Optional[Path]) -> Any:
    """The image processor saved in ``folder`` (``preprocessor_config.json``), or ``None`` when there is none."""
    if folder is None or not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    check_no_remote_code(folder, files=("preprocessor_config.json",))
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise LoadError(f"{Path(folder) / 'preprocessor_config.json'} cannot be loaded: {one_line(e)}") from e


def data_config(model: nn.Module, processor: Any) -> Dict[str, Any]:
    """Input size and normalisation of a timm or transformers model (what the analysis and training read)."""
    hf = getattr(model, "config", None)
    if hf is not None and type(model).__module__.startswith("transformers."):
        vision = getattr(hf, "vision_config", None) or hf
        size = getattr(vision, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"input_size": [int(getattr(vision, "num_channels", 3)), int(h), int(w)],
                "mean": list(getattr(processor, "image_mean", None) or IMAGENET_MEAN),
                "std": list(getattr(processor, "image_std", None) or IMAGENET_STD)}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None) or tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    proj = getattr(patch, "proj", None)
    chans = getattr(proj, "in_channels", None) or getattr(model, "in_chans", 3)
    mean = getattr(processor, "image_mean", None) or cfg.get("mean") or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or cfg.get("std") or IMAGENET_STD
    data = {"input_size": [int(chans), int(size[0]), int(size[1])], "mean": list(mean), "std": list(std)}
    for key in ("interpolation", "crop_pct", "crop_mode"):
        if key in cfg:
            data[key] = cfg[key]
    return data


def class_names_of(model: nn.Module) -> Optional[List[str]]:
    """Class names of a classifier: a timm ``pretrained_cfg["label_names"]`` (vit2cbsa folders keep them), a
    transformers ``id2label`` (unless generic ``LABEL_i``), or ImageNet's for a timm model with ImageNet's classes."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == getattr(model, "num_classes", None):
        return [str(n) for n in names]
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if id2label:
        if all(str(v).startswith("LABEL_") for v in id2label.values()):
            return None
        return [str(id2label[i]) for i in sorted(id2label)]
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes <= 0:
        return None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != num_classes:
            return None
        return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    except Exception:  # older timm, or no label names for this subset
        return None
