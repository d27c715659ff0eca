"""Attention alignment: each converted layer learns to reproduce its original layer on the original's inputs.

For every converted layer ``l`` with original (frozen teacher) layer ``T_l`` and converted
layer ``S_l``, one batch of images gives, from a single teacher forward pass, the inputs
``X_l`` that ``T_l`` received and its outputs ``Y_l = T_l(X_l)``. The alignment loss is::

    L = sum_l ||S_l(X_l) - Y_l||^2 / ||Y_l||^2          (relative squared error per layer)

All layers train at once, each on the teacher's own inputs (no error accumulation through the
student), and only attention parameters of the converted layers need gradients. This is what
LoLCATs and ViT-AdaLA do for linear attention, applied here to every variant.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..adapters import ConvertedAttention
from ..info import conversion_info, layout_of
from ..layout import GridRecorder
from ..modeling import find_patch_embedding, model_output


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class AttentionAligner(nn.Module):
    """Pairs each converted layer of ``student`` with the same-named layer of ``teacher``.

    Args:
        student: a model converted with :func:`vit2cbsa.convert`.
        teacher: the original (unconverted) model, with the same module names; kept frozen.
        trainable: ``"new"`` trains only the parameters added by the conversion (step sizes,
            temperatures, feature maps); ``"attention"`` also the pretrained q/k/v/o of the
            converted layers. Everything else in the student is left untouched.
        teacher_as_submodule: register the teacher as a submodule (``aligner.teacher``: moved by
            ``.to()``, in ``state_dict()``, wrapped by DDP with the rest). ``False`` keeps it outside the
            module tree, so a sharding wrapper (FSDP) applied to the aligner shards only the student and
            the teacher stays a plain frozen copy that can still be called on its own.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, trainable: str = "attention", *,
                 teacher_as_submodule: bool = True) -> None:
        super().__init__()
        info = conversion_info(student)
        if info is None:
            raise ValueError("align: `student` was not converted with vit2cbsa.convert")
        if trainable not in ("new", "attention"):
            raise ValueError(f"trainable must be 'new' or 'attention', got {trainable!r}")
        self.student = student
        if teacher_as_submodule:
            self.teacher = teacher.eval().requires_grad_(False)
        else:
            object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.names = [layer.name for layer in info.converted]
        self.captured: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for name in self.names:
            try:
                t_mod = teacher.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"align: the teacher has no module {name!r}; pass the original model") from e
            if isinstance(t_mod, ConvertedAttention):
                raise ValueError("align: the teacher is converted too; pass the original (unconverted) model")
            self.handles.append(t_mod.register_forward_hook(self._capture(name), with_kwargs=True))
        _, conv = find_patch_embedding(teacher)
        self.handles.append(conv.register_forward_hook(GridRecorder(layout_of(student))))
        self.student_layers: List[ConvertedAttention] = [student.get_submodule(n) for n in self.names]
        self.new = [p for m in self.student_layers for p in m.new_parameters()]
        new_ids = {id(p) for p in self.new}
        self.pretrained = [] if trainable == "new" else [
            p for m in self.student_layers for p in m.parameters() if id(p) not in new_ids
        ]

    def _capture(self, name: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            self.captured[name] = (x.detach(), _first(output).detach())

        return hook

    def train(self, mode: bool = True) -> "AttentionAligner":
        """Set the student's train mode; the teacher always stays in eval mode (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def parameters_to_train(self) -> List[nn.Parameter]:
        return self.new + self.pretrained

    def param_groups(self, lr: float, pretrained_lr: float) -> List[dict]:
        """Optimiser groups: added parameters at ``lr``, pretrained q/k/v/o at ``pretrained_lr``."""
        groups = [{"params": self.new, "lr": lr}]
        if self.pretrained:
            groups.append({"params": self.pretrained, "lr": pretrained_lr})
        return groups

    def forward(self, pixel_values: torch.Tensor, predict: bool = False):
        """Alignment loss on a batch of images: ``(total, [per-layer relative errors])``.

        ``predict=True``: the student's logits (:func:`~vit2cbsa.modeling.model_output`) instead, so that a wrapper around the
        aligner (FSDP, whose root must run first) can evaluate the student through it."""
        if predict:
            return model_output(self.student, pixel_values)
        self.captured.clear()
        with torch.no_grad():
            model_output(self.teacher, pixel_values)
        losses = []
        for name, layer in zip(self.names, self.student_layers):
            x, y = self.captured[name]
            out, y = _first(layer(x)).float(), y.float()  # sums over every element: in float32 under mixed precision
            losses.append((out - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12))
        return torch.stack(losses).sum(), losses

    def remove(self) -> None:
        """Remove the hooks from the teacher."""
        for h in self.handles:
            h.remove()
        self.handles = []


def align_attention(
    student: nn.Module,
    teacher: nn.Module,
    images: Iterable[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    trainable: str = "attention",
    pretrained_lr: Optional[float] = None,
    callback: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Align ``student``'s converted layers to ``teacher`` for ``steps`` batches (cycling ``images``).

    Uses AdamW on the aligner's trainable parameters (others are not touched, gradients off
    for them during the run): the added parameters at ``lr``, the pretrained projections (with
    ``trainable="attention"``) at ``pretrained_lr`` (default ``lr / 10``). Returns the loss history. For multi-process training,
    distributed data and checkpointing, use ``examples/finetune.py`` (Accelerate).
    """
    aligner = AttentionAligner(student, teacher, trainable)
    params = aligner.parameters_to_train()
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(aligner.param_groups(lr, lr / 10 if pretrained_lr is None else pretrained_lr),
                            weight_decay=0.0)
    history: List[float] = []
    batches: Iterator[torch.Tensor] = _cycle(images)
    was_training = student.training
    student.train()
    try:
        for step in range(steps):
            loss, _ = aligner(next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
            if callback is not None:
                callback(step, history[-1])
    finally:
        aligner.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        student.train(was_training)
    return history


def _cycle(iterable: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    while True:
        empty = True
        for item in iterable:
            empty = False
            yield item[0] if isinstance(item, (tuple, list)) else item
        if empty:
            raise ValueError("align: the image iterable is empty")
