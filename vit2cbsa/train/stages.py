"""The two training stages: what each trains, with which optimizer and loss, and the learning-rate schedule.

* ``align`` (:func:`align_stage`): only the attention parameters of the converted layers train (the added
  ones at ``align_lr``, with ``align_trainable="attention"`` the pretrained q/k/v/o at ``align_pretrained_lr``,
  default ``align_lr / 10``), each converted layer to reproduce the original layer's output on the original's
  inputs (:class:`~vit2cbsa.train.AttentionAligner`)::

      L_align = sum_l ||S_l(X_l) - Y_l||^2 / ||Y_l||^2

* ``finetune`` (:func:`finetune_stage`): supervised training of the whole model, or of LoRA adapters
  (:mod:`vit2cbsa.train.lora`), AdamW with weight decay on the matrices only, optionally distilling the
  original's logits ``z_orig`` at temperature ``T`` with weight ``w``::

      L = (1 - w) CE(z, y) + w T^2 KL(softmax(z_orig / T) || softmax(z / T))

* both: linear warm-up over ``warmup_ratio`` of the stage's steps, then a cosine decay to 0
  (:func:`warmup_cosine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import model_output
from .align import AttentionAligner
from .config import FinetuneConfig
from .lora import Targets, apply_lora

#: names of parameters that never get weight decay (besides biases and norms, every parameter with ndim <= 1)
NO_DECAY = ("pos_embed", "cls_token", "reg_token", "dist_token")


@dataclass
class Stage:
    """What a stage trains: ``module`` (what ``accelerator.prepare`` gets), its ``optimizer``, ``loss(module,
    batch)``, and ``eval_model(prepared module)``: the model to evaluate after it."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module, Any], torch.Tensor]
    eval_model: Callable[[nn.Module], nn.Module]


class ThroughAligner(nn.Module):
    """The student of an FSDP-sharded :class:`AttentionAligner`, called through the aligner (the root unit, whose
    forward gathers the student's top-level parameters); for evaluations during alignment."""

    def __init__(self, aligner: nn.Module) -> None:
        super().__init__()
        self.aligner = aligner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aligner(x, predict=True)


def align_stage(config: FinetuneConfig, student: nn.Module, original: nn.Module, accelerator: Any, fsdp: bool,
                unwrap: Callable[[nn.Module], nn.Module]) -> Stage:
    """Attention alignment of ``student``'s converted layers to ``original``'s (``unwrap``: Accelerate's wrappers
    off a prepared module). Under FSDP the original stays outside the sharded module, a plain frozen copy on
    every process, and evaluations call the student through the aligner."""
    c = config
    aligner = AttentionAligner(student, original, c.align_trainable, teacher_as_submodule=not fsdp)
    student.requires_grad_(False)
    for p in aligner.parameters_to_train():
        p.requires_grad_(True)
    plr = c.align_pretrained_lr if c.align_pretrained_lr is not None else c.align_lr / 10
    optimizer = torch.optim.AdamW(aligner.param_groups(c.align_lr, plr), weight_decay=0.0)

    def loss(module: nn.Module, batch: Any) -> torch.Tensor:
        # autocast: under FSDP mixed precision the root casts the images to bf16/fp16 (no autocast of its own),
        # and the frozen float32 teacher inside the aligner needs it to take them
        with accelerator.autocast():
            return module(batch[0])[0]

    if fsdp:  # the student's own top-level parameters are in the aligner's root unit: evaluate through it
        return Stage(aligner, optimizer, loss, ThroughAligner)
    return Stage(aligner, optimizer, loss, lambda m: unwrap(m).student)


def finetune_stage(config: FinetuneConfig, student: nn.Module, original: nn.Module, accelerator: Any,
                   targets: Optional[Targets], head_names: Sequence[str],
                   unwrap: Callable[[nn.Module], nn.Module]) -> Stage:
    """Supervised fine-tuning of ``student`` (whole, or LoRA on ``targets`` with ``config.lora_rank > 0``), with
    distillation from ``original``'s logits when ``config.distill_weight > 0``."""
    c = config
    student.requires_grad_(True)
    model = student
    if c.lora_rank > 0:
        model = apply_lora(student, targets, head_names, c.lora_rank, c.lora_alpha, c.lora_dropout)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            flat = p.ndim <= 1 or name.endswith(NO_DECAY)
            (no_decay if flat else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
    w, T = c.distill_weight, c.temperature

    def loss(module: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = model_output(module, x)
        ce = F.cross_entropy(logits.float(), y)  # (bf16 logits under FSDP mixed precision)
        if w <= 0:
            return ce
        with torch.no_grad(), accelerator.autocast():
            target = model_output(original, x)
        kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(target.float() / T, -1),
                      reduction="batchmean", log_target=True) * T * T
        return (1 - w) * ce + w * kl

    return Stage(model, optimizer, loss, unwrap)


def warmup_cosine(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor of step ``step`` of ``total``: linear warm-up over ``round(total * warmup_ratio)``
    steps, then ``(1 + cos(pi * progress)) / 2``."""
    warmup = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor
