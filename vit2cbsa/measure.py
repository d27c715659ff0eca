"""Measuring converted vs original models: FLOPs, side-by-side timing, feature fidelity.

* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions
  and attention kernels; elementwise ops are not counted), through :func:`flop_counter`, which adds
  the formulas some torch releases lack for the CPU fused attention kernels
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward): per head, forward
  ``2 Nq Nk d + 2 Nq Nk dv``; backward ``2 Nq Nk (2 d + 2 dv) + 2 Nq Nk d`` (scores recomputed,
  then the gradients of ``V``, of the scores, of ``Q`` and of ``K``) -- the counts torch uses for
  its GPU kernels. Without them the original model's attention counted as 0 FLOPs on the CPU.
* :func:`count_flops` runs the call on fake tensors (shapes only, no arithmetic), so counting a model at a
  large resolution takes seconds; the counts are those of the real call.
* Timing is side by side: the models run alternately on the same input in the same process,
  after warm-up, and the median of the repeats is reported, so the ratio is robust to the
  machine's load drifting during the run; :func:`paired_ratio_quartiles` gives the spread of the
  per-round ratios (each from two calls made back to back).
* Fidelity: cosine similarity ``<f, g> / (|f| |g|)`` of features, averaged over images.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modeling import model_output


def _sdpa_forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = q
    return 2 * b * h * nq * k[-2] * (d + v[-1])


def _sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = q
    return 2 * b * h * nq * k[-2] * (2 * d + 2 * v[-1] + d)


def flop_counter(**kwargs) -> FlopCounterMode:
    """A ``FlopCounterMode`` (same arguments) that also counts the CPU fused attention kernels where
    this torch's registry has no formula for them (the counts of the GPU kernels' formulas)."""
    from torch.utils import flop_counter as fc

    registry = getattr(fc, "flop_registry", None) or getattr(fc, "FLOP_REGISTRY", {})
    extra = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in registry:
            extra[op] = formula
    extra.update(kwargs.pop("custom_mapping", None) or {})
    kwargs.setdefault("display", False)
    return FlopCounterMode(custom_mapping=extra, **kwargs)


def count_flops(fn: Callable[..., object], *inputs: torch.Tensor, fake: bool = True) -> int:
    """FLOPs of one call ``fn(*inputs)`` (no gradients).

    With ``fake=True`` (default) the call runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes,
    dtypes and devices, no values and no arithmetic), so counting a ViT at 4096x4096 takes seconds instead of
    the minutes its real forward pass would; the count is the same, since FLOPs depend on shapes only. The
    model's real parameters and the real ``inputs`` are read as fake tensors (nothing is copied or changed).
    A call that needs real values (an op with a data-dependent output shape, ``.item()``) is counted again on
    the real tensors; ``fake=False`` always does that.
    """
    if fake:
        try:
            return _count(fn, inputs, fake=True)
        except Exception:  # an op fake tensors cannot run (data-dependent): count it the slow way below
            pass
    return _count(fn, inputs, fake=False)


def _count(fn: Callable[..., object], inputs: Sequence[torch.Tensor], fake: bool) -> int:
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad(), flop_counter() as counter:
        fn(*inputs)
    return int(counter.get_total_flops())


def time_repeats(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each call of each function, calling them alternately (``fns`` in order) ``repeats`` times
    after ``warmup`` untimed rounds: entry ``i`` of every list comes from the same round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def time_side_by_side(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function, calling them alternately ``repeats`` times."""
    return {name: statistics.median(ts) for name, ts in time_repeats(fns, repeats, warmup).items()}


def paired_ratio_quartiles(reference: Sequence[float], other: Sequence[float]) -> Tuple[float, float, float]:
    """Lower quartile, median and upper quartile of ``reference[i] / other[i]`` over rounds ``i``.

    Each ratio compares two calls made back to back (:func:`time_repeats`), so the spread shows how much
    a speed ratio moves with the machine's load. Quartiles as ``statistics.quantiles(n=4)`` (exclusive
    method); with a single round all three are its ratio."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"need the same non-zero number of rounds, got {len(reference)} and {len(other)}")
    ratios = [r / o for r, o in zip(reference, other)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return q1, median, q3


def feature_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two feature batches (flattened per sample)."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean().item()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` (logits out) on preprocessed ``images``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model_output(model, images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)
