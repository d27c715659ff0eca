"""Measuring converted vs original models: FLOPs, side-by-side timing, feature fidelity.

* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions
  and attention kernels; elementwise ops are not counted).
* Timing is side by side: the models run alternately on the same input in the same process,
  after warm-up, and the median of the repeats is reported, so the ratio is robust to the
  machine's load drifting during the run.
* Fidelity: cosine similarity ``<f, g> / (|f| |g|)`` of features, averaged over images.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[..., object], *inputs: torch.Tensor) -> int:
    """FLOPs of one call ``fn(*inputs)`` (no gradients)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*inputs)
    return int(counter.get_total_flops())


def time_side_by_side(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function, calling them alternately ``repeats`` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def feature_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two feature batches (flattened per sample)."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean().item()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` (logits out) on preprocessed ``images``."""
    from .train import call_model

    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (call_model(model, images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)
