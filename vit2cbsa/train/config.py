"""What a fine-tuning run is: :class:`FinetuneConfig`, its validation and its command line.

* :class:`FinetuneConfig` holds every option of :func:`vit2cbsa.train.run`; each field's help text is in its
  ``metadata`` (``help``, plus ``group`` / ``flags`` / ``type`` / ``choices`` where the command line needs
  them), and :func:`add_arguments` turns the fields into ``examples/finetune.py``'s options.
* :meth:`FinetuneConfig.fingerprint`: the settings that must match for a relaunch to resume a run (all but
  the operational ones in :data:`RESUMABLE_CHANGES`); a run writes it to ``out/run_config.json``.
* Validation, all one-line :class:`~vit2cbsa.errors.UsageError` s raised before anything is written:
  :func:`validate_values` (values that can never work), :func:`check_environment` (options this machine
  cannot honour) and :func:`check_launch` (the batch against the processes of this launch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..config import ConversionConfig
from ..errors import UsageError
from .sharding import fsdp_requested, fsdp_version

STAGES = ("align", "finetune")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")
#: operational settings that may change between a run and its resumption
RESUMABLE_CHANGES = ("output_dir", "stop_after_step", "num_workers", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "eval_batch_size", "cpu", "eval_subset",
                     "skip_bad_images")


def _opt(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A field with its command-line help (and ``group`` / ``flags`` / ``type`` / ``choices``) in its metadata."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def _names(text: str) -> List[str]:
    return [t for t in text.split(",") if t]


_DATA, _CONV, _ALIGN, _FT, _TRAIN = ("model and data", "conversion (vit2cbsa.convert)", "stage 1: attention alignment",
                                     "stage 2: supervised fine-tuning", "training")


@dataclass
class FinetuneConfig:
    """Everything :func:`vit2cbsa.train.run` needs; ``examples/finetune.py --help`` shows each field's help."""

    model: str = _opt(help="cifar10-teacher | timm:NAME | hf:ID | local transformers folder", group=_DATA)
    dataset: str = _opt(help="image folder (train/ + val|test/) or datasets.load_dataset name", group=_DATA)
    output_dir: str = _opt(help="output folder; locked (OUT/run.lock) while a run uses it, see above", group=_DATA,
                           flags=("--out", "--output-dir"))
    checkpoint: Optional[str] = _opt(None, "local timm weights (.safetensors/.pth) for --model timm:NAME", group=_DATA)
    model_kwargs: Dict[str, Any] = _opt({}, "JSON kwargs for timm.create_model", group=_DATA, type=json.loads)
    #: the conversion of the student (vit2cbsa.convert); on the command line, one option per ConversionConfig field
    conversion: ConversionConfig = field(default_factory=ConversionConfig,
                                         metadata={"help": "the conversion", "group": _CONV})
    # data
    train_split: Optional[str] = _opt(None, "training split (default: train)", group=_DATA)
    eval_split: Optional[str] = _opt(None, "evaluation split (default: val / validation / test)", group=_DATA)
    max_train_samples: Optional[int] = _opt(None, "use a fixed random subset of this many training images",
                                            group=_DATA, type=int)
    max_eval_samples: Optional[int] = _opt(None, "use a fixed random subset of this many evaluation images",
                                           group=_DATA, type=int)
    eval_subset: Optional[int] = _opt(1000, "images (a fixed random subset of the evaluation split) for the "
                                      "evaluations during training: before it, every --eval-every steps, at the end "
                                      "of each stage; the final evaluation uses the whole split; 0: always the whole "
                                      "split (default %(default)s)", group=_DATA)
    skip_bad_images: bool = _opt(False, "replace an unreadable image by the next readable one (training) or leave it "
                                 "out (evaluation), counted in metrics.jsonl / final.json; default: stop with an "
                                 "error naming it", group=_DATA)
    num_workers: int = _opt(2, "data-loader worker processes per process", group=_DATA)
    # stage 1: attention alignment
    align_steps: int = _opt(0, "optimizer steps of attention alignment (0: no alignment)", group=_ALIGN)
    align_lr: float = _opt(1e-3, "learning rate of the parameters the conversion added", group=_ALIGN)
    align_pretrained_lr: Optional[float] = _opt(None, "lr of the pretrained q/k/v/o (default align-lr/10)",
                                                group=_ALIGN, type=float)
    align_trainable: str = _opt("attention", "attention: the converted layers' q/k/v/o too; new: only the added "
                                "parameters", group=_ALIGN, choices=["attention", "new"])
    # stage 2: supervised fine-tuning
    finetune_steps: int = _opt(0, "optimizer steps of supervised fine-tuning (0: none)", group=_FT)
    lr: float = _opt(1e-4, "learning rate of fine-tuning", group=_FT)
    weight_decay: float = _opt(0.05, "AdamW weight decay (not of biases, norms and embeddings)", group=_FT)
    lora_rank: int = _opt(0, "0: train the whole model; N > 0: rank-N LoRA adapters on the attention projections",
                          group=_FT)
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (default 2 x rank)", group=_FT, type=float)
    lora_dropout: float = _opt(0.0, "LoRA dropout", group=_FT)
    lora_targets: Optional[List[str]] = _opt(None, "comma-separated module names (suffixes); default: the attention "
                                             "projections", group=_FT, type=_names)
    distill_weight: float = _opt(0.0, "weight of KL to the original's logits", group=_FT)
    temperature: float = _opt(2.0, "distillation temperature", group=_FT)
    # both stages
    batch_size: int = _opt(64, "global batch per optimizer step", group=_TRAIN)
    grad_accum: int = _opt(1, "gradient accumulation steps per optimizer step", group=_TRAIN)
    warmup_ratio: float = _opt(0.05, "fraction of each stage's steps of linear warm-up (then cosine)", group=_TRAIN)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: no clipping)", group=_TRAIN)
    eval_batch_size: Optional[int] = _opt(None, "per process", group=_TRAIN, type=int)
    mixed_precision: Optional[str] = _opt(None, "default: from `accelerate config` / `accelerate launch "
                                          "--mixed_precision`", group=_TRAIN, choices=list(MIXED_PRECISIONS))
    cpu: bool = _opt(False, "force CPU", group=_TRAIN)
    seed: int = _opt(0, "seed of the conversion, shuffling, augmentation and evaluation subsets", group=_TRAIN)
    checkpoint_every: int = _opt(100, "save a resumable checkpoint every N optimizer steps", group=_TRAIN)
    keep_checkpoints: int = _opt(2, "keep the newest N checkpoints", group=_TRAIN)
    log_every: int = _opt(10, "log the loss every N optimizer steps", group=_TRAIN)
    eval_every: int = _opt(0, "evaluate every N optimizer steps (0: only before training and after each stage)",
                           group=_TRAIN)
    stop_after_step: Optional[int] = _opt(None, argparse.SUPPRESS, group=_TRAIN, type=int)  # testing: os._exit

    def __post_init__(self) -> None:
        if isinstance(self.conversion, dict):  # as run_config.json holds it
            self.conversion = ConversionConfig.from_dict(self.conversion)
        if not isinstance(self.conversion, ConversionConfig):
            raise UsageError(f"conversion must be a vit2cbsa.ConversionConfig, got {type(self.conversion).__name__}")
        validate_values(self)

    def fingerprint(self) -> Dict[str, Any]:
        """What must match for a relaunch to resume this run (every field but :data:`RESUMABLE_CHANGES`), as the
        JSON ``out/run_config.json`` holds it."""
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RESUMABLE_CHANGES}
        kept["conversion"] = self.conversion.to_dict()
        return json.loads(json.dumps(kept, default=str))

    @classmethod
    def from_arguments(cls, namespace: argparse.Namespace) -> "FinetuneConfig":
        """The run of a command line built by :func:`add_arguments`."""
        values = vars(namespace).copy()
        for name in ConversionConfig.argument_names():
            values.pop(name, None)
        return cls(**values, conversion=ConversionConfig.from_arguments(namespace))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per :class:`FinetuneConfig` field to ``parser`` (``--lora-rank`` for ``lora_rank``), in
    argument groups, with the fields' help (the conversion's from :class:`~vit2cbsa.config.ConversionConfig`);
    ``FinetuneConfig.from_arguments(parser.parse_args())`` is the run."""
    groups: Dict[str, Any] = {}
    for f in fields(FinetuneConfig):
        meta = dict(f.metadata)
        name = meta.pop("group")
        group = groups.get(name) or groups.setdefault(name, parser.add_argument_group(name))
        if f.name == "conversion":
            ConversionConfig.add_arguments(group)
            continue
        flags = meta.pop("flags", (f"--{f.name.replace('_', '-')}",))
        kw: Dict[str, Any] = dict(dest=f.name, help=meta.pop("help"), **meta)
        if f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(kw.get("default"), bool):
            kw["action"] = "store_true"
        elif "type" not in kw and "choices" not in kw and kw.get("default") is not None:
            kw["type"] = type(kw["default"])
        group.add_argument(*flags, **kw)
    return parser


# --------------------------------------------------------------------------- option values


def _number(flag: str, value: Any, *, low: float = 0.0, low_ok: bool = False, high: Optional[float] = None,
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


def validate_values(c: FinetuneConfig) -> None:
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


def check_launch(c: FinetuneConfig, num_processes: int) -> int:
    """One-line :class:`UsageError` s for what this launch cannot run (no stage, a batch that does not divide
    into the processes and accumulation steps, ...); returns the per-process batch size."""
    if not any((c.align_steps, c.finetune_steps)):
        raise UsageError("nothing to do: give --align-steps and/or --finetune-steps")
    if c.grad_accum < 1 or c.batch_size < 1:
        raise UsageError("--batch-size and --grad-accum must be positive")
    parts = num_processes * c.grad_accum
    if c.batch_size % parts:
        raise UsageError(f"--batch-size {c.batch_size} does not divide into {num_processes} process(es) x "
                         f"{c.grad_accum} accumulation step(s); use a multiple of {parts}")
    if c.align_trainable not in ("attention", "new"):
        raise UsageError("--align-trainable must be 'attention' or 'new'")
    if not 0.0 <= c.distill_weight <= 1.0:
        raise UsageError("--distill-weight must be in [0, 1]")
    if c.checkpoint_every < 1:
        raise UsageError("--checkpoint-every must be positive")
    return c.batch_size // parts


def check_environment(c: FinetuneConfig) -> None:
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


__all__ = ["FinetuneConfig", "MIXED_PRECISIONS", "RESUMABLE_CHANGES", "STAGES", "add_arguments", "check_environment",
           "check_launch", "cpu_autocast_supports", "validate_values"]
