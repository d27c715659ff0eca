"""Convert a pretrained ViT and train it back to accuracy: attention alignment, then fine-tuning.

``run(FinetuneConfig(...))`` (CLI: ``accelerate launch examples/finetune.py``) does, in order:

0. load the model (timm / transformers / the embedded CIFAR-10 teacher) and the dataset, keep a
   frozen copy of the original and convert the other (:func:`vit2cbsa.convert`);
1. ``align`` (``align_steps > 0``): only the attention parameters of the converted layers train,
   each layer to reproduce the original layer's output on the original's inputs (no labels;
   :class:`AttentionAligner`);
2. ``finetune`` (``finetune_steps > 0``): supervised training of the whole model, or of LoRA
   adapters on the pretrained attention projections (PEFT) with the added ``mixer`` parameters
   and the classifier head trained in full; optionally distilling the original's logits
   (``loss = (1 - w) CE + w T^2 KL(p_orig^T || p^T)``);
3. final evaluation of the original and the converted model -> ``out/final.json``, weights (LoRA
   merged) -> ``out/final/model.safetensors``.

Accelerate does the distributed work (DDP, or FSDP2 as configured with ``accelerate config`` /
``examples/accelerate_fsdp.yaml``; :mod:`vit2cbsa.train.sharding` says what changes under FSDP), mixed
precision (bf16 and fp16, also on the CPU, where Accelerate itself would leave fp16 off), gradient
accumulation and checkpointing. ``batch_size`` is the global batch per optimizer step, split over processes
and accumulation steps.

Resuming: every ``checkpoint_every`` optimizer steps, and at the end of each stage, the full training state
(model, optimizer, scheduler, RNG of every process, sampler) is saved (:mod:`vit2cbsa.train.checkpoints`). A
relaunch of the same command loads the newest complete checkpoint and continues mid-epoch; since shuffling
depends only on ``(seed, epoch)`` and augmentation only on ``(seed, epoch, sample)``, it ends with the weights
an uninterrupted run has. ``out/metrics.jsonl`` gets one JSON line per logged step or evaluation (lines past
the resumed checkpoint are dropped on resume). A finished run (``final.json`` present) is not redone.

Surviving mistakes: one run at a time per output folder (``out/run.lock``, :mod:`vit2cbsa.train.lock`);
damaged checkpoints are skipped, saying why, and moved to ``checkpoints/invalid_step_N``; an unreadable image
stops the run with a one-line :class:`~vit2cbsa.errors.BadImageError` naming the file, or, with
``skip_bad_images``, is replaced (training) or left out (evaluation), counted in ``metrics.jsonl`` and
``final.json``; evaluations during training use a fixed subset of ``eval_subset`` images and their time is
reported apart from the training steps'; bad options are one-line :class:`~vit2cbsa.errors.UsageError` s raised
before anything is written.

The files:

* :mod:`.config` -- :class:`FinetuneConfig` (every option, with its help), its validation, ``fingerprint()``;
* :mod:`.loading` -- the model and its preprocessing (over :func:`vit2cbsa.loading.load`), the converted copy,
  the datasets;
* :mod:`.data` -- image folders and ``datasets`` splits, deterministic augmentation, unreadable images;
* :mod:`.align` -- :class:`AttentionAligner` and :func:`align_attention` (attention alignment on its own);
* :mod:`.lora` -- LoRA targets (from the adapters) and the PEFT model;
* :mod:`.stages` -- what each stage trains: optimizer, loss, schedule;
* :mod:`.loop` -- :func:`run` and the run that drives the stages;
* :mod:`.evaluation` -- data loaders and accuracy;
* :mod:`.checkpoints` -- saving, checking and choosing checkpoints; ``run_config.json``;
* :mod:`.metrics` -- ``metrics.jsonl`` and the stage clock;
* :mod:`.final` -- ``out/final``;
* :mod:`.lock` -- ``out/run.lock``;
* :mod:`.sharding` -- FSDP2.
"""

from ..errors import BadImageError, DataError, UsageError
from .align import AttentionAligner, align_attention
from .config import FinetuneConfig
from .loop import run

__all__ = ["AttentionAligner", "BadImageError", "DataError", "FinetuneConfig", "UsageError", "align_attention",
           "run"]
