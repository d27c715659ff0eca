"""``convert``: replace a ViT's softmax self-attention with CBSA-family attention, all-or-nothing.

The walk: find every attention module an adapter recognises (in module order, which is block
order), select the requested ones, build every replacement first (sharing the pretrained
q/k/v/o ``nn.Linear`` layers), and only then swap them in and hook the patch embedding so
that the converted layers see the patch grid of each input. Any error before the swap
leaves the model exactly as it was.

The patch grid survives tracing (:mod:`vit2cbsa.layout`): the hook keeps ``torch.export``'s
symbolic sizes, and the patch-embedding convolution's class becomes :class:`~vit2cbsa.layout.GridConv2d`
(same parameters and names), which records the grid as graph values under ``torch.fx``. A converted
model exports with a dynamic batch size and image size wherever the original does, and traces with
``torch.fx`` (``create_feature_extractor``) wherever the original does; ``torch.jit.script`` raises one
line pointing to ``torch.export``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, List, Optional, Tuple, Union

from torch import nn

from .adapters import ADAPTERS, Adapter, find_adapter
from .attention import build_mixer
from .config import ConversionConfig
from .errors import RepresentativesWarning, UnsupportedModelError, UsageError
from .info import (_HOOK_ATTR, _INFO_ATTR, _LAYOUT_ATTR, ConversionInfo, ConvertedLayer, is_converted,
                   new_parameters, representatives_warning)
from .layout import GridConv2d, GridRecorder, TokenLayout
from .modeling import find_patch_embedding, peft_base_model, select_layers, uncompiled

logger = logging.getLogger("vit2cbsa")


def _unsupported_attention_names(model: nn.Module) -> List[str]:
    return sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})


#: patch embeddings that run a CNN before the tokens (timm hybrid ViTs such as ``vit_small_r26_s32_224``)
_CNN_STEMS = ("HybridEmbed", "HybridEmbedWithSize")


def _check_no_cnn_stem(model: nn.Module) -> None:
    stems = [(name, type(m).__name__) for name, m in model.named_modules() if type(m).__name__ in _CNN_STEMS]
    if stems:
        name, cls = stems[0]
        raise TypeError(
            f"vit2cbsa: {type(model).__name__} is a hybrid ViT with a CNN stem ({name or 'the model'} is a {cls}), "
            "which is not supported: its tokens come from a CNN feature map, not from a patch embedding. "
            "Use a plain ViT (e.g. vit_small_patch16_224)."
        )


def _native_patch_grid(model: nn.Module, patch: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """The patch grid of the model's own input size (timm ``patch_embed.grid_size``, or a transformers config's
    ``image_size`` over the patch stride); ``None`` when the model does not say."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and len(tuple(grid)) == 2:
        return int(grid[0]), int(grid[1])
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    sh, sw = patch.stride
    return int(h) // sh, int(w) // sw


def convert(
    model: nn.Module,
    config: Union[ConversionConfig, str, None] = None,
    *args: Any,
    inplace: bool = True,
    verbose: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Replace the softmax self-attention of a pretrained ViT with a CBSA-family attention.

    ``convert(model, config=None, **overrides)``: the :class:`~vit2cbsa.config.ConversionConfig` ``config`` (default:
    the defaults) with any of its fields overridden by keyword; ``config`` may also be a variant name, followed by
    ``num_representatives`` and ``layers`` positionally (``convert(model, "cbsa", 64, "6:")``).

    Options (the fields of :class:`~vit2cbsa.config.ConversionConfig`):
        variant: ``"cbsa"`` (extract, contract among representatives, broadcast),
            ``"contraction_free"`` (no contraction; Agent-Attention-like), ``"linear"``
            (kernelised linear attention) or any registered variant. See :mod:`vit2cbsa.attention`.
        num_representatives: pooled representatives per head (``extra_representatives`` adds its own
            to them): a square count (64 = an 8x8 grid) or an ``(h, w)`` grid. On inputs whose patch grid is
            smaller along an axis, that axis of the representative grid is clamped to the patch grid (each patch
            is its own representative). Ignored by variants without representatives (``"linear"``).
        layers: which attention layers to convert, indexed in block order: ``None`` (all), an int,
            a sequence of ints (negative allowed), a ``slice`` (``slice(6, None)`` = the paper's
            hybrid with the first half kept softmax), a string in the command-line syntax (``"6:"``,
            ``"0,1,2"``, ``"-1"``, ``"all"``), or a predicate ``f(index, name, module)``.
        broadcast: how representatives are broadcast back to tokens: ``"query"`` (softmax over the
            representatives' queries, Agent Attention; default: the best zero-shot accuracy with the prefix
            representatives, ``benchmarks/representatives.py``), ``"key"`` (over the extracted
            representative keys) or ``"transpose"`` (the paper's ``A^T``).
        extra_representatives: representatives next to the pooled grid: ``"prefix"`` (default: each
            prefix token -- class, distillation, register tokens -- is its own representative; a model
            without prefix tokens gets none), ``"global"`` (one more: the mean of the patch queries) or
            ``"none"`` (the pooled grid only). See :mod:`vit2cbsa.layout`.
        prefix_broadcast: ``"own"`` (default): a prefix token that is a representative reads back only its
            own representative, so at conversion its output is the pretrained attention's exactly;
            ``"all"``: it reads all representatives like the patch tokens.

    Args:
        inplace: modify ``model`` itself (default) or a deep copy of it. A ``torch.compile``d model is
            converted underneath its wrapper: in place, the wrapper is returned (it recompiles on its next
            call); otherwise a converted copy of the uncompiled model is returned (compile that).
        verbose: log the summary at INFO level (it is always available as ``model.vit2cbsa_info``).

    Returns:
        The converted model, with ``model.vit2cbsa_info`` (a :class:`~vit2cbsa.info.ConversionInfo`; its
        ``.config`` is the config applied, with the converted layers' indices).

    Raises:
        :class:`~vit2cbsa.errors.UsageError` (a ``ValueError``) on a bad option or an already converted model,
        :class:`~vit2cbsa.errors.LayerError` on a layer selection that selects nothing or a layer that does not
        exist, :class:`~vit2cbsa.errors.UnsupportedModelError` (a ``TypeError``) on a model without supported
        attention or without a patch embedding, or a hybrid ViT with a CNN stem. The model is then left unchanged.

    Warns (:class:`~vit2cbsa.errors.RepresentativesWarning`) when the representative grid is not smaller than the
    patch grid of the model's own input size: every patch is then its own representative, and the converted
    layers cost more than softmax attention there.

    PEFT: a ``PeftModel`` (or LoRA tuner) is converted underneath its wrapper, in the model it wraps, which
    also keeps ``vit2cbsa_info`` -- so ``conversion_info(peft_model)`` and, after ``merge_and_unload()``,
    ``conversion_info(merged)`` are the same info; ``inplace=False`` returns a converted copy of the wrapper.
    Either order works: convert, then add LoRA (``modules_to_save=["mixer"]`` to train the conversion's
    parameters too), or add LoRA, then convert: the converted layers keep the LoRA-wrapped projections, so they
    compute with the effective (base + LoRA) weights, and ``merge_and_unload()`` merges them as before. In
    that second order the conversion's new parameters are frozen (``requires_grad=False``) like the rest of
    the wrapped model, since ``peft_model.save_pretrained`` would not save them.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    config = ConversionConfig.build(config, *args, **overrides)
    inner = uncompiled(model)
    if inner is not model:
        converted = convert(inner, config, inplace=inplace, verbose=verbose)
        return model if inplace else converted
    base = peft_base_model(model)
    if base is not model:  # a PEFT wrapper: convert the model it wraps, where merge_and_unload() finds it
        if not inplace:
            model = copy.deepcopy(model)
            base = peft_base_model(model)
        convert(base, config, inplace=True, verbose=verbose)
        for p in new_parameters(base):  # frozen like the rest of the wrapped model (see above)
            p.requires_grad_(False)
        return model
    return _convert(model, config, inplace, verbose)


def _convert(model: nn.Module, config: ConversionConfig, inplace: bool, verbose: bool) -> nn.Module:
    if is_converted(model):
        raise UsageError(
            "vit2cbsa: this model is already converted (it contains CBSA-family attention). Convert the "
            "original model, or load a converted checkpoint with vit2cbsa.from_pretrained."
        )

    candidates: List[Tuple[str, nn.Module, Adapter]] = []
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is not None:
            candidates.append((name, module, adapter))
    if not candidates:
        found = _unsupported_attention_names(model)
        raise UnsupportedModelError(
            f"vit2cbsa: {type(model).__name__} has no supported self-attention module"
            + (f" (found: {', '.join(found)})" if found else "")
            + f". Supported families: {', '.join(a.name for a in ADAPTERS)} -- timm VisionTransformer "
            "(timm.layers.Attention) and Hugging Face ViT, DeiT, DINOv2, CLIP/SigLIP vision towers. "
            "Register an adapter with vit2cbsa.adapters.register_adapter for another family."
        )
    selected = select_layers(config.layers, [(n, m) for n, m, _ in candidates])
    _check_no_cnn_stem(model)
    patch_name, patch_conv = find_patch_embedding(model)
    patch_grid = _native_patch_grid(model, patch_conv)

    if not inplace:
        model = copy.deepcopy(model)
        modules = dict(model.named_modules())
        candidates = [(n, modules[n], a) for n, _, a in candidates]

    # Build every replacement before touching the model (all-or-nothing).
    layout = TokenLayout()
    replacements = []
    # named as after merge_and_unload() when LoRA wraps the patch embedding
    info = ConversionInfo(config.replace(layers=None), len(candidates),
                          patch_embedding=patch_name.replace(".base_layer", ""), patch_grid=patch_grid)
    for i in selected:
        name, module, adapter = candidates[i]
        spec = adapter.describe(module)
        mixer = build_mixer(config.variant, spec.num_heads, spec.head_dim, scale=spec.scale,
                            **config.mixer_options())
        new = adapter.build(module, mixer, layout)
        new.train(module.training)
        ref = next(module.parameters(), None)
        if ref is not None:
            new.mixer.to(device=ref.device, dtype=ref.dtype)
        replacements.append((name, new))
        info.converted.append(ConvertedLayer(i, name, adapter.name, spec.num_heads, spec.head_dim))
        info.new_parameters += sum(p.numel() for p in new.new_parameters())

    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    patch = model.get_submodule(patch_name)  # (in the copy, when not inplace)
    handle = patch.register_forward_hook(GridRecorder(layout))
    if type(patch) is nn.Conv2d:  # under torch.fx, where hooks do not run, the convolution records (GridConv2d)
        patch.__class__ = GridConv2d
        patch._vit2cbsa_layout = layout
    object.__setattr__(model, _LAYOUT_ATTR, layout)
    object.__setattr__(model, _HOOK_ATTR, handle)
    object.__setattr__(model, _INFO_ATTR, info)
    if info.saves_nothing():
        warnings.warn(representatives_warning(info, patch_grid), RepresentativesWarning, stacklevel=3)
    if verbose:
        logger.info("%s", info)
    return model

