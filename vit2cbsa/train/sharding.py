"""Sharded fine-tuning of converted models with Accelerate's FSDP2 (``accelerate launch --config_file
examples/accelerate_fsdp.yaml``).

What :func:`vit2cbsa.train.run` does differently when the launcher asks for FSDP:

* **Units.** The wrap policy is chosen here, from the model, not from ``fsdp_transformer_layer_cls_to_wrap``
  alone: every ViT block (the module of a ``ModuleList`` / ``Sequential`` holding an attention layer:
  timm ``Block``, transformers ``ViTLayer`` / ``CLIPEncoderLayer`` / ...) and, nested inside it, every
  converted attention module are FSDP units (plus any class the config names); the root holds the rest
  (embeddings, final norm, head). The added attention parameters (step sizes ``kappa``, ``gamma``,
  temperatures, the linear variant's feature maps) are parameters of the converted attention unit, so
  they are sharded, all-gathered and reduce-scattered like its pretrained projections; nothing in the
  mixers or in the hand-written backward ever sees a shard (FSDP hands the unit its full parameters for
  the forward and the backward).
* **Alignment** calls the converted attention layers one by one (not the whole student); that works because
  each of them is its own unit. The frozen original (the teacher) is kept out of the sharded module
  (``AttentionAligner(..., teacher_as_submodule=False)``): a plain copy on every process, as for
  distillation.
* **Between stages and at the end** the full state dict is gathered (``torch.distributed.checkpoint``'s
  ``get_model_state_dict(full_state_dict=True)``) and loaded into a plain (unsharded) copy of the converted
  model: fine-tuning starts from the aligned weights, LoRA is merged on the plain copy, the final evaluation
  runs it, and ``out/final`` is a :func:`vit2cbsa.save_pretrained` folder, exactly as without FSDP.
* **Checkpoints** are Accelerate's sharded ones (``pytorch_model_fsdp_0/`` and ``optimizer_0/``, one
  ``.distcp`` file per process, with ``SHARDED_STATE_DICT``), checked before resuming like the others
  (:func:`dcp_problem`: the ``.metadata`` file parses and every file it points into is long enough).
* **Mixed precision**: parameters are all-gathered in the training dtype and gradients reduced in float32
  (``MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=float32)``), unless the config sets a policy.
* **CPU processes**: Accelerate runs FSDP only on accelerators and silently falls back to DDP on CPU processes;
  PyTorch's FSDP2 itself shards CPU tensors over gloo, so :func:`shard_cpu_processes` switches Accelerate to its
  FSDP code path there (the tests run the whole FSDP path on 2 CPU processes this way).

Only FSDP2 (``fsdp_version: 2``) is supported; an FSDP1 configuration is refused with a one-line error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

FSDP_ENV = "ACCELERATE_USE_FSDP"


def fsdp_requested() -> bool:
    """True when ``accelerate launch`` was given an FSDP configuration (it sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get(FSDP_ENV, "false").lower() == "true"


def fsdp_version() -> int:
    return int(os.environ.get("FSDP_VERSION", "1"))


def make_plugin(mixed_precision: Optional[str]):
    """Accelerate's FSDP plugin from the launcher's environment, with gradients reduced in float32 under
    mixed precision (unless the configuration chose a policy)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    mp = (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}.get(mp)
    if dtype is not None and plugin.mixed_precision_policy is None and plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return plugin


def quiet_view_warning() -> None:
    """Silence FSDP2's warning that a unit returned a view: the converted attention returns ``proj(x)`` (a view of a
    matmul) and every supported block adds it out of place (``x = x + attn(...)``), which keeps the hook."""
    import warnings

    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def shard_cpu_processes(accelerator, plugin) -> bool:
    """Put ``accelerator`` on Accelerate's FSDP code path when it fell back to DDP on CPU processes
    (``DistributedType.MULTI_CPU``: Accelerate only shards on accelerators). Returns True if it did."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    # both shared states: every AcceleratorState() made later copies PartialState's fields again
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no" and plugin.mixed_precision_policy is None:
        plugin.set_mixed_precision(accelerator.mixed_precision)
    return True


def _containers(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}


def block_names(model: nn.Module) -> List[str]:
    """Names of the ViT blocks of ``model``: for every converted attention layer, its nearest ancestor that is
    an element of a ``ModuleList`` / ``Sequential`` (the residual block holding it)."""
    from ..adapters import ConvertedAttention

    containers = _containers(model)
    blocks = []
    for name, m in model.named_modules():
        if not isinstance(m, ConvertedAttention):
            continue
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            if ".".join(parts[: cut - 1]) in containers and parts[cut - 1].isdigit():
                blocks.append(".".join(parts[:cut]))
                break
    return list(dict.fromkeys(blocks))


def unit_classes(model: nn.Module, extra: Iterable[str] = ()) -> List[str]:
    """Class names FSDP wraps as units: the blocks, the converted attention modules, and ``extra``."""
    from ..adapters import ConvertedAttention

    modules = dict(model.named_modules())
    names = {type(modules[b]).__name__ for b in block_names(model)}
    names |= {type(m).__name__ for m in model.modules() if isinstance(m, ConvertedAttention)}
    present = {type(m).__name__ for m in model.modules()}
    names |= {n for n in extra if n in present}
    return sorted(names)


def set_wrap_policy(plugin, model: nn.Module, extra: Iterable[str] = ()) -> List[str]:
    """Make ``plugin`` wrap the blocks and converted attention modules of ``model`` (before each ``prepare``:
    Accelerate freezes the policy into a partial on first use)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    classes = unit_classes(model, extra)
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = classes
    return classes


def describe_units(model: nn.Module) -> str:
    """``"2 Block, 2 TimmConvertedAttention, 1 LayerNorm + the root"``: the FSDP units of a prepared model."""
    from torch.distributed.fsdp import FSDPModule

    counts: Dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, FSDPModule) and m is not model:  # fully_shard made its class FSDP<Class>(FSDPModule, Class)
            base = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule)).__name__
            counts[base] = counts.get(base, 0) + 1
    return ", ".join(f"{n} {c}" for c, n in counts.items()) + " + the root"


def full_state_dict(module: nn.Module, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded ``module`` on every process (keys starting with ``prefix``, with
    ``prefix`` removed). A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def dcp_problem(folder: Path) -> Optional[str]:
    """Why the ``torch.distributed.checkpoint`` folder ``folder`` is incomplete, or None: its ``.metadata``
    must load and every ``.distcp`` file must be as long as the metadata says."""
    meta = folder / ".metadata"
    if not meta.is_file():
        return f"{folder.name}/ has no .metadata (a sharded save cut short)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # a truncated pickle, or not a checkpoint at all
        return f"{folder.name}/.metadata is unreadable ({type(e).__name__})"
    need: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = folder / rel
        if not f.is_file():
            return f"{folder.name}/{rel} is missing"
        if f.stat().st_size < size:
            return f"{folder.name}/{rel} is truncated ({f.stat().st_size} of {size} bytes)"
    return None
