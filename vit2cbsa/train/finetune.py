"""Convert a pretrained ViT and train it back to accuracy: attention alignment, then fine-tuning.

``run(FinetuneConfig(...))`` (CLI: ``accelerate launch examples/finetune.py``) does, in order:

0. load the model (timm / transformers / the embedded CIFAR-10 teacher) and the dataset, keep a
   frozen copy of the original and convert the other (:func:`vit2cbsa.convert`);
1. ``align`` (``align_steps > 0``): only the attention parameters of the converted layers train,
   each layer to reproduce the original layer's output on the original's inputs (no labels;
   :class:`~vit2cbsa.train.AttentionAligner`);
2. ``finetune`` (``finetune_steps > 0``): supervised training of the whole model, or of LoRA
   adapters on the pretrained attention projections (PEFT) with the added ``mixer`` parameters
   and the classifier head trained in full; optionally distilling the original's logits
   (``loss = (1 - w) CE + w T^2 KL(p_orig^T || p^T)``);
3. final evaluation of the original and the converted model -> ``out/final.json``, weights (LoRA
   merged) -> ``out/final/model.safetensors``.

Accelerate does the distributed work (DDP, or FSDP2 as configured with ``accelerate config`` /
``examples/accelerate_fsdp.yaml``; :mod:`vit2cbsa.train.sharding` says what changes under FSDP: the units are
the ViT blocks and the converted attention layers, the teacher stays unsharded, weights are gathered between
stages and for ``out/final``), mixed precision (bf16 and fp16, also on the CPU, where Accelerate itself would
leave fp16 off), gradient accumulation and checkpointing. ``batch_size`` is the global batch per optimizer step,
split over processes and accumulation steps.

Resuming: every ``checkpoint_every`` optimizer steps, and at the end of each stage, the full
training state (model, optimizer, scheduler, RNG of every process, sampler) is saved with
``accelerator.save_state`` into ``out/checkpoints/.tmp_step_N``, plus ``progress.json`` (stage,
step, epoch, position in the epoch), and only then renamed to ``step_N``. A relaunch of the same
command loads the newest complete ``step_N`` and continues mid-epoch with
``accelerator.skip_first_batches``; since shuffling depends only on ``(seed, epoch)`` and
augmentation only on ``(seed, epoch, sample)``, it ends with the weights an uninterrupted run has.
``out/metrics.jsonl`` gets one JSON line per logged step or evaluation (lines past the resumed
checkpoint are dropped on resume). A finished run (``final.json`` present) is not redone.

Surviving mistakes:

* One run at a time per output folder: the main process creates ``out/run.lock`` (host, pid, start
  time, the pids of every process; atomically, ``O_CREAT|O_EXCL``) before writing anything there,
  after all processes have started and before they go their own ways (the other processes wait for
  its outcome), and removes it when the run ends, also on an error. A second run on the folder
  refuses with a one-line message naming the holder; a lock whose processes are all gone (a run
  killed with SIGKILL) is taken over with a message (:mod:`vit2cbsa.train.lock`). Killing
  ``accelerate launch`` with SIGKILL does not kill its worker processes: they go on training and
  writing ``out``, and still hold the lock, so a relaunch refuses, naming their pids, until they are
  stopped (``kill PID``) -- it never races them.
* Resuming verifies the newest checkpoint (``progress.json`` parses and matches its folder, every
  file Accelerate wrote is complete: safetensors headers and sizes, the zip structure of the
  ``torch.save`` files, each process's RNG state present) and falls back to the newest valid one,
  saying which one was skipped and why; a skipped one is moved to ``checkpoints/invalid_step_N``.
* An unreadable image (zero bytes, not an image, a truncated JPEG) stops the run with a one-line
  error naming the file (:class:`~vit2cbsa.train.data.BadImageError`), or, with
  ``skip_bad_images``, is replaced by the next readable image of its split (training) or left out
  (evaluation); the counts go to ``metrics.jsonl`` (``bad_images``) and ``final.json``.
* Evaluations during training (before it, every ``eval_every`` steps, at the end of each stage) use
  a fixed random subset of ``eval_subset`` images (default 1000; 0: the whole split); the final
  evaluation of the original and the converted model uses the whole evaluation split. Evaluation
  has its own progress bar, and the stage's bar, its rates and ``final.json``'s ``timing`` count
  training steps only, with evaluation and checkpoint time reported apart.
* Bad options (a negative LoRA rank, a non-finite learning rate, an ``--out`` that is a file, a mixed
  precision the device cannot do, a dataset path that does not exist) are one-line
  :class:`UsageError` s raised before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import specs
from ..convert import conversion_info, convert
from ..errors import DataError, UsageError, one_line
from ..modeling import model_output
from .align import AttentionAligner
from .data import (TransformedDataset, Transforms, hf_transforms, load_image_data,
                   subset_indices, teacher_transforms, timm_transforms)
from .lock import LockHeld, OutputLock, this_process
from .sharding import (dcp_problem, describe_units, fsdp_requested, fsdp_version, full_state_dict, make_plugin,
                       quiet_view_warning, set_wrap_policy, shard_cpu_processes)

STAGES = ("align", "finetune")
PROGRESS = "progress.json"
STOP_EXIT_CODE = 17  # --stop-after-step: the simulated kill
#: operational settings that may change between a run and its resumption
_RESUMABLE_CHANGES = ("output_dir", "stop_after_step", "num_workers", "log_every", "eval_every",
                      "checkpoint_every", "keep_checkpoints", "eval_batch_size", "cpu", "eval_subset",
                      "skip_bad_images")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")


@dataclass
class FinetuneConfig:
    """Everything ``run`` needs; see ``examples/finetune.py --help`` for each field."""

    model: str
    dataset: str
    output_dir: str
    checkpoint: Optional[str] = None            # local timm weights (with model="timm:NAME")
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs
    # conversion (vit2cbsa.convert)
    variant: str = "cbsa"
    representatives: Union[int, Tuple[int, int]] = 64
    layers: Optional[str] = None                # "6:" (a slice), "0,2,4", "-1"; None = all
    broadcast: str = "query"
    extra_representatives: str = "prefix"       # "prefix" | "global" | "none"
    prefix_broadcast: str = "own"               # "own" | "all"
    # data
    train_split: Optional[str] = None
    eval_split: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    eval_subset: Optional[int] = 1000           # images for the evaluations during training; 0/None: all
    skip_bad_images: bool = False               # replace (train) / leave out (eval) unreadable images
    num_workers: int = 2
    # stage 1: attention alignment
    align_steps: int = 0
    align_lr: float = 1e-3
    align_pretrained_lr: Optional[float] = None  # default align_lr / 10
    align_trainable: str = "attention"           # or "new": only the added parameters
    # stage 2: supervised fine-tuning
    finetune_steps: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.05
    lora_rank: int = 0                           # 0 = train the whole model
    lora_alpha: Optional[float] = None           # default: 2 * rank
    lora_dropout: float = 0.0
    lora_targets: Optional[List[str]] = None     # default: the attention projections
    distill_weight: float = 0.0
    temperature: float = 2.0
    # both stages
    batch_size: int = 64                         # global, per optimizer step
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    eval_batch_size: Optional[int] = None        # per process; default 2x the per-process train batch
    mixed_precision: Optional[str] = None        # None: from `accelerate config` / launch flags
    cpu: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    stop_after_step: Optional[int] = None        # testing: os._exit after this global step

    def __post_init__(self) -> None:
        self.representatives = parse_representatives(self.representatives)
        parse_layers(self.layers)
        validate_values(self)


def _number(flag: str, value, *, low: float = 0.0, low_ok: bool = False, high: Optional[float] = None,
            high_ok: bool = True, what: str = "") -> None:
    """``value`` must be a finite number in (low, high] (``low_ok``/``high_ok``: closed ends)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be a number, got {value!r}") from None
    bounds = f"{'[' if low_ok else '('}{low:g}, {'inf)' if high is None else f'{high:g}' + (']' if high_ok else ')')}"
    ok = math.isfinite(v) and (v >= low if low_ok else v > low) and (
        high is None or (v <= high if high_ok else v < high))
    if not ok:
        raise UsageError(f"{flag} must be a finite number in {bounds}{what}, got {value!r}")


def validate_values(c: "FinetuneConfig") -> None:
    """One-line :class:`UsageError` s for option values that can never work (no device or files needed)."""
    if c.lora_rank is None or int(c.lora_rank) != c.lora_rank or c.lora_rank < 0:
        raise UsageError(f"--lora-rank must be 0 (train the whole model) or a positive rank for LoRA adapters, "
                         f"got {c.lora_rank!r}")
    for flag, value in (("--lr", c.lr), ("--align-lr", c.align_lr)):
        _number(flag, value, what=" (a learning rate)")
    if c.align_pretrained_lr is not None:
        _number("--align-pretrained-lr", c.align_pretrained_lr, low_ok=True)
    _number("--weight-decay", c.weight_decay, low_ok=True)
    _number("--warmup-ratio", c.warmup_ratio, low_ok=True, high=1.0)
    _number("--max-grad-norm", c.max_grad_norm, low_ok=True, what=" (0: no clipping)")
    _number("--temperature", c.temperature)
    _number("--lora-dropout", c.lora_dropout, low_ok=True, high=1.0, high_ok=False)
    _number("--distill-weight", c.distill_weight, low_ok=True, high=1.0)
    if c.lora_alpha is not None:
        _number("--lora-alpha", c.lora_alpha)
    for flag, value in (("--align-steps", c.align_steps), ("--finetune-steps", c.finetune_steps),
                        ("--eval-every", c.eval_every), ("--num-workers", c.num_workers)):
        if value is None or value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value!r}")
    for flag, value in (("--log-every", c.log_every), ("--keep-checkpoints", c.keep_checkpoints),
                        ("--max-train-samples", c.max_train_samples), ("--max-eval-samples", c.max_eval_samples),
                        ("--eval-batch-size", c.eval_batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be positive, got {value!r}")
    if c.eval_subset is not None and c.eval_subset < 0:
        raise UsageError(f"--eval-subset must be >= 0 (0: evaluate on the whole split), got {c.eval_subset!r}")
    if c.mixed_precision is not None and c.mixed_precision not in MIXED_PRECISIONS:
        raise UsageError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got {c.mixed_precision!r}")


def check_environment(c: "FinetuneConfig") -> None:
    """One-line :class:`UsageError` s for options this machine cannot honour: an ``--out`` that is a file,
    a mixed precision the device does not support. Runs before the ``Accelerator`` is made (a failed
    ``Accelerator(...)`` leaves Accelerate's shared state unusable for the rest of the process)."""
    out = Path(c.output_dir).expanduser()
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--out {c.output_dir!r}: {str(p)!r} is an existing file, not a folder")
            break
    if fsdp_requested() and fsdp_version() != 2:
        raise UsageError(f"FSDP version {fsdp_version()} (from accelerate launch / accelerate config): vit2cbsa "
                         "fine-tunes with FSDP2 only; set fsdp_version: 2 (see examples/accelerate_fsdp.yaml)")
    from_env = c.mixed_precision is None
    mp = (os.environ.get("ACCELERATE_MIXED_PRECISION", "no") if from_env else c.mixed_precision).lower()
    if mp in ("no", ""):
        return
    source = f"mixed precision {mp} (from accelerate launch / accelerate config)" if from_env else \
        f"--mixed-precision {mp}"
    if mp not in MIXED_PRECISIONS:
        raise UsageError(f"{source}: not one of {', '.join(MIXED_PRECISIONS)}")
    from accelerate import PartialState

    device = PartialState(cpu=c.cpu).device
    if mp == "fp8":
        from accelerate.utils import is_fp8_available

        if device.type != "cuda":
            raise UsageError(f"{source} needs an NVIDIA GPU with FP8 (compute capability 8.9+); this run is on "
                             f"{device.type}: use --mixed-precision bf16 or no")
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise UsageError(f"{source} needs compute capability 8.9+ (Ada, Hopper or newer); this GPU has "
                             f"{cap[0]}.{cap[1]}: use --mixed-precision bf16 or fp16")
        if not is_fp8_available():
            raise UsageError(f"{source} needs torchao, transformer-engine or MS-AMP installed")
    elif mp in ("fp16", "bf16") and device.type == "cpu" and not cpu_autocast_supports(mp):
        raise UsageError(f"{source}: this torch cannot autocast to {mp} on cpu; use --mixed-precision "
                         f"{'bf16' if mp == 'fp16' else 'no'}")
    elif mp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{source}: this GPU does not support bf16; use --mixed-precision fp16 or no")


def cpu_autocast_supports(mp: str) -> bool:
    """Whether ``torch.autocast("cpu", dtype)`` really autocasts to the dtype of ``mp`` ("fp16", "bf16")."""
    import warnings

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older torch: "target dtype is not supported. Disabling autocast."
        try:
            with torch.autocast("cpu", dtype=dtype):
                return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        except (RuntimeError, TypeError, AttributeError):
            return False


# --------------------------------------------------------------------------- small pieces


def parse_layers(spec: Optional[str]):
    """:func:`vit2cbsa.specs.parse_layers`, raising :class:`UsageError` for ``--layers``."""
    try:
        return specs.parse_layers(spec)
    except ValueError as e:
        raise UsageError(f"--layers: {e}") from None


def parse_representatives(spec: Union[str, int, Sequence[int]]) -> Union[int, Tuple[int, int]]:
    """``64`` or ``"64"`` (a square count) or ``"8x4"`` (a grid); :func:`vit2cbsa.specs.parse_grid`."""
    if not isinstance(spec, (str, int)):
        return tuple(int(v) for v in spec)  # type: ignore[return-value]
    try:
        return specs.parse_grid(spec)
    except ValueError as e:
        raise UsageError(f"--representatives: {e}") from None


def _hard_exit(code: int) -> None:  # separate so tests can intercept it
    os._exit(code)


def warmup_cosine(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str                    # "timm" (also the embedded teacher) or "hf"
    transforms: Transforms
    head_names: List[str]        # classifier modules (kept fully trainable under LoRA)
    head_reset: bool             # the head was replaced to match the dataset's classes
    class_names: Optional[List[str]] = None


def load_model(spec: str, num_classes: int, class_names: List[str], checkpoint: Optional[str] = None,
               model_kwargs: Optional[dict] = None) -> LoadedModel:
    """Load MODEL with the one resolver every command uses (:func:`vit2cbsa.loading.load`: ``cifar10-teacher``,
    ``timm:NAME`` or a timm name (``--checkpoint`` for local weights, else ``pretrained=True``), ``hf:ID_OR_PATH``
    or a local transformers folder), with a classifier of ``num_classes`` outputs (a head of another size is
    replaced), and the preprocessing that goes with it."""
    from ..loading import LoadError, load

    try:
        lm = load(spec, checkpoint_path=checkpoint, model_kwargs=model_kwargs, num_classes=num_classes,
                  class_names=class_names)
    except LoadError as e:
        raise UsageError(str(e)) from None
    if lm.converted:
        raise UsageError(f"{spec} is a converted vit2cbsa folder; fine-tune from the original model (it is the "
                         "teacher for distillation, and --variant/--representatives convert it)")
    kind = "hf" if lm.library == "transformers" else "timm"
    if lm.source.kind == "teacher":
        transforms = teacher_transforms(lm.config)
    elif kind == "timm":
        transforms = timm_transforms(lm.model)
    elif lm.image_processor is None:
        raise UsageError(f"transformers model {spec!r} has no image processor (preprocessor_config.json): "
                         "save one next to it, e.g. AutoImageProcessor.from_pretrained(...).save_pretrained(folder)")
    else:
        transforms = hf_transforms(lm.image_processor)
    return LoadedModel(lm.model.train(), kind, transforms, lm.head_names, lm.head_reset, lm.class_names)


# --------------------------------------------------------------------------- LoRA

_DEFAULT_TARGETS = {"timm": ("qkv", "proj"), "hf": ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")}
_LORA_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def lora_targets(model: nn.Module, kind: str, targets: Optional[Sequence[str]]) -> List[str]:
    """Full names of the modules LoRA adapts: by default every attention projection (q/k/v/o,
    converted layers or not); else each of ``targets`` must name (a suffix of) some Linear/Conv layer."""
    modules = dict(model.named_modules())
    if targets is None:
        suffixes = _DEFAULT_TARGETS[kind]
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes
                 and (kind != "timm" or ".attn." in f".{n}")]
        if not names:
            raise UsageError(f"no attention projections ({', '.join(suffixes)}) found for LoRA; pass --lora-targets")
        return names
    names = []
    for t in targets:
        hits = [n for n, m in modules.items() if (n == t or n.endswith("." + t)) and isinstance(m, _LORA_TYPES)]
        if not hits:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
            raise UsageError(f"LoRA target {t!r} matches no Linear/Conv layer of the model "
                             f"(its Linear layers are named: {', '.join(linear)})")
        names += hits
    return sorted(set(names))


def apply_lora(model: nn.Module, targets: List[str], head_names: List[str], rank: int,
               alpha: Optional[float] = None, dropout: float = 0.0) -> nn.Module:
    """PEFT LoRA on ``targets``; the added ``mixer`` modules and the classifier stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    existing = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, modules_to_save=["mixer"] + [h for h in head_names if h in existing])
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- checkpoints and metrics


_PROGRESS_KEYS = ("stage", "stage_step", "stage_steps", "global_step", "epoch", "step_in_epoch")


def _step_of(d: Path) -> Optional[int]:
    try:
        return int(d.name[len("step_"):])
    except ValueError:
        return None


def _file_problem(path: Path) -> Optional[str]:
    """Why ``path`` (a file Accelerate or we wrote) is incomplete, or None. Cheap: headers and sizes."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    name = path.name
    if name.endswith(".json"):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"not valid JSON ({one_line(e)})"
        return None
    with path.open("rb") as f:
        head = f.read(8)
        if name.endswith(".safetensors"):
            if len(head) < 8:
                return "truncated (no header)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"truncated (header of {n} bytes, file of {size})"
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                return "truncated (unreadable header)"
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return None if 8 + n + end <= size else f"truncated ({size} of {8 + n + end} bytes)"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (optimizer.bin, random_states_0.pkl, ...)
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"truncated ({info.filename} ends past the end of the file)"
        except (zipfile.BadZipFile, OSError) as e:
            return f"truncated or corrupt ({one_line(e)})"
    return None


def checkpoint_problem(d: Path) -> Tuple[Optional[dict], Optional[str]]:
    """``(progress, None)`` for a complete checkpoint folder, ``(None, why)`` for an unusable one.

    Complete: ``progress.json`` parses, has its keys and the folder's step; model weights, optimizer
    state and every process's RNG state are there; no file Accelerate wrote is empty or cut short."""
    try:
        progress = json.loads((d / PROGRESS).read_text())
    except FileNotFoundError:
        return None, f"it has no {PROGRESS}"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{PROGRESS} is unreadable ({one_line(e)})"
    if not isinstance(progress, dict) or any(k not in progress for k in _PROGRESS_KEYS):
        return None, f"{PROGRESS} lacks some of {', '.join(_PROGRESS_KEYS)}"
    if progress["global_step"] != _step_of(d):
        return None, f"{PROGRESS} is for step {progress['global_step']}"
    names = {p.name for p in d.iterdir()}
    if not any(n.startswith(("model", "pytorch_model")) for n in names):
        return None, "it has no model weights"
    if not any(n.startswith("optimizer") for n in names):
        return None, "it has no optimizer state"
    missing = [f"random_states_{i}.pkl" for i in range(int(progress.get("num_processes", 1)))
               if f"random_states_{i}.pkl" not in names]
    if missing:
        return None, f"it has no {missing[0]}"
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        why = _file_problem(f)
        if why is not None:
            return None, f"{f.relative_to(d)} is {why}"
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):  # FSDP's sharded model / optimizer states
        if sub.name.startswith(("pytorch_model_fsdp", "optimizer")) or any(sub.glob("*.distcp")):
            why = dcp_problem(sub)
            if why is not None:
                return None, why
    return progress, None


def find_checkpoint(ckpt_dir: Path) -> Tuple[Optional[Tuple[Path, dict]], List[Tuple[Path, str]]]:
    """The newest complete checkpoint ``(folder, progress)`` (or None), and ``(folder, why)`` for each
    newer one that is not complete."""
    dirs = sorted((d for d in ckpt_dir.glob("step_*") if d.is_dir() and _step_of(d) is not None),
                  key=_step_of, reverse=True)
    skipped = []
    for d in dirs:
        progress, why = checkpoint_problem(d)
        if progress is not None:
            return (d, progress), skipped
        skipped.append((d, why))
    return None, skipped


def latest_checkpoint(ckpt_dir: Path) -> Optional[Tuple[Path, dict]]:
    """The newest complete checkpoint (``step_N`` passing :func:`checkpoint_problem`) or ``None``."""
    return find_checkpoint(ckpt_dir)[0]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class MetricsLog:
    """``metrics.jsonl`` (main process only); on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]) -> None:
        self.path, self.enabled, self.t0 = path, enabled, time.time()
        if enabled and path.exists():
            keep = [] if resume_step is None else [r for r in self.records() if r["global_step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, **record) -> None:
        if self.enabled:
            record.update(time=round(time.time(), 3), elapsed_s=round(time.time() - self.t0, 3))
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> List[dict]:
        out = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
        return out


class StageClock:
    """A stage's wall time split into training steps and the evaluations / checkpoints between them;
    the stage's tqdm ``bar`` is shifted past each pause, so its elapsed time, rate and ETA are those of
    the training steps alone."""

    def __init__(self, bar=None) -> None:
        self.bar, self.t0 = bar, time.perf_counter()
        self.spent = {"eval": 0.0, "checkpoint": 0.0}
        self.count = {"eval": 0, "checkpoint": 0}

    @contextlib.contextmanager
    def pause(self, kind: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.spent[kind] += dt
            self.count[kind] += 1
            if self.bar is not None and not getattr(self.bar, "disable", True):
                self.bar.start_t += dt  # what tqdm's own unpause() does, for exactly the pause
                self.bar.last_print_t += dt

    def train_s(self) -> float:
        return time.perf_counter() - self.t0 - sum(self.spent.values())

    def summary(self, steps: int) -> dict:
        train = self.train_s()
        return dict(steps=steps, train_s=round(train, 3), s_per_step=round(train / steps, 4) if steps else None,
                    evals=self.count["eval"], eval_s=round(self.spent["eval"], 3),
                    checkpoints=self.count["checkpoint"], checkpoint_s=round(self.spent["checkpoint"], 3))


# --------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, config: FinetuneConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed

        c = self.config = config
        validate_values(c)  # again: the fields may have been changed after construction
        check_environment(c)
        plugin = make_plugin(c.mixed_precision) if fsdp_requested() else None
        self.fsdp_extra_units = list(plugin.transformer_cls_names_to_wrap or []) if plugin is not None else []
        self.accelerator = acc = Accelerator(
            mixed_precision=c.mixed_precision, gradient_accumulation_steps=c.grad_accum, cpu=c.cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=c.seed),
            step_scheduler_with_optimizer=False, fsdp_plugin=plugin)
        if plugin is not None and shard_cpu_processes(acc, plugin):
            acc.print("FSDP on CPU processes: Accelerate would fall back to DDP here; sharding with PyTorch's "
                      "FSDP2 over gloo instead")
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if self.fsdp:
            quiet_view_warning()
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu" and acc.scaler is None:
            # Accelerate leaves fp16 off on the CPU (it would train in float32); torch autocasts and scales there
            acc.native_amp = True
            acc.scaler = torch.amp.GradScaler("cpu")
        self.out = Path(c.output_dir).expanduser()
        self.ckpt_dir = self.out / "checkpoints"
        self.stages = [s for s, n in zip(STAGES, (c.align_steps, c.finetune_steps)) if n > 0]
        self.stage_steps = {"align": c.align_steps, "finetune": c.finetune_steps}
        self.resume: Optional[Tuple[Path, dict]] = None
        self.timing: Dict[str, dict] = {}
        self.bad_images = {"train": 0}  # samples replaced this launch (summed over steps and processes)
        self._validate_options()
        self.previous = self._check_output_dir()
        if self.previous is not None:
            return
        set_seed(c.seed)
        try:
            self.data = load_image_data(c.dataset, c.train_split, c.eval_split)
        except DataError as e:
            raise UsageError(str(e)) from None
        n_classes = len(self.data.classes)
        self.loaded = lm = load_model(c.model, n_classes, self.data.classes, c.checkpoint, c.model_kwargs)
        if lm.class_names is not None and not lm.head_reset and list(lm.class_names) != self.data.classes:
            acc.print(f"warning: the model's classes {lm.class_names} differ from the dataset's {self.data.classes}")
        if c.distill_weight > 0 and lm.head_reset:
            raise UsageError(f"--distill-weight needs the original model's classifier; it has no {n_classes}-class head "
                             "for this dataset")
        self.original = lm.model.eval().requires_grad_(False)
        try:
            self.student = self._converted_copy()
        except (TypeError, ValueError) as e:
            raise UsageError(f"convert: {one_line(e)}") from None
        if "finetune" in self.stages and c.lora_rank > 0:
            self.targets = lora_targets(self.student, lm.kind, c.lora_targets)
        skip = c.skip_bad_images
        self.train_ds = TransformedDataset(self.data.train, lm.transforms.train, seed=c.seed, skip_bad=skip,
                                           indices=subset_indices(len(self.data.train), c.max_train_samples, c.seed))
        self.eval_ds = TransformedDataset(self.data.eval, lm.transforms.eval, skip_bad=skip,
                                          indices=subset_indices(len(self.data.eval), c.max_eval_samples, c.seed))
        # the evaluations during training: a fixed random subset of the evaluation split
        sub = subset_indices(len(self.eval_ds), c.eval_subset or None, c.seed)
        self.eval_sub_ds = self.eval_ds if sub is None else TransformedDataset(
            self.data.eval, lm.transforms.eval, skip_bad=skip, indices=[self.eval_ds.indices[i] for i in sub])
        if len(self.train_ds) < c.batch_size:
            raise UsageError(f"the training split has {len(self.train_ds)} images, fewer than one batch of {c.batch_size}")

    def _converted_copy(self) -> nn.Module:
        """A fresh converted copy of the original, as the run's options say."""
        c = self.config
        return convert(copy.deepcopy(self.original), c.variant, parse_representatives(c.representatives),
                       parse_layers(c.layers), broadcast=c.broadcast, extra_representatives=c.extra_representatives,
                       prefix_broadcast=c.prefix_broadcast)

    def _plain_copy(self, state: Dict[str, torch.Tensor], lora: bool = False) -> nn.Module:
        """An unsharded converted model holding ``state`` (gathered from a sharded one); ``lora``: ``state`` is the
        PEFT model's, whose adapters are merged."""
        c = self.config
        model = self._converted_copy()
        if lora:
            model = apply_lora(model, self.targets, self.loaded.head_names, c.lora_rank, c.lora_alpha, c.lora_dropout)
        model.load_state_dict(state, strict=True)
        if lora:
            model = model.merge_and_unload()
        return model.to(self.accelerator.device)

    def _open_output(self) -> None:
        """Under the lock: pick the checkpoint to resume from and prepare ``out`` (the first writes)."""
        c, acc = self.config, self.accelerator
        self.previous = self._check_output_dir()  # a run that finished while this one was loading
        if self.previous is not None:
            return
        self.resume = self._find_resume()
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_dir.glob(".tmp_step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            _write_json(self.out / "run_config.json", self._fingerprint())
        acc.wait_for_everyone()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", acc.is_main_process,
                                  self.resume[1]["global_step"] if self.resume else None)
        self.original.to(acc.device)
        self.student.to(acc.device)
        sub = "" if self.eval_sub_ds is self.eval_ds else f", {len(self.eval_sub_ds)} of them for evaluations during training"
        acc.print(f"vit2cbsa finetune: {c.model} on {self.data.source} ({len(self.train_ds)} train / "
                  f"{len(self.eval_ds)} eval images{sub}, {len(self.data.classes)} classes); {acc.num_processes} "
                  f"process(es), mixed precision {acc.mixed_precision}, per-process batch {self.per_device} x "
                  f"{c.grad_accum} accumulation\n{conversion_info(self.student)}")

    def _find_resume(self) -> Optional[Tuple[Path, dict]]:
        """The newest complete checkpoint, chosen by the main process (which moves incomplete newer ones
        to ``invalid_step_N``, saying why) and shared with the others."""
        acc = self.accelerator
        found: List[Any] = [None]
        if acc.is_main_process and self.ckpt_dir.is_dir():
            best, skipped = find_checkpoint(self.ckpt_dir)
            for d, why in skipped:
                aside = d.with_name(f"invalid_{d.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(d, aside)
                acc.print(f"skipping checkpoint {d.name}: {why} (moved to {aside})")
            if skipped:
                acc.print(f"resuming from the newest valid checkpoint, {best[0].name}" if best else
                          "no valid checkpoint left: starting from the beginning")
            found = [None if best is None else (str(best[0]), best[1])]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found)
        return None if found[0] is None else (Path(found[0][0]), found[0][1])

    @contextlib.contextmanager
    def _output_lock(self):
        """Hold ``out/run.lock`` (main process) for the block; every process raises the same
        :class:`UsageError` when another run holds it."""
        acc = self.accelerator
        me = [this_process()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            procs = gather_object(me)  # every process has started; none has written anything
        else:
            procs = me
        lock = OutputLock(self.out)
        outcome: List[Any] = [("ok", None)]
        if acc.is_main_process:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                outcome = [("ok", lock.acquire(procs))]
            except LockHeld as e:
                outcome = [("held", str(e))]
            except OSError as e:
                outcome = [("held", f"cannot create the lock {lock.path}: {one_line(e)}")]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(outcome)  # the other processes wait here for the main one's lock
        kind, message = outcome[0]
        if kind != "ok":
            raise UsageError(message)
        if message:
            acc.print(message)
        try:
            yield
        finally:
            if acc.is_main_process:
                lock.release()

    # ---- validation
    def _validate_options(self) -> None:
        c, acc = self.config, self.accelerator
        if not self.stages:
            raise UsageError("nothing to do: give --align-steps and/or --finetune-steps")
        if c.grad_accum < 1 or c.batch_size < 1:
            raise UsageError("--batch-size and --grad-accum must be positive")
        parts = acc.num_processes * c.grad_accum
        if c.batch_size % parts:
            raise UsageError(f"--batch-size {c.batch_size} does not divide into {acc.num_processes} process(es) x "
                             f"{c.grad_accum} accumulation step(s); use a multiple of {parts}")
        self.per_device = c.batch_size // parts
        if c.align_trainable not in ("attention", "new"):
            raise UsageError("--align-trainable must be 'attention' or 'new'")
        if not 0.0 <= c.distill_weight <= 1.0:
            raise UsageError("--distill-weight must be in [0, 1]")
        if c.checkpoint_every < 1:
            raise UsageError("--checkpoint-every must be positive")

    def _fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self.config).items() if k not in _RESUMABLE_CHANGES}

    def _check_output_dir(self) -> Optional[dict]:
        """The result of a finished run in ``output_dir`` (or None); refuse one with other settings."""
        saved = self.out / "run_config.json"
        if saved.is_file():
            old, new = json.loads(saved.read_text()), json.loads(json.dumps(self._fingerprint(), default=str))
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if diff:
                k = diff[0]
                raise UsageError(f"{self.out} holds a run with other settings ({k}: {old.get(k)!r} -> {new.get(k)!r}); "
                                 "relaunch with the same options or use another --output-dir")
        final = self.out / "final.json"
        return json.loads(final.read_text()) if final.is_file() else None

    # ---- data
    def _loader(self, train: bool, dataset: Optional[TransformedDataset] = None):
        from torch.utils.data import DataLoader

        c = self.config
        bs = self.per_device if train else (c.eval_batch_size or 2 * self.per_device)
        if dataset is None:
            dataset = self.train_ds if train else self.eval_ds
        # its own generator: a DataLoader without one draws a seed from the global RNG each epoch,
        # which a resumed run (one more iterator, for the partial epoch) would do once more
        return DataLoader(dataset, batch_size=bs, shuffle=train, drop_last=train,
                          num_workers=c.num_workers, pin_memory=self.accelerator.device.type == "cuda",
                          generator=torch.Generator().manual_seed(c.seed))

    def unwrap(self, model: nn.Module) -> nn.Module:
        """``model`` without Accelerate's wrappers, ``torch.compile``'s included (``accelerate launch
        --dynamo_backend inductor`` compiles what ``prepare`` gets)."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, subset: bool = False, desc: str = "eval") -> float:
        """Accuracy on the evaluation split (``subset``: the ``eval_subset`` images used during training),
        with a progress bar; unreadable images skipped under ``skip_bad_images`` are left out (counted in
        ``self.last_eval``)."""
        from tqdm.auto import tqdm

        acc = self.accelerator
        ds = self.eval_sub_ds if subset else self.eval_ds
        loader = acc.prepare_data_loader(self._loader(train=False, dataset=ds))
        was_training = model.training
        model.eval()
        correct = total = bad = 0
        t0 = time.perf_counter()
        what = f"{len(ds)} of {len(self.eval_ds)} images" if ds is not self.eval_ds else f"{len(ds)} images"
        bar = tqdm(loader, desc=f"{desc} ({what})", leave=False, disable=not acc.is_main_process,
                   dynamic_ncols=True, unit="batch")
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
        self.last_eval = dict(eval_images=total, eval_s=round(time.perf_counter() - t0, 3),
                              **({"bad_images": bad} if self.config.skip_bad_images else {}))
        return correct / max(1, total)

    # ---- stages
    def _setup_align(self):
        c = self.config
        # under FSDP the teacher stays outside the sharded module: a plain frozen copy on every process
        aligner = AttentionAligner(self.student, self.original, c.align_trainable, teacher_as_submodule=not self.fsdp)
        self.student.requires_grad_(False)
        for p in aligner.parameters_to_train():
            p.requires_grad_(True)
        plr = c.align_pretrained_lr if c.align_pretrained_lr is not None else c.align_lr / 10
        optimizer = torch.optim.AdamW(aligner.param_groups(c.align_lr, plr), weight_decay=0.0)

        def loss_fn(module, batch):
            # autocast: under FSDP mixed precision the root casts the images to bf16/fp16 (no autocast of its own),
            # and the frozen float32 teacher inside the aligner needs it to take them
            with self.accelerator.autocast():
                return module(batch[0])[0]

        if self.fsdp:  # the student's own top-level parameters are in the aligner's root unit: evaluate through it
            return aligner, optimizer, loss_fn, lambda m: _ThroughAligner(m, self.loaded.kind)
        return aligner, optimizer, loss_fn, lambda m: self.unwrap(m).student

    def _setup_finetune(self):
        c = self.config
        self.student.requires_grad_(True)
        model = self.student
        if c.lora_rank > 0:
            model = apply_lora(self.student, self.targets, self.loaded.head_names, c.lora_rank, c.lora_alpha,
                               c.lora_dropout)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                flat = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "dist_token"))
                (no_decay if flat else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=c.lr)
        w, T = c.distill_weight, c.temperature

        def loss_fn(module, batch):
            x, y = batch[0], batch[1]
            logits = model_output(module, x)
            loss = F.cross_entropy(logits.float(), y)  # (bf16 logits under FSDP mixed precision)
            if w > 0:
                with torch.no_grad(), self.accelerator.autocast():
                    target = model_output(self.original, x)
                kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(target.float() / T, -1),
                              reduction="batchmean", log_target=True) * T * T
                loss = (1 - w) * loss + w * kl
            return loss

        return model, optimizer, loss_fn, self.unwrap

    def train_stage(self, stage: str) -> nn.Module:
        """Set up ``stage``, resume it if the newest checkpoint is in it, train to its last step."""
        from torch.optim.lr_scheduler import LambdaLR
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        acc.free_memory()  # forget the previous stage's objects: the train loader is the first one checkpointed
        steps = self.stage_steps[stage]
        offset = sum(self.stage_steps[s] for s in self.stages[: self.stages.index(stage)])
        module, optimizer, loss_fn, eval_model = getattr(self, f"_setup_{stage}")()
        scheduler = LambdaLR(optimizer, warmup_cosine(steps, c.warmup_ratio))
        if self.fsdp:
            set_wrap_policy(acc.state.fsdp_plugin, module, self.fsdp_extra_units)
        module, optimizer, loader, scheduler = acc.prepare(module, optimizer, self._loader(train=True), scheduler)
        if self.fsdp:
            acc.print(f"FSDP2 units ({stage}): {describe_units(self.unwrap(module))}; {acc.num_processes} shards each")
        step = 0
        if self.resume is not None and self.resume[1]["stage"] == stage:
            sharded = bool(self.resume[1].get("sharded", False))
            if sharded != self.fsdp:
                raise UsageError(f"cannot resume from {self.resume[0]}: it was written {'with' if sharded else 'without'}"
                                 f" FSDP and this launch runs {'with' if self.fsdp else 'without'} it; relaunch with "
                                 "the accelerate configuration of the run that wrote it")
            try:
                acc.load_state(str(self.resume[0]))
            except Exception as e:  # damage the checks before resuming could not see
                raise UsageError(f"cannot resume from {self.resume[0]}: {one_line(e)}; move that folder away to "
                                 "resume from an older checkpoint") from None
            step = self.resume[1]["stage_step"]
            acc.print(f"resumed {stage} at step {step}/{steps} from {self.resume[0]}")
        steps_per_epoch = math.ceil(len(loader) / c.grad_accum)
        bar = tqdm(total=steps, initial=step, desc=stage, disable=not acc.is_main_process, dynamic_ncols=True,
                   unit="step")
        clock = StageClock(bar)
        first_step = step
        bad = torch.zeros((), device=acc.device)
        module.train()
        self.original.eval()  # the frozen original: no dropout / drop-path (module.train() reached it in align)
        while step < steps:
            epoch, done = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            self.train_ds.set_epoch(epoch)
            batches = acc.skip_first_batches(loader, done * c.grad_accum) if done else loader
            running = 0.0
            for batch in batches:
                with acc.accumulate(module):
                    loss = loss_fn(module, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and c.max_grad_norm > 0:
                        acc.clip_grad_norm_(module.parameters(), c.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                running += loss.detach().float() / c.grad_accum
                if len(batch) > 2:  # skip_bad_images: how many samples of the batch replaced an unreadable one
                    bad += batch[2].sum()
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                bar.update(1)
                gstep = offset + step
                if step % c.log_every == 0 or step == steps:
                    value = acc.reduce(running.reshape(1), "mean").item()  # type: ignore[union-attr]
                    lr = scheduler.get_last_lr()[0]
                    extra = {}
                    if c.skip_bad_images:
                        extra["bad_images"] = int(acc.reduce(bad.float().reshape(1), "sum").item())
                        self.bad_images["train"] += extra["bad_images"]
                        bad.zero_()
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    self.metrics.write(stage=stage, step=step, global_step=gstep, epoch=epoch, loss=value, lr=lr,
                                       train_s=round(clock.train_s(), 3), **extra)
                running = 0.0
                if (c.eval_every and step % c.eval_every == 0) or step == steps:
                    with clock.pause("eval"):
                        accuracy = self.evaluate(eval_model(module), subset=True, desc=f"{stage} eval")
                    self.metrics.write(stage=stage, step=step, global_step=gstep, eval_accuracy=accuracy,
                                       **self.last_eval)
                    acc.print(f"{stage} step {step}: eval accuracy {accuracy:.4f} ({self.last_eval['eval_images']} "
                              f"images, {self.last_eval['eval_s']:.1f} s)")
                if step % c.checkpoint_every == 0 or step == steps:
                    with clock.pause("checkpoint"):
                        self.save_checkpoint(dict(stage=stage, stage_step=step, stage_steps=steps, global_step=gstep,
                                                  epoch=divmod(step, steps_per_epoch)[0],
                                                  step_in_epoch=divmod(step, steps_per_epoch)[1],
                                                  num_processes=acc.num_processes, sharded=self.fsdp))
                if gstep == c.stop_after_step:
                    acc.print(f"--stop-after-step {c.stop_after_step}: exiting abruptly")
                    _hard_exit(STOP_EXIT_CODE)
                if step >= steps:
                    break
        bar.close()
        self.timing[stage] = t = clock.summary(step - first_step)
        if t["steps"]:
            acc.print(f"{stage}: {t['steps']} steps in {t['train_s']:.1f} s of training ({t['s_per_step']:.3f} s/step); "
                      f"{t['evals']} evaluation(s) {t['eval_s']:.1f} s, {t['checkpoints']} checkpoint(s) "
                      f"{t['checkpoint_s']:.1f} s apart")
        if self.fsdp:  # gathered into a plain copy: the next stage, the merge, the final evaluation and save use it
            lora = stage == "finetune" and c.lora_rank > 0
            trained = self._plain_copy(full_state_dict(self.unwrap(module), "student." if stage == "align" else ""), lora)
        else:
            trained = eval_model(module)
        if stage == "align":
            self.unwrap(module).remove()
            if self.fsdp:
                self.student = trained
        return trained

    def save_checkpoint(self, progress: dict) -> None:
        acc = self.accelerator
        final = self.ckpt_dir / f"step_{progress['global_step']}"
        tmp = self.ckpt_dir / f".tmp_step_{progress['global_step']}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_json(tmp / PROGRESS, progress)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            # the newest keep_checkpoints by step number (a damaged progress.json must not stop this)
            done = sorted((_step_of(d), d) for d in self.ckpt_dir.glob("step_*") if _step_of(d) is not None)
            for _, old in done[: max(0, len(done) - max(1, self.config.keep_checkpoints))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def save_final(self, model: nn.Module) -> str:
        """``out/final``: a :func:`vit2cbsa.save_pretrained` folder (``vit2cbsa.from_pretrained`` and
        ``vit2cbsa push`` take it as it is), or, for an architecture that cannot be rebuilt from its recorded
        constructor arguments, Accelerate's plain safetensors weights. ``model`` is never sharded here (under
        FSDP it is the gathered copy)."""
        from ..hub import save_pretrained

        acc, final = self.accelerator, self.out / "final"
        fmt = "vit2cbsa"
        if acc.is_main_process:
            if final.exists():  # left by a launch killed while saving: ours to replace
                shutil.rmtree(final)
            try:
                save_pretrained(self.unwrap(model), final, class_names=list(self.data.classes))  # kept through loading
            except ValueError as e:
                acc.print(f"warning: out/final holds the weights only ({one_line(e)})")
                fmt = "safetensors"
        fmt = [fmt]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(fmt)
        if fmt[0] == "safetensors":
            if final.exists() and acc.is_main_process:
                shutil.rmtree(final)
            acc.wait_for_everyone()
            acc.save_model(model, str(final))
        acc.wait_for_everyone()
        return fmt[0]

    def __call__(self) -> dict:
        if self.previous is None:
            with self._output_lock():
                self._open_output()
                if self.previous is None:
                    return self._train()
        self.accelerator.print(f"{self.out} already holds a finished run (final.json); nothing to do")
        return self.previous

    def _train(self) -> dict:
        c, acc = self.config, self.accelerator
        t0 = time.time()
        if self.resume is None:
            before = self.evaluate(self.student, subset=True, desc="start eval")
            self.metrics.write(stage="start", step=0, global_step=0, eval_accuracy=before, **self.last_eval)
            acc.print(f"converted model before training: eval accuracy {before:.4f} "
                      f"({self.last_eval['eval_images']} images, {self.last_eval['eval_s']:.1f} s)")
        model = self.student
        resumed_stage = STAGES.index(self.resume[1]["stage"]) if self.resume else -1
        for stage in self.stages:
            if STAGES.index(stage) < resumed_stage:
                continue  # finished before the checkpoint we resume from
            model = self.train_stage(stage)
        if "finetune" in self.stages and c.lora_rank > 0 and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # (under FSDP merged already, on the gathered copy)
        t_final = time.perf_counter()
        original_acc = self.evaluate(self.original, desc="final eval, original")
        converted_acc = self.evaluate(model, desc="final eval, converted")
        final_eval = dict(self.last_eval, seconds=round(time.perf_counter() - t_final, 3))
        saved_as = self.save_final(model)
        start = [r for r in self.metrics.records() if r["stage"] == "start"] if acc.is_main_process else []
        result = dict(
            original_accuracy=original_acc, converted_accuracy=converted_acc,
            converted_accuracy_before_training=start[0]["eval_accuracy"] if start else None,
            eval_images=final_eval["eval_images"], intermediate_eval_images=len(self.eval_sub_ds),
            classes=self.data.classes, head_reset=self.loaded.head_reset,
            stages={s: self.stage_steps[s] for s in self.stages}, num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision, weights=str(self.out / "final" / "model.safetensors"),
            final_format=saved_as,
            conversion=conversion_info(self.student).to_dict(), config=asdict(c),
            timing={**self.timing, "final_eval_s": final_eval["seconds"]},
            seconds_this_launch=round(time.time() - t0, 1))
        if c.skip_bad_images:
            result["bad_images_skipped"] = dict(train=self.bad_images["train"],
                                                final_eval=final_eval.get("bad_images", 0))
        if acc.is_main_process:
            _write_json(self.out / "final.json", result)
        acc.wait_for_everyone()
        acc.print(f"original accuracy {original_acc:.4f}, converted accuracy {converted_acc:.4f} "
                  f"({final_eval['eval_images']} images) -> {self.out / 'final.json'}")
        return result


class _ThroughAligner(nn.Module):
    """The student of an FSDP-sharded :class:`AttentionAligner`, called through the aligner (the root unit, whose
    forward gathers the student's top-level parameters); for :meth:`_Run.evaluate`."""

    def __init__(self, aligner: nn.Module, kind: str) -> None:
        super().__init__()
        self.aligner, self.kind = aligner, kind

    def forward(self, x: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None):
        logits = self.aligner(x if x is not None else pixel_values, predict=True)
        if self.kind == "hf":
            from types import SimpleNamespace

            return SimpleNamespace(logits=logits)
        return logits


def run(config: FinetuneConfig) -> dict:
    """Run (or resume, or return the result of) the fine-tuning described by ``config``.

    Returns the content of ``out/final.json``. Raises :class:`UsageError` on bad input, before
    anything is written to ``config.output_dir``, and when another run holds ``out/run.lock``;
    :class:`~vit2cbsa.train.data.BadImageError` for an unreadable image (without ``skip_bad_images``).
    """
    return _Run(config)()
