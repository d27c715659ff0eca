"""Reading an image file and turning it into a model's input (any size, any aspect ratio)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: Union[str, Path]):
    """Open ``path`` as an RGB ``PIL.Image`` (any mode is converted), with a clear error if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.exists():
        raise ImageError(f"image {str(path)!r} does not exist")
    if p.is_dir():
        raise ImageError(f"image {str(path)!r} is a directory, not an image file")
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {str(path)!r}: not an image format PIL recognises") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt files
        raise ImageError(f"cannot read {str(path)!r}: {' '.join(str(e).split()) or type(e).__name__}") from None


@dataclass
class InputConfig:
    """How a model expects its input: size ``(H, W)`` and per-channel normalisation."""

    size: Tuple[int, int]
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD


def input_config(model: nn.Module, config: Optional[dict] = None, processor=None) -> InputConfig:
    """Input size and normalisation of a timm or transformers model (or the CIFAR-10 teacher's ``config``)."""
    if config is not None and "input_size" in config:
        return InputConfig(tuple(config["input_size"][-2:]), tuple(config["mean"]), tuple(config["std"]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        size = tuple(cfg["input_size"][-2:])
        pe = getattr(model, "patch_embed", None)
        if pe is not None and getattr(pe, "img_size", None):
            size = tuple(pe.img_size)
        return InputConfig(size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    hf = getattr(model, "config", None)
    if hf is not None:
        vision = getattr(hf, "vision_config", hf)
        size = getattr(vision, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(processor, "image_std", None) or IMAGENET_STD
        return InputConfig(size, tuple(mean), tuple(std))
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return InputConfig(tuple(pe.img_size))
    return InputConfig((224, 224))


def preprocess(image, cfg: InputConfig) -> Tuple[torch.Tensor, np.ndarray]:
    """Resize (shorter side to fit, bicubic) and centre-crop a PIL image to ``cfg.size``.

    Returns ``(pixel_values 1 x 3 x H x W normalised, the cropped image H x W x 3 uint8)``.
    """
    from PIL import Image

    th, tw = cfg.size
    w, h = image.size
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    img = image.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - th) // 2, (nw - tw) // 2
    img = img.crop((left, top, left + tw, top + th))
    pixels = np.asarray(img, dtype=np.uint8).copy()
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0)
    x = (x - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
    return x.unsqueeze(0), pixels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``N x 3 x H x W`` uint8 tensor -> ``N x H x W x 3`` numpy array."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``N x 3 x H x W`` pixels -> normalised float input."""
    return (images.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
