"""Reading the data during a run: the data loaders, and the accuracy of a model on an evaluation set.

Evaluations during training use a fixed random subset of the evaluation split (``eval_subset`` images), the
final one the whole split; each has its own progress bar. Unreadable images left out under
``skip_bad_images`` (a third batch element, 1 for a replaced sample) are not counted.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..modeling import model_output
from .progress import progress_bar


def data_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                pin_memory: bool = False) -> DataLoader:
    """A loader over ``dataset``: shuffled, whole batches only for training; in order for evaluation."""
    # its own generator: a DataLoader without one draws a seed from the global RNG each epoch,
    # which a resumed run (one more iterator, for the partial epoch) would do once more
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(accelerator: Any, model: nn.Module, loader: DataLoader, desc: str) -> Tuple[float, Dict[str, Any]]:
    """Top-1 accuracy of ``model`` over ``loader`` (prepared here, gathered over the processes), with a progress
    bar named ``desc``; and ``{"eval_images", "eval_s", "bad_images"}`` (images counted, seconds, images left out
    as unreadable). ``model`` is put in eval mode for it and back as it was."""
    acc = accelerator
    loader = acc.prepare_data_loader(loader)
    was_training = model.training
    model.eval()
    correct = total = bad = 0
    t0 = time.perf_counter()
    bar = progress_bar(acc.is_main_process, iterable=loader, desc=desc, leave=False, unit="batch")
    for batch in bar:
        x, y = batch[0], batch[1]
        valid = batch[2] == 0 if len(batch) > 2 else torch.ones_like(y, dtype=torch.bool)
        with acc.autocast():
            pred = model_output(model, x).argmax(-1)
        pred, y, valid = acc.gather_for_metrics((pred, y, valid))
        correct += ((pred == y) & valid).sum().item()
        total += valid.sum().item()
        bad += (~valid).sum().item()
    bar.close()
    model.train(was_training)
    return correct / max(1, total), dict(eval_images=total, eval_s=round(time.perf_counter() - t0, 3), bad_images=bad)
