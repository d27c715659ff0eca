"""What every layer above needs to know about a host model, written once.

* which library built it (:func:`is_hf`), and the module under its ``torch.compile`` / PEFT wrappers
  (:func:`uncompiled`, :func:`peft_base_model`, :func:`unwrapped`);
* its input size (:func:`input_size_of`) and its patch embedding, the ``Conv2d`` with
  ``kernel_size == stride`` whose output grid ``(h, w)`` is the patch grid (:func:`find_patch_embedding`);
* calling it on pixels (:func:`forward_pixels`: ``model(x)`` for timm, ``model(pixel_values=x)`` for
  transformers) and reading its logits (:func:`model_output`);
* its attention layers in block order (:func:`attention_layers`) and the one layer selector every entry
  point uses (:func:`select_layers`: ``None`` / an index / indices / a slice / ``"6:"`` / a predicate);
* the patch grid of the last forward pass (:class:`PatchGridWatch`, the hook :class:`~vit2cbsa.layout.GridRecorder`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import specs
from .adapters import ConvertedAttention, find_adapter
from .errors import LayerError, UnsupportedModelError
from .layout import GridRecorder, TokenLayout

InputSize = Tuple[int, int, int]  # channels, height, width
LayerSelector = Union[None, int, str, Sequence[int], slice, Callable[[int, str, nn.Module], bool]]

# --------------------------------------------------------------------------- wrappers and libraries

def is_hf(model: nn.Module) -> bool:
    """True for a Hugging Face transformers model (it has a ``config`` and lives in ``transformers.*``)."""
    return hasattr(model, "config") and type(model).__module__.startswith("transformers.")


def is_peft(module: nn.Module) -> bool:
    """True for a module defined by PEFT (a wrapper model or a tuner layer)."""
    return type(module).__module__.split(".")[0] == "peft"


def uncompiled(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrapper (which shares its parameters and submodules), or ``model``
    itself when it is not compiled."""
    from accelerate.utils import is_compiled_module

    inner = getattr(model, "_orig_mod", None) if is_compiled_module(model) else None
    return inner if isinstance(inner, nn.Module) else model


def peft_base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper wraps (``PeftModel.get_base_model()``; a tuner such as ``LoraModel``: its
    ``.model``), or ``model`` itself when it is not a PEFT wrapper. LoRA layers live inside that model, so it is
    what :func:`vit2cbsa.convert` converts and where it keeps the conversion info."""
    if not is_peft(model) or hasattr(model, "base_layer"):
        return model
    get = getattr(model, "get_base_model", None)
    inner = get() if callable(get) else getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and inner is not model else model


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` without its ``torch.compile`` and PEFT wrappers: the module that holds the conversion."""
    while True:
        inner = peft_base_model(uncompiled(model))
        if inner is model:
            return model
        model = inner


def _adapter_internals(model: nn.Module) -> List[str]:
    """Name prefixes of the modules a PEFT layer adds next to the layer it wraps (``lora_A``, ``lora_B``, ...):
    everything under a PEFT layer (one with a ``base_layer``) but its ``base_layer``."""
    prefixes = []
    for name, m in model.named_modules():
        if is_peft(m) and isinstance(getattr(m, "base_layer", None), nn.Module):
            for child, _ in m.named_children():
                if child != "base_layer":
                    prefixes.append(f"{name}.{child}" if name else child)
    return prefixes


# --------------------------------------------------------------------------- input and patch grid

def find_patch_embedding(model: nn.Module) -> Tuple[str, nn.Conv2d]:
    """The model's patchify convolution (``kernel_size == stride``), whose output grid is the patch grid.

    Under PEFT (LoRA on the patch embedding), the wrapped convolution (``base_layer``) is the one found,
    not the adapter's own ``lora_A`` convolution."""
    internal = tuple(p + "." for p in _adapter_internals(model))
    convs = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride) and max(m.stride) > 1
        and not (name + ".").startswith(internal or ("\0",))
    ]
    if not convs:
        raise UnsupportedModelError(
            "vit2cbsa: no patch embedding (a Conv2d with kernel_size == stride) was found, so converted layers "
            "could not know the patch grid. Convert the whole vision model (e.g. the timm model, or the HF "
            "ViTModel / CLIPVisionModel), not a sub-module."
        )
    if len(convs) > 1:
        names = ", ".join(n for n, _ in convs)
        raise UnsupportedModelError(
            f"vit2cbsa: found several patch embeddings ({names}); convert the vision tower on its own "
            "(e.g. `model.vision_model`)."
        )
    return convs[0]


def input_size_of(model: nn.Module) -> InputSize:
    """The ``(channels, height, width)`` a timm or transformers vision model is built for."""
    model = unwrapped(model)
    if is_hf(model):
        cfg = getattr(model.config, "vision_config", None) or model.config
        size = cfg.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(getattr(cfg, "num_channels", 3)), int(h), int(w)
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    if size is None:  # dynamic-size timm model: fall back to its data config
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    proj = getattr(patch, "proj", None)
    chans = getattr(proj, "in_channels", None) or getattr(model, "in_chans", 3)
    return int(chans), int(size[0]), int(size[1])


class PatchGridWatch:
    """Context manager recording the patch grid ``(h, w)`` of every forward pass of ``model``::

        with PatchGridWatch(model) as watch:
            model(x)
        watch.grid   # (14, 14) for a 224x224 image and 16x16 patches
    """

    def __init__(self, model: nn.Module) -> None:
        self.layout = TokenLayout()
        self._conv = find_patch_embedding(model)[1]
        self._handle: Any = None

    @property
    def grid(self) -> Optional[Tuple[int, int]]:
        return self.layout.grid

    def __enter__(self) -> "PatchGridWatch":
        self._handle = self._conv.register_forward_hook(GridRecorder(self.layout))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# --------------------------------------------------------------------------- calling the model

def forward_pixels(model: nn.Module, pixels: torch.Tensor) -> Any:
    """Call a timm (``model(x)``) or transformers (``model(pixel_values=x)``) vision model on images (also under
    DDP, FSDP, PEFT or ``torch.compile`` wrappers). Transformers models that can interpolate their position
    embeddings do so when the image size differs from the configured one."""
    inner = unwrapped(getattr(model, "module", model))
    if not is_hf(inner):
        return model(pixels)
    kwargs = {}
    if tuple(pixels.shape[1:]) != input_size_of(inner) and \
            "interpolate_pos_encoding" in inspect.signature(inner.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True
    return model(pixel_values=pixels, **kwargs)


def model_output(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The logits of a classifier (for a backbone: its pooled, else last hidden features) on ``pixels``."""
    out = forward_pixels(model, pixels)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "pooler_output", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


# --------------------------------------------------------------------------- attention layers

def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every attention layer of ``model`` (converted, or convertible by an adapter), in block order.
    Indices into this list are the layer indices of :func:`select_layers` and :func:`vit2cbsa.convert`."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, ConvertedAttention) or find_adapter(m) is not None]


def layers_text(layers: LayerSelector) -> str:
    """``layers`` as the user would write it: ``slice(6, None)`` -> ``'6:'``."""
    if isinstance(layers, slice):
        text = f"{'' if layers.start is None else layers.start}:{'' if layers.stop is None else layers.stop}"
        return repr(text + (f":{layers.step}" if layers.step is not None else ""))
    if callable(layers) and not isinstance(layers, str):
        return "<predicate>"
    return repr(layers)


def select_layers(selector: LayerSelector, candidates: Sequence[Tuple[str, nn.Module]]) -> List[int]:
    """Sorted indices into ``candidates`` (``(name, module)`` pairs, e.g. :func:`attention_layers`) that
    ``selector`` picks. Raises :class:`~vit2cbsa.errors.LayerError` when it picks nothing or names a layer that
    does not exist, ``TypeError`` when it is not a selector."""
    n = len(candidates)
    if n == 0:
        raise LayerError("the model has no attention layer that vit2cbsa can read (timm ViT, HF ViT/DeiT/"
                         "DINOv2/CLIP/SigLIP vision models)")
    layers = specs.normalize_layers(selector)
    if layers is None:
        out = list(range(n))
    elif isinstance(layers, slice):
        out = list(range(n))[layers]
    elif callable(layers):
        out = [i for i, (name, mod) in enumerate(candidates) if layers(i, name, mod)]
    else:
        out = []
        for i in layers:
            if not -n <= i < n:
                raise LayerError(f"layer {i} does not exist: the model has {n} attention "
                                 f"layers (0..{n - 1}, or -{n}..-1 from the end)")
            out.append(i % n)
    if not out:
        raise LayerError(f"layers={layers_text(selector)} selects none of the {n} attention layers (indices 0..{n - 1})")
    return sorted(set(out))


__all__ = ["InputSize", "LayerSelector", "PatchGridWatch", "attention_layers",
           "find_patch_embedding", "forward_pixels", "input_size_of", "is_hf", "is_peft", "layers_text",
           "model_output", "peft_base_model", "select_layers", "uncompiled", "unwrapped"]
