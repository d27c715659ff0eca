"""Tiny random-weight models of every supported family (never a download)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threading overhead dominates, and CI cores are shared

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)


@dataclass
class Family:
    """A model family: how to build a tiny instance and call it on pixels."""

    name: str
    build: Callable[[], torch.nn.Module]
    num_prefix: int
    patch: int
    sizes: tuple  # two (H, W) input sizes, the second non-square
    hf: bool = False

    def __call__(self, model, x):
        if not self.hf:
            return model(x)
        kwargs = {} if "Dinov2" in type(model).__name__ else {"interpolate_pos_encoding": True}
        out = model(pixel_values=x, **kwargs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _timm(name, **kw):
    import timm

    return lambda: timm.create_model(name, pretrained=False, **{**TINY, **kw})


def _hf(config_cls, model_cls, **kw):
    def build():
        import transformers

        cfg = getattr(transformers, config_cls)(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **kw
        )
        return getattr(transformers, model_cls)(cfg)

    return build


FAMILIES = [
    Family("timm_vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, dynamic_img_size=True), 1, 8, ((32, 32), (40, 24))),
    Family("timm_vit_static_nonsquare", _timm("vit_tiny_patch16_224", img_size=(24, 40), patch_size=8), 1, 8, ((24, 40), (24, 40))),
    Family("timm_deit_distilled", _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, dynamic_img_size=True), 2, 8, ((32, 32), (48, 32))),
    Family("timm_deit3", _timm("deit3_small_patch16_224", img_size=32, patch_size=8, dynamic_img_size=True), 1, 8, ((32, 32), (24, 48))),
    Family("timm_reg4", _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, dynamic_img_size=True), 5, 7, ((28, 28), (35, 21))),
    Family("timm_dinov2", _timm("vit_small_patch14_dinov2", img_size=28, patch_size=7, dynamic_img_size=True), 1, 7, ((28, 28), (21, 42))),
    Family("timm_no_cls_token", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, class_token=False, global_pool="avg", dynamic_img_size=True), 0, 8, ((32, 32), (40, 24))),
    Family("timm_siglip_map", _timm("vit_base_patch16_siglip_224", img_size=32, patch_size=8, dynamic_img_size=True), 0, 8, ((32, 32), (24, 40))),
    Family("hf_vit", _hf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, num_labels=5), 1, 8, ((32, 32), (48, 32)), hf=True),
    Family("hf_deit", _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", image_size=32, patch_size=8, num_labels=5), 2, 8, ((32, 32), (24, 40)), hf=True),
    Family("hf_dinov2", _hf("Dinov2Config", "Dinov2Model", image_size=28, patch_size=7), 1, 7, ((28, 28), (35, 21)), hf=True),
    Family("hf_dinov2_reg", _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=28, patch_size=7, num_register_tokens=4), 5, 7, ((28, 28), (21, 35)), hf=True),
    Family("hf_clip_vision", _hf("CLIPVisionConfig", "CLIPVisionModel", image_size=32, patch_size=8), 1, 8, ((32, 32), (40, 24)), hf=True),
    Family("hf_siglip_vision", _hf("SiglipVisionConfig", "SiglipVisionModel", image_size=32, patch_size=8), 0, 8, ((32, 32), (24, 48)), hf=True),
]


#: families on which tracing/export tests run every variant; the others run "cbsa" only. The variants differ only in
#: their mixer (the same on every family), the families in what is around it (prefix tokens, sizes, wrappers), so
#: family x "cbsa" plus variant x these two families covers every path at a third of the full product's cost.
EVERY_VARIANT_FAMILIES = ("timm_vit", "hf_vit")


#: conversion options the tiny families' small grids need for a variant to take every path (windows of two or
#: two patches: several windows at every traced size, padding on odd grids, a far field outside the near one)
VARIANT_TEST_OPTIONS = {"multiscale": {"window": 2, "fine_pool": 2}, "window": {"window": 2}}


def variant_options(variant):
    """The conversion options of :data:`VARIANT_TEST_OPTIONS` for ``variant`` (none for the others)."""
    return dict(VARIANT_TEST_OPTIONS.get(variant, {}))


def family_variant_cases(variants):
    """``(family, variant)`` pairs: every family with ``variants[0]``, and every variant on
    :data:`EVERY_VARIANT_FAMILIES`; use with ``pytest.mark.parametrize("family, variant", ...)``."""
    return [pytest.param(f, v, id=f"{f.name}-{v}") for f in FAMILIES for v in variants
            if v == variants[0] or f.name in EVERY_VARIANT_FAMILIES]


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request) -> Family:
    return request.param


# --------------------------------------------------------------------------- fine-tuning (tests/helpers.py)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny image folder (``data/``) and a tiny timm ViT checkpoint (``tiny.safetensors``) with sharpened
    attention, per test module (:func:`helpers.make_assets`)."""
    from helpers import make_assets

    return make_assets(tmp_path_factory.mktemp("ft_assets"))
