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

Accelerate does the distributed work (DDP, or FSDP/DeepSpeed as configured with
``accelerate config``), mixed precision, gradient accumulation and checkpointing. ``batch_size``
is the global batch per optimizer step, split over processes and accumulation steps.

Resuming: every ``checkpoint_every`` optimizer steps, and at the end of each stage, the full
training state (model, optimizer, scheduler, RNG of every process, sampler) is saved with
``accelerator.save_state`` into ``out/checkpoints/.tmp_step_N``, plus ``progress.json`` (stage,
step, epoch, position in the epoch), and only then renamed to ``step_N``. A relaunch of the same
command loads the newest complete ``step_N`` and continues mid-epoch with
``accelerator.skip_first_batches``; since shuffling depends only on ``(seed, epoch)`` and
augmentation only on ``(seed, epoch, sample)``, it ends with the weights an uninterrupted run has.
``out/metrics.jsonl`` gets one JSON line per logged step or evaluation (lines past the resumed
checkpoint are dropped on resume). A finished run (``final.json`` present) is not redone.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import specs
from ..convert import conversion_info, convert
from .align import AttentionAligner
from .data import (DataError, TransformedDataset, Transforms, hf_transforms, load_image_data, subset_indices,
                   teacher_transforms, timm_transforms)

TEACHER = "cifar10-teacher"
STAGES = ("align", "finetune")
PROGRESS = "progress.json"
STOP_EXIT_CODE = 17  # --stop-after-step: the simulated kill
#: operational settings that may change between a run and its resumption
_RESUMABLE_CHANGES = ("output_dir", "stop_after_step", "num_workers", "log_every", "eval_every",
                      "checkpoint_every", "keep_checkpoints", "eval_batch_size", "cpu")


class UsageError(ValueError):
    """Bad input (missing data, unknown model, bad option): a one-line message for the user."""


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


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


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
    """Load ``spec``: ``cifar10-teacher``, ``timm:NAME`` (``--checkpoint`` for local weights, else
    ``pretrained=True``), ``hf:ID_OR_PATH`` or a local transformers folder; a bare name is tried as timm,
    then transformers. The classifier is replaced when it does not have ``num_classes`` outputs."""
    kwargs = dict(model_kwargs or {})
    if spec == TEACHER:
        from ..zoo import load_cifar10_teacher

        try:
            model, cfg = load_cifar10_teacher()
        except FileNotFoundError as e:
            raise UsageError(_one_line(e)) from None
        reset = model.num_classes != num_classes
        if reset:
            model.reset_classifier(num_classes)
        return LoadedModel(model, "timm", teacher_transforms(cfg), ["head"], reset, cfg.get("class_names"))
    if spec.startswith("timm:") or (not spec.startswith("hf:") and not Path(spec).exists() and _is_timm_name(spec)):
        return _load_timm(spec.split(":", 1)[1] if spec.startswith("timm:") else spec, num_classes, checkpoint, kwargs)
    if checkpoint:
        raise UsageError("--checkpoint is for timm models (--model timm:NAME); a transformers model loads from its folder")
    return _load_hf(spec[3:] if spec.startswith("hf:") else spec, num_classes, class_names)


def _is_timm_name(name: str) -> bool:
    import timm

    return bool(timm.list_models(name.split(".")[0]))


def _load_timm(name: str, num_classes: int, checkpoint: Optional[str], kwargs: dict) -> LoadedModel:
    import timm

    if checkpoint and not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint file {checkpoint!r} does not exist")
    try:
        if checkpoint:
            model = timm.create_model(name, pretrained=False, checkpoint_path=checkpoint, **kwargs)
        else:
            model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # unknown name, offline, weights that do not fit the kwargs ...
        where = f" from {checkpoint}" if checkpoint else " (pretrained=True; offline? pass --checkpoint)"
        raise UsageError(f"cannot load timm model {name!r}{where}: {_one_line(e)}") from None
    reset = model.num_classes != num_classes
    if reset:
        model.reset_classifier(num_classes)
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    heads = [heads] if isinstance(heads, str) else list(heads)
    return LoadedModel(model, "timm", timm_transforms(model), heads, reset)


def _load_hf(path: str, num_classes: int, class_names: List[str]) -> LoadedModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(path)
        processor = AutoImageProcessor.from_pretrained(path)
        kw = {}
        if config.num_labels != num_classes:
            kw = dict(num_labels=num_classes, ignore_mismatched_sizes=True,
                      id2label=dict(enumerate(class_names)), label2id={c: i for i, c in enumerate(class_names)})
        model = AutoModelForImageClassification.from_pretrained(path, **kw)
    except Exception as e:
        raise UsageError(f"cannot load transformers model {path!r} (a local folder with config.json and "
                         f"preprocessor_config.json, or a Hub id already in the cache): {_one_line(e)}") from None
    heads = [n for n, _ in model.named_children() if "classifier" in n]
    names = [model.config.id2label[i] for i in range(num_classes)] if not kw else None
    return LoadedModel(model, "hf", hf_transforms(processor), heads, bool(kw), names)


def logits_of(model: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits of a (possibly DDP- or PEFT-wrapped) timm or transformers classifier."""
    return model(pixel_values=x).logits if kind == "hf" else model(x)


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


def latest_checkpoint(ckpt_dir: Path) -> Optional[Tuple[Path, dict]]:
    """The newest complete checkpoint (``step_N`` with its ``progress.json``) or ``None``."""
    best = None
    for d in ckpt_dir.glob("step_*"):
        if (d / PROGRESS).is_file():
            progress = json.loads((d / PROGRESS).read_text())
            if best is None or progress["global_step"] > best[1]["global_step"]:
                best = (d, progress)
    return best


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


# --------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, config: FinetuneConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        c = self.config = config
        self.accelerator = acc = Accelerator(
            mixed_precision=c.mixed_precision, gradient_accumulation_steps=c.grad_accum, cpu=c.cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=c.seed),
            step_scheduler_with_optimizer=False)
        self.out = Path(c.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.stages = [s for s, n in zip(STAGES, (c.align_steps, c.finetune_steps)) if n > 0]
        self.stage_steps = {"align": c.align_steps, "finetune": c.finetune_steps}
        self._validate_options()
        self.previous = self._check_output_dir()
        if self.previous is not None:
            return
        self.resume = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir.is_dir() else None
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
            self.student = convert(copy.deepcopy(self.original), c.variant, parse_representatives(c.representatives),
                                   parse_layers(c.layers), broadcast=c.broadcast,
                                   extra_representatives=c.extra_representatives, prefix_broadcast=c.prefix_broadcast)
        except (TypeError, ValueError) as e:
            raise UsageError(f"convert: {_one_line(e)}") from None
        if "finetune" in self.stages and c.lora_rank > 0:
            self.targets = lora_targets(self.student, lm.kind, c.lora_targets)
        self.train_ds = TransformedDataset(self.data.train, lm.transforms.train, seed=c.seed,
                                           indices=subset_indices(len(self.data.train), c.max_train_samples, c.seed))
        self.eval_ds = TransformedDataset(self.data.eval, lm.transforms.eval,
                                          indices=subset_indices(len(self.data.eval), c.max_eval_samples, c.seed))
        if len(self.train_ds) < c.batch_size:
            raise UsageError(f"the training split has {len(self.train_ds)} images, fewer than one batch of {c.batch_size}")
        # -- everything is valid: from here on the output folder is written
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
        acc.print(f"vit2cbsa finetune: {c.model} on {self.data.source} ({len(self.train_ds)} train / "
                  f"{len(self.eval_ds)} eval images, {n_classes} classes); {acc.num_processes} process(es), "
                  f"mixed precision {acc.mixed_precision}, per-process batch {self.per_device} x {c.grad_accum} "
                  f"accumulation\n{conversion_info(self.student)}")

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
    def _loader(self, train: bool):
        from torch.utils.data import DataLoader

        c = self.config
        bs = self.per_device if train else (c.eval_batch_size or 2 * self.per_device)
        # its own generator: a DataLoader without one draws a seed from the global RNG each epoch,
        # which a resumed run (one more iterator, for the partial epoch) would do once more
        return DataLoader(self.train_ds if train else self.eval_ds, batch_size=bs, shuffle=train, drop_last=train,
                          num_workers=c.num_workers, pin_memory=self.accelerator.device.type == "cuda",
                          generator=torch.Generator().manual_seed(c.seed))

    def unwrap(self, model: nn.Module) -> nn.Module:
        """``model`` without Accelerate's wrappers, ``torch.compile``'s included (``accelerate launch
        --dynamo_backend inductor`` compiles what ``prepare`` gets)."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        acc = self.accelerator
        loader = acc.prepare_data_loader(self._loader(train=False))
        was_training = model.training
        model.eval()
        correct = total = 0
        for x, y in loader:
            with acc.autocast():
                pred = logits_of(model, x, self.loaded.kind).argmax(-1)
            pred, y = acc.gather_for_metrics((pred, y))
            correct += (pred == y).sum().item()
            total += y.numel()
        model.train(was_training)
        return correct / max(1, total)

    # ---- stages
    def _setup_align(self):
        c = self.config
        aligner = AttentionAligner(self.student, self.original, c.align_trainable)
        self.student.requires_grad_(False)
        for p in aligner.parameters_to_train():
            p.requires_grad_(True)
        plr = c.align_pretrained_lr if c.align_pretrained_lr is not None else c.align_lr / 10
        optimizer = torch.optim.AdamW(aligner.param_groups(c.align_lr, plr), weight_decay=0.0)

        def loss_fn(module, batch):
            return module(batch[0])[0]

        return aligner, optimizer, loss_fn, lambda m: self.unwrap(m).student

    def _setup_finetune(self):
        c, kind = self.config, self.loaded.kind
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
            x, y = batch
            logits = logits_of(module, x, kind)
            loss = F.cross_entropy(logits, y)
            if w > 0:
                with torch.no_grad(), self.accelerator.autocast():
                    target = logits_of(self.original, x, kind)
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
        module, optimizer, loader, scheduler = acc.prepare(module, optimizer, self._loader(train=True), scheduler)
        step = 0
        if self.resume is not None and self.resume[1]["stage"] == stage:
            acc.load_state(str(self.resume[0]))
            step = self.resume[1]["stage_step"]
            acc.print(f"resumed {stage} at step {step}/{steps} from {self.resume[0]}")
        steps_per_epoch = math.ceil(len(loader) / c.grad_accum)
        bar = tqdm(total=steps, initial=step, desc=stage, disable=not acc.is_main_process, dynamic_ncols=True)
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
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                bar.update(1)
                gstep = offset + step
                if step % c.log_every == 0 or step == steps:
                    value = acc.reduce(running.reshape(1), "mean").item()  # type: ignore[union-attr]
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    self.metrics.write(stage=stage, step=step, global_step=gstep, epoch=epoch, loss=value, lr=lr)
                running = 0.0
                if (c.eval_every and step % c.eval_every == 0) or step == steps:
                    accuracy = self.evaluate(eval_model(module))
                    self.metrics.write(stage=stage, step=step, global_step=gstep, eval_accuracy=accuracy)
                    acc.print(f"{stage} step {step}: eval accuracy {accuracy:.4f}")
                if step % c.checkpoint_every == 0 or step == steps:
                    self.save_checkpoint(dict(stage=stage, stage_step=step, stage_steps=steps, global_step=gstep,
                                              epoch=divmod(step, steps_per_epoch)[0],
                                              step_in_epoch=divmod(step, steps_per_epoch)[1],
                                              num_processes=acc.num_processes))
                if gstep == c.stop_after_step:
                    acc.print(f"--stop-after-step {c.stop_after_step}: exiting abruptly")
                    _hard_exit(STOP_EXIT_CODE)
                if step >= steps:
                    break
        bar.close()
        trained = eval_model(module)
        if stage == "align":
            self.unwrap(module).remove()
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
            done = sorted((p["global_step"], d) for d, p in
                          ((d, json.loads((d / PROGRESS).read_text())) for d in self.ckpt_dir.glob("step_*")
                           if (d / PROGRESS).is_file()))
            for _, old in done[: max(0, len(done) - max(1, self.config.keep_checkpoints))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def save_final(self, model: nn.Module) -> str:
        """``out/final``: a :func:`vit2cbsa.save_pretrained` folder (``vit2cbsa.from_pretrained`` and
        ``vit2cbsa push`` take it as it is), or, under FSDP or for an architecture that cannot be
        rebuilt from its recorded constructor arguments, Accelerate's plain safetensors weights."""
        from accelerate.utils import DistributedType

        from ..hub import save_pretrained

        acc, final = self.accelerator, self.out / "final"
        fmt = "vit2cbsa"
        if acc.distributed_type == DistributedType.FSDP:
            fmt = "safetensors"
        elif acc.is_main_process:
            if final.exists():  # left by a launch killed while saving: ours to replace
                shutil.rmtree(final)
            try:
                save_pretrained(self.unwrap(model), final)
            except ValueError as e:
                acc.print(f"warning: out/final holds the weights only ({_one_line(e)})")
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
        if self.previous is not None:
            self.accelerator.print(f"{self.out} already holds a finished run (final.json); nothing to do")
            return self.previous
        c, acc = self.config, self.accelerator
        t0 = time.time()
        if self.resume is None:
            before = self.evaluate(self.student)
            self.metrics.write(stage="start", step=0, global_step=0, eval_accuracy=before)
            acc.print(f"converted model before training: eval accuracy {before:.4f}")
        model = self.student
        resumed_stage = STAGES.index(self.resume[1]["stage"]) if self.resume else -1
        for stage in self.stages:
            if STAGES.index(stage) < resumed_stage:
                continue  # finished before the checkpoint we resume from
            model = self.train_stage(stage)
        if "finetune" in self.stages and c.lora_rank > 0:
            model = model.merge_and_unload()
        original_acc, converted_acc = self.evaluate(self.original), self.evaluate(model)
        saved_as = self.save_final(model)
        start = [r for r in self.metrics.records() if r["stage"] == "start"] if acc.is_main_process else []
        result = dict(
            original_accuracy=original_acc, converted_accuracy=converted_acc,
            converted_accuracy_before_training=start[0]["eval_accuracy"] if start else None,
            eval_images=len(self.eval_ds), classes=self.data.classes, head_reset=self.loaded.head_reset,
            stages={s: self.stage_steps[s] for s in self.stages}, num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision, weights=str(self.out / "final" / "model.safetensors"),
            final_format=saved_as,
            conversion=conversion_info(self.student).to_dict(), config=asdict(c),
            seconds_this_launch=round(time.time() - t0, 1))
        if acc.is_main_process:
            _write_json(self.out / "final.json", result)
        acc.wait_for_everyone()
        acc.print(f"original accuracy {original_acc:.4f}, converted accuracy {converted_acc:.4f} "
                  f"({len(self.eval_ds)} images) -> {self.out / 'final.json'}")
        return result


def run(config: FinetuneConfig) -> dict:
    """Run (or resume, or return the result of) the fine-tuning described by ``config``.

    Returns the content of ``out/final.json``. Raises :class:`UsageError` on bad input, before
    anything is written to ``config.output_dir``.
    """
    return _Run(config)()
