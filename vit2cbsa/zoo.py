"""Embedded default assets: our CIFAR-10 ViT teacher and 1,000 CIFAR-10 test images (offline).

The teacher is a timm ``VisionTransformer`` (patch 4 on 32x32 images: an 8x8 patch grid plus a
class token) trained from scratch by ``benchmarks/train_teacher.py``; its config records the
constructor arguments, normalisation and test accuracy. The samples are the first 100 test
images of each class (CIFAR-10, Krizhevsky 2009), as uint8 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

ASSETS = Path(__file__).parent / "assets"
TEACHER_DIR = ASSETS / "cifar10_vit"


def load_cifar10_teacher(dynamic_img_size: bool = True) -> Tuple[torch.nn.Module, dict]:
    """The embedded CIFAR-10 teacher (eval mode) and its config.

    ``dynamic_img_size=True`` lets it run on other resolutions (its position embedding is
    interpolated), which the speed demos use; the weights are the same either way.
    """
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    cfg_path, weights = TEACHER_DIR / "config.json", TEACHER_DIR / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"the embedded teacher is missing from {TEACHER_DIR}; train it with "
            "`python benchmarks/train_teacher.py` (see its docstring)"
        )
    config = json.loads(cfg_path.read_text())
    model = VisionTransformer(**{**config["model_kwargs"], "dynamic_img_size": dynamic_img_size})
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), config


def cifar10_samples() -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``(images uint8 N x 3 x 32 x 32, labels, class names)`` of the 1,000 embedded test images."""
    data = np.load(ASSETS / "cifar10_test_samples.npz")
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(data["labels"]), [str(c) for c in data["classes"]]


def normalize(images_u8: torch.Tensor, config: dict) -> torch.Tensor:
    """uint8 pixels -> the float input the teacher expects (its recorded mean/std)."""
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std
