"""The trained model a run leaves behind: ``out/final``.

``out/final`` is a :func:`vit2cbsa.save_pretrained` folder (``vit2cbsa.from_pretrained`` and ``vit2cbsa push``
take it as it is; LoRA merged), or, for an architecture that cannot be rebuilt from its recorded constructor
arguments, Accelerate's plain safetensors weights (``final.json``'s ``final_format`` says which).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..errors import one_line


def save_final(accelerator: Any, model: nn.Module, folder: Path, class_names: Optional[Sequence[str]] = None,
               unwrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> str:
    """Save ``model`` (never sharded here: under FSDP the gathered copy) to ``folder`` on every process; returns
    the format written, ``"vit2cbsa"`` or ``"safetensors"`` (the fallback, with a warning)."""
    from ..hub import save_pretrained

    acc, final = accelerator, Path(folder)
    fmt = "vit2cbsa"
    if acc.is_main_process:
        if final.exists():  # left by a launch killed while saving: ours to replace
            shutil.rmtree(final)
        try:
            save_pretrained(unwrap(model), final, class_names=list(class_names) if class_names is not None else None)
        except ValueError as e:
            acc.print(f"warning: out/final holds the weights only ({one_line(e)})")
            fmt = "safetensors"
    shared = [fmt]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(shared)
    if shared[0] == "safetensors":
        if final.exists() and acc.is_main_process:
            shutil.rmtree(final)
        acc.wait_for_everyone()
        acc.save_model(model, str(final))
    acc.wait_for_everyone()
    return shared[0]
