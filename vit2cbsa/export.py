"""Converted models out of Python: ``torch.export`` programs (``.pt2``) and ONNX files for ONNX Runtime.

    import vit2cbsa.export as ex
    program = ex.export_program(model)                  # torch.export.ExportedProgram
    report = ex.save_program(model, "model.pt2")        # torch.export.save, reloaded and checked against eager
    report = ex.export_onnx(model, "model.onnx")        # torch.onnx.export(dynamo=True), checked in onnxruntime

The exported graph takes images ``B x C x H x W`` and returns one tensor (:class:`ImagesToTensor`):
a timm model's output (logits, or features with ``num_classes=0``); a transformers model's ``logits``
(classifiers) or ``last_hidden_state``. The batch size is always dynamic; height and width are dynamic
where the exported graph can keep them (:func:`exports_other_sizes`: timm models built with
``dynamic_img_size=True``; transformers' position interpolation fixes the traced size), as multiples of the patch size
(``H = p_h * h``, ``W = p_w * w`` with ``2 <= h, w <= max_patches``). ONNX export needs the optional
``onnx``, ``onnxscript`` and ``onnxruntime`` packages (``pip install "vit2cbsa[export]"``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .errors import ExportError, one_line
from .modeling import find_patch_embedding, input_size_of, uncompiled
from .modeling import is_hf as _is_hf

PathLike = Union[str, Path]


def _hf_interpolates(model: nn.Module) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(model.forward).parameters


def accepts_other_sizes(model: nn.Module) -> bool:
    """Whether the model runs at input sizes other than the one it was built for (so H and W can be dynamic)."""
    model = uncompiled(model)
    if _is_hf(model):
        return _hf_interpolates(model) or "dinov2" in type(model).__name__.lower()
    patch = getattr(model, "patch_embed", None)
    return bool(getattr(model, "dynamic_img_size", False) or getattr(patch, "dynamic_img_size", False))


class ImagesToTensor(nn.Module):
    """``images -> tensor`` around a timm or transformers vision model, the signature that is exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = uncompiled(model)
        self._hf = _is_hf(self.model)
        # transformers: interpolate the position embeddings when the model can (as at other sizes in eager)
        self._kwargs = {"interpolate_pos_encoding": True} if self._hf and _hf_interpolates(self.model) else {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self._hf:
            return self.model(images)
        out = self.model(pixel_values=images, **self._kwargs)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def input_size(model: nn.Module) -> Tuple[int, int, int]:
    """``(channels, height, width)`` the model is built for."""

    return input_size_of(uncompiled(model))


def example_input(model: nn.Module, batch: int = 2, size: Optional[Tuple[int, int]] = None,
                  seed: int = 0) -> torch.Tensor:
    """Random images ``batch x C x H x W`` at the model's input size (or ``size``), on the model's device/dtype."""
    c, h, w = input_size(model)
    h, w = size or (h, w)
    param = next(uncompiled(model).parameters())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c, h, w, generator=gen).to(device=param.device, dtype=param.dtype)


def dynamic_shapes(model: nn.Module, dynamic_size: bool, max_patches: int = 256) -> Dict[str, Dict[int, Any]]:
    """The ``dynamic_shapes`` of ``torch.export`` for :class:`ImagesToTensor`: the batch, and H and W as
    multiples of the patch size when ``dynamic_size``."""
    from torch.export import Dim

    spec: Dict[int, Any] = {0: Dim("batch", min=1, max=4096)}
    if dynamic_size:
        _, conv = find_patch_embedding(uncompiled(model))
        ph, pw = conv.stride
        spec[2] = ph * Dim("h_patches", min=2, max=max_patches)  # a 1-patch axis: the original rejects it too
        spec[3] = pw * Dim("w_patches", min=2, max=max_patches)
    return {"images": spec}


def exports_other_sizes(model: nn.Module) -> bool:
    """Whether the exported graph can keep H and W dynamic: timm models built with ``dynamic_img_size=True``.

    transformers models run at other sizes in eager, but their position-embedding interpolation turns
    the traced size into constants (a ``ViTForImageClassification`` exported with dynamic H and W fails
    in ONNX Runtime at any other size, converted or not), so they export at a fixed size by default."""
    return accepts_other_sizes(model) and not _is_hf(uncompiled(model))


def _dynamic_size(model: nn.Module, dynamic_size: Optional[bool]) -> bool:
    other = accepts_other_sizes(model)
    if dynamic_size is None:
        return exports_other_sizes(model)
    if dynamic_size and not other:
        raise ExportError(f"{type(uncompiled(model)).__name__} runs only at its own input size, so height and width "
                          "cannot be dynamic; build it with dynamic_img_size=True (timm) or export with "
                          "dynamic_size=False")
    return dynamic_size


def export_program(model: nn.Module, example: Optional[torch.Tensor] = None, *,
                   dynamic_size: Optional[bool] = None, strict: bool = False) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of the model's inference graph (eval mode), dynamic batch (and H, W: module docstring).

    Args:
        model: a timm or transformers vision model, converted or not (also under ``torch.compile``).
        example: example images (default: two random images at the model's input size).
        dynamic_size: ``None`` (default): dynamic H and W where the export can keep them
            (:func:`exports_other_sizes`); ``True`` asks for them; ``False`` exports the example's size only.
        strict: ``torch.export``'s strict mode.

    Raises:
        ExportError with torch's reason on one line.
    """
    wrapped = ImagesToTensor(model).eval()
    example = example_input(model) if example is None else example
    shapes = dynamic_shapes(model, _dynamic_size(model, dynamic_size))
    try:
        with torch.no_grad():
            return torch.export.export(wrapped, (example,), dynamic_shapes=shapes, strict=strict)
    except Exception as e:
        raise ExportError(f"torch.export of {type(wrapped.model).__name__} failed: {one_line(e, 600)}") from e


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`save_program` wrote and how its outputs (in ONNX Runtime, or the
    reloaded program) compare to eager."""

    path: Path
    dynamic_size: bool
    checked_sizes: Tuple[Tuple[int, int, int], ...]  # (batch, H, W) of each check
    max_abs_diff: Optional[float]  # over all checks (None when not checked)


def run_onnx(path: PathLike, images: torch.Tensor) -> torch.Tensor:
    """Run an exported ONNX file on ``images`` with ONNX Runtime (CPU); returns the output as a tensor."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError('running ONNX files needs onnxruntime: pip install "vit2cbsa[export]"') from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (out, *_) = session.run(None, {name: images.detach().cpu().float().numpy()})
    return torch.from_numpy(out)


def check_sizes(model: nn.Module, dynamic_size: bool,
                size: Optional[Tuple[int, int]] = None) -> Tuple[Tuple[int, int, int], ...]:
    """Where to compare an export with eager: the traced size (``size``, default the model's own), another
    batch, and another H, W if dynamic."""
    _, h, w = input_size(model)
    h, w = size or (h, w)
    sizes = [(2, h, w), (3, h, w)]
    if dynamic_size:
        _, conv = find_patch_embedding(uncompiled(model))
        ph, pw = conv.stride
        sizes.append((1, h + 2 * ph, w + pw))  # taller and wider, not square
    return tuple(sizes)


def export_onnx(model: nn.Module, path: PathLike, example: Optional[torch.Tensor] = None, *,
                dynamic_size: Optional[bool] = None, check: bool = True, atol: float = 1e-4) -> ExportReport:
    """Export to ONNX with ``torch.onnx.export(..., dynamo=True)`` and check it in ONNX Runtime.

    The file is checked (``check=True``) at the traced size, at another batch size and, when H and W
    are dynamic, at another height and width: every output must be within ``atol`` of eager
    (float32), else :class:`ExportError`. Weights above 2 GB go to an external data file next to it.
    """
    try:
        for needed in ("onnx", "onnxscript"):
            importlib.import_module(needed)
    except ImportError as e:
        raise ExportError('ONNX export needs onnx and onnxscript: pip install "vit2cbsa[export]"') from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = ImagesToTensor(model).eval()
    dynamic = _dynamic_size(model, dynamic_size)
    example = example_input(model) if example is None else example
    try:
        with torch.no_grad():
            program = torch.onnx.export(wrapped, (example,), dynamo=True, dynamic_shapes=dynamic_shapes(model, dynamic),
                                        input_names=["images"], output_names=["output"], verbose=False)
        program.save(str(path))
    except Exception as e:
        raise ExportError(f"ONNX export of {type(wrapped.model).__name__} failed: {one_line(e, 600)}") from e
    sizes = check_sizes(model, dynamic, tuple(example.shape[-2:])) if check else ()
    worst = _compare(wrapped, lambda images: run_onnx(path, images), sizes, atol, f"{path}: ONNX Runtime")
    return ExportReport(path, dynamic, sizes, worst)


def _compare(wrapped: "ImagesToTensor", run: Any, sizes: Tuple[Tuple[int, int, int], ...], atol: float,
             what: str) -> Optional[float]:
    """The largest ``|run(images) - eager|`` over random images of each ``(batch, H, W)`` in ``sizes`` (``None``
    without sizes); :class:`ExportError` when a shape differs or a difference is above ``atol``."""
    worst = None
    for i, (b, h, w) in enumerate(sizes):
        images = example_input(wrapped.model, b, (h, w), seed=i + 1)
        with torch.no_grad():
            want = wrapped(images).float().cpu()
            got = run(images).float().cpu()
        if got.shape != want.shape:
            raise ExportError(f"{what} gives shape {tuple(got.shape)} at {b}x{h}x{w}, eager {tuple(want.shape)}")
        diff = (got - want).abs().max().item()
        worst = diff if worst is None else max(worst, diff)
        if not diff <= atol:
            raise ExportError(f"{what} differs from eager by {diff:.3g} (> {atol}) at {b}x{h}x{w}")
    return worst


def save_program(model: nn.Module, path: PathLike, example: Optional[torch.Tensor] = None, *,
                 dynamic_size: Optional[bool] = None, check: bool = True, atol: float = 1e-4) -> ExportReport:
    """:func:`export_program`, saved with ``torch.export.save`` to ``path`` (``.pt2``) and, with ``check=True``,
    reloaded and compared with eager at the sizes of :func:`check_sizes` (within ``atol``, else
    :class:`ExportError`)."""
    path = Path(path)
    dynamic = _dynamic_size(model, dynamic_size)
    example = example_input(model) if example is None else example
    program = export_program(model, example, dynamic_size=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    sizes = check_sizes(model, dynamic, tuple(example.shape[-2:])) if check else ()
    worst = None
    if sizes:
        reloaded = torch.export.load(str(path)).module()
        worst = _compare(ImagesToTensor(model).eval(), reloaded, sizes, atol, f"{path}: the reloaded program")
    return ExportReport(path, dynamic, sizes, worst)


__all__ = ["ExportReport", "ImagesToTensor", "accepts_other_sizes", "check_sizes", "dynamic_shapes",
           "example_input", "export_onnx", "export_program", "exports_other_sizes", "input_size", "run_onnx",
           "save_program"]
