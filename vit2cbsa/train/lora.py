"""LoRA for fine-tuning (PEFT): which modules get adapters, and the wrapped model.

By default the adapters go on every attention projection (q/k/v/output) of every attention layer, converted or
not, as the family's adapter names them (:func:`vit2cbsa.adapters.lora_target_modules`, a regular expression for
PEFT's ``target_modules``); ``--lora-targets`` names other modules instead. The ``mixer`` modules the conversion
added and the classifier head are trained in full (PEFT's ``modules_to_save``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from torch import nn

from ..adapters import lora_target_modules
from ..errors import UsageError

_LORA_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)

Targets = Union[str, List[str]]  # a regular expression (PEFT: re.fullmatch on module names) or full module names


def lora_targets(model: nn.Module, targets: Optional[Sequence[str]] = None) -> Targets:
    """What LoRA adapts: by default every attention projection of ``model`` (a regular expression from the
    adapters); else the full names of the modules each of ``targets`` names (itself or a ``.``-suffix), each of
    which must match some Linear/Conv/Embedding layer. Raises a one-line :class:`UsageError`."""
    modules = dict(model.named_modules())
    if targets is None:
        pattern = lora_target_modules(model)
        if pattern is None:
            raise UsageError("no attention projections found for LoRA; pass --lora-targets")
        return pattern
    names: List[str] = []
    for t in targets:
        hits = [n for n, m in modules.items() if (n == t or n.endswith("." + t)) and isinstance(m, _LORA_TYPES)]
        if not hits:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
            raise UsageError(f"LoRA target {t!r} matches no Linear/Conv layer of the model "
                             f"(its Linear layers are named: {', '.join(linear)})")
        names += hits
    return sorted(set(names))


def apply_lora(model: nn.Module, targets: Targets, head_names: Sequence[str], rank: int,
               alpha: Optional[float] = None, dropout: float = 0.0) -> nn.Module:
    """``model`` wrapped by PEFT with rank-``rank`` LoRA adapters on ``targets`` (``alpha`` default ``2 * rank``);
    the added ``mixer`` modules and the classifier modules ``head_names`` stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    existing = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, modules_to_save=["mixer"] + [h for h in head_names if h in existing])
    return get_peft_model(model, config)
