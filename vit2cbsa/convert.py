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
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

from torch import nn

from ._version import __version__
from .errors import UnsupportedModelError
from .adapters import ADAPTERS, Adapter, ConvertedAttention, find_adapter
from .attention import BROADCASTS, PREFIX_BROADCASTS, VARIANTS, build_mixer
from .layout import EXTRA_REPRESENTATIVES, GridConv2d, GridLike, GridRecorder, TokenLayout, as_grid, effective_grid
from .modeling import (LayerSelector, find_patch_embedding, peft_base_model, select_layers, uncompiled,
                       unwrapped)

logger = logging.getLogger("vit2cbsa")



class RepresentativesWarning(UserWarning):
    """The representative grid is not smaller than the patch grid: the conversion saves nothing there."""

_INFO_ATTR = "vit2cbsa_info"
_LAYOUT_ATTR = "_vit2cbsa_layout"
_HOOK_ATTR = "_vit2cbsa_hook"


@dataclass
class ConvertedLayer:
    index: int
    name: str
    family: str
    num_heads: int
    head_dim: int


@dataclass
class ConversionInfo:
    """What :func:`convert` did; attached to the model as ``model.vit2cbsa_info``."""

    variant: str
    num_representatives: Tuple[int, int]
    broadcast: str
    num_attention_layers: int
    converted: List[ConvertedLayer] = field(default_factory=list)
    patch_embedding: str = ""
    new_parameters: int = 0
    library_version: str = __version__
    extra_representatives: str = "none"
    prefix_broadcast: str = "all"
    #: the patch grid of the model's own input size, where the model has one (``None`` otherwise)
    patch_grid: Optional[Tuple[int, int]] = None

    @property
    def converted_indices(self) -> List[int]:
        return [layer.index for layer in self.converted]

    def grid_used(self, patch_grid: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """The pooled representative grid used on a ``patch_grid`` input (default: the model's own): the asked
        grid, each axis clamped to the patch grid."""
        patch_grid = patch_grid or self.patch_grid
        if patch_grid is None:
            return tuple(self.num_representatives)
        return effective_grid(tuple(self.num_representatives), *patch_grid)

    def saves_nothing(self, patch_grid: Optional[Tuple[int, int]] = None) -> bool:
        """True when, on a ``patch_grid`` input, the pooled representatives are not fewer than the patches
        (every patch is its own representative): the converted layers then cost more than softmax."""
        patch_grid = patch_grid or self.patch_grid
        if patch_grid is None or self.variant == "linear":
            return False
        gh, gw = self.grid_used(patch_grid)
        return gh * gw >= patch_grid[0] * patch_grid[1]

    def representatives_text(self, num_prefix: Optional[int] = None,
                             patch_grid: Optional[Tuple[int, int]] = None) -> str:
        """E.g. ``"4x4=16 pooled + one per prefix token (read back by that token alone) representatives"``; with
        ``num_prefix`` (the prefix tokens of an input) the count instead of "one per prefix token"; with
        ``patch_grid`` (the patch grid of an input) the grid actually used on it, e.g.
        ``"14x14=196 pooled (100x100 asked, clamped to the 14x14 patch grid) + 1 prefix ..."``."""
        gh, gw = self.num_representatives
        clamped = ""
        if patch_grid is not None:
            uh, uw = self.grid_used(patch_grid)
            if (uh, uw) != (gh, gw):
                clamped = f" ({gh}x{gw} asked, clamped to the {patch_grid[0]}x{patch_grid[1]} patch grid)"
                gh, gw = uh, uw
        per_prefix = "one per prefix token" if num_prefix is None else f"{num_prefix} prefix"
        extra = {"prefix": f" pooled{clamped} + {per_prefix}", "global": f" pooled{clamped} + 1 global",
                 "none": f"{clamped}"}[self.extra_representatives]
        if self.extra_representatives == "prefix":
            extra += " (read back " + ("by that token alone)" if self.prefix_broadcast == "own" else "by all tokens)")
        return f"{gh}x{gw}={gh * gw}{extra} representatives"

    def options(self) -> dict:
        """The :func:`convert` arguments that rebuild this conversion on the original model."""
        return {"variant": self.variant, "num_representatives": tuple(self.num_representatives),
                "layers": self.converted_indices, "broadcast": self.broadcast,
                "extra_representatives": self.extra_representatives, "prefix_broadcast": self.prefix_broadcast}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_representatives"] = list(self.num_representatives)
        d["patch_grid"] = list(self.patch_grid) if self.patch_grid is not None else None
        return d

    def __str__(self) -> str:
        how = "" if self.variant == "linear" else f" ({self.representatives_text(patch_grid=self.patch_grid)}, broadcast={self.broadcast!r})"
        rows = [
            f"vit2cbsa: converted {len(self.converted)}/{self.num_attention_layers} attention layers to "
            f"{self.variant!r}{how}; patch grid from {self.patch_embedding!r}; {self.new_parameters} new parameters",
        ]
        rows += [f"  [{l.index:>2}] {l.name}  ({l.family}, {l.num_heads} heads x {l.head_dim})" for l in self.converted]
        return "\n".join(rows)


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


def is_converted(model: nn.Module) -> bool:
    """True if ``model`` contains attention layers converted by vit2cbsa."""
    return any(isinstance(m, ConvertedAttention) for m in model.modules())


def convert(
    model: nn.Module,
    variant: str = "cbsa",
    num_representatives: GridLike = 64,
    layers: LayerSelector = None,
    *,
    broadcast: str = "query",
    extra_representatives: str = "prefix",
    prefix_broadcast: str = "own",
    inplace: bool = True,
    verbose: bool = False,
) -> nn.Module:
    """Replace the softmax self-attention of a pretrained ViT with a CBSA-family attention.

    Args:
        model: a timm ``VisionTransformer`` (any of its variants) or a Hugging Face ViT, DeiT,
            DINOv2 (with or without registers), CLIP or SigLIP vision model.
        variant: ``"cbsa"`` (extract, contract among representatives, broadcast),
            ``"contraction_free"`` (no contraction; Agent-Attention-like) or ``"linear"``
            (kernelised linear attention). See :mod:`vit2cbsa.attention`.
        num_representatives: pooled representatives per head (``extra_representatives`` adds its own
            to them): a square count (64 = an 8x8 grid) or an
            ``(h, w)`` grid. On inputs whose patch grid is smaller along an axis, that axis of the
            representative grid is clamped to the patch grid (each patch is its own representative).
            Ignored by ``"linear"``.
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
        inplace: modify ``model`` itself (default) or a deep copy of it. A ``torch.compile``d model is
            converted underneath its wrapper: in place, the wrapper is returned (it recompiles on its next
            call); otherwise a converted copy of the uncompiled model is returned (compile that).
        verbose: log the summary at INFO level (it is always available as ``model.vit2cbsa_info``).

    Returns:
        The converted model, with ``model.vit2cbsa_info`` (a :class:`ConversionInfo`).

    Raises:
        ValueError / TypeError on a bad option, an already converted model, a model without
        supported attention or without a patch embedding, a hybrid ViT with a CNN stem. The model is then
        left unchanged.

    Warns (:class:`RepresentativesWarning`) when the representative grid is not smaller than the patch grid
    of the model's own input size: every patch is then its own representative, and the converted layers
    cost more than softmax attention there.

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
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    inner = uncompiled(model)
    if inner is not model:
        converted = convert(inner, variant, num_representatives, layers, broadcast=broadcast,
                            extra_representatives=extra_representatives, prefix_broadcast=prefix_broadcast,
                            inplace=inplace, verbose=verbose)
        return model if inplace else converted
    base = peft_base_model(model)
    if base is not model:  # a PEFT wrapper: convert the model it wraps, where merge_and_unload() finds it
        if not inplace:
            model = copy.deepcopy(model)
            base = peft_base_model(model)
        convert(base, variant, num_representatives, layers, broadcast=broadcast,
                extra_representatives=extra_representatives, prefix_broadcast=prefix_broadcast,
                inplace=True, verbose=verbose)
        for p in new_parameters(base):  # frozen like the rest of the wrapped model (see above)
            p.requires_grad_(False)
        return model
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if broadcast not in BROADCASTS:
        raise ValueError(f"unknown broadcast {broadcast!r}; choose one of {list(BROADCASTS)}")
    if extra_representatives not in EXTRA_REPRESENTATIVES:
        raise ValueError(f"unknown extra_representatives {extra_representatives!r}; choose one of "
                         f"{list(EXTRA_REPRESENTATIVES)}")
    if prefix_broadcast not in PREFIX_BROADCASTS:
        raise ValueError(f"unknown prefix_broadcast {prefix_broadcast!r}; choose one of {list(PREFIX_BROADCASTS)}")
    rep_grid = as_grid(num_representatives)
    if is_converted(model):
        raise ValueError(
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
    selected = select_layers(layers, [(n, m) for n, m, _ in candidates])
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
    if variant == "linear":
        extra_representatives, prefix_broadcast = "none", "all"  # no representatives at all
    # named as after merge_and_unload() when LoRA wraps the patch embedding
    info = ConversionInfo(variant, rep_grid, broadcast, len(candidates),
                          patch_embedding=patch_name.replace(".base_layer", ""),
                          extra_representatives=extra_representatives, prefix_broadcast=prefix_broadcast,
                          patch_grid=patch_grid)
    for i in selected:
        name, module, adapter = candidates[i]
        spec = adapter.describe(module)
        mixer = build_mixer(variant, spec.num_heads, spec.head_dim, rep_grid, broadcast, spec.scale,
                            extra_representatives, prefix_broadcast)
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
        warnings.warn(representatives_warning(info, patch_grid), RepresentativesWarning, stacklevel=2)
    if verbose:
        logger.info("%s", info)
    return model


def representatives_warning(info: ConversionInfo, patch_grid: Tuple[int, int],
                            input_size: Optional[Tuple[int, int]] = None) -> str:
    """The warning for a representative grid that is not smaller than ``patch_grid`` (one line)."""
    gh, gw = info.num_representatives
    ph, pw = patch_grid
    at = f" of a {input_size[0]}x{input_size[1]} input" if input_size else " of the model's own input size"
    suggest = f"{max(1, ph // 2)}x{max(1, pw // 2)}"
    return (f"vit2cbsa: {gh}x{gw} representatives are not fewer than the {ph}x{pw}={ph * pw} patches{at}: every "
            f"patch is its own representative ({ph}x{pw} used), so the converted layers save nothing there and cost "
            f"more than softmax; use fewer than {ph}x{pw}, e.g. {suggest}")


#: options of a saved conversion that folders written before the option existed leave out: the behaviour then
SAVED_DEFAULTS = {"extra_representatives": "none", "prefix_broadcast": "all"}


def saved_options(conv: dict) -> dict:
    """The :func:`convert` arguments of the ``"conversion"`` entry of a saved ``vit2cbsa_config.json``."""
    return {"variant": conv["variant"], "num_representatives": tuple(conv["num_representatives"]),
            "layers": list(conv["converted_layers"]), "broadcast": conv["broadcast"],
            **{k: conv.get(k, v) for k, v in SAVED_DEFAULTS.items()}}


def conversion_info(model: nn.Module) -> Optional[ConversionInfo]:
    """The :class:`ConversionInfo` of a converted model, or ``None``; found through ``torch.compile`` and PEFT
    wrappers (it is kept on the model they wrap, which ``merge_and_unload()`` returns)."""
    info = getattr(model, _INFO_ATTR, None)
    return info if info is not None else getattr(unwrapped(model), _INFO_ATTR, None)


def layout_of(model: nn.Module) -> TokenLayout:
    """The shared :class:`TokenLayout` of a converted model (to set the grid by hand)."""
    layout = getattr(model, _LAYOUT_ATTR, None) or getattr(unwrapped(model), _LAYOUT_ATTR, None)
    if layout is None:
        raise ValueError("vit2cbsa: this model was not converted with vit2cbsa.convert")
    return layout


def new_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters added by the conversion (step sizes, feature maps) across all converted layers."""
    return [p for m in model.modules() if isinstance(m, ConvertedAttention) for p in m.new_parameters()]
