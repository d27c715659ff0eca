"""The fine-tuning run: :func:`run` and the :class:`FinetuneRun` it drives (see :mod:`vit2cbsa.train` for what a
run does, in order, and how it resumes).

A run: check the options, make the ``Accelerator`` (DDP or FSDP2, mixed precision, accumulation), load the data
and the model, convert a copy; then, holding ``out/run.lock``, pick the checkpoint to resume from, evaluate,
train each stage (:mod:`vit2cbsa.train.stages`) with checkpoints, metrics and evaluations along the way, and
finally evaluate the original and the converted model on the whole evaluation split and save ``out/final``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..info import conversion_info
from ..errors import UsageError, one_line
from .checkpoints import Checkpoint, finished_result, save_checkpoint, set_aside, write_json
from .config import STAGES, FinetuneConfig, check_environment, check_launch, validate_values
from .data import TransformedDataset
from .evaluation import accuracy, data_loader
from .final import save_final
from .loading import converted_copy, load_data, load_model, plain_copy, training_datasets
from .lock import hold_output_lock
from .lora import lora_targets
from .metrics import MetricsLog, StageClock
from .progress import progress_bar
from .sharding import (describe_units, fsdp_requested, full_state_dict, make_plugin, quiet_view_warning,
                       set_wrap_policy, shard_cpu_processes)
from .stages import Stage, align_stage, finetune_stage, warmup_cosine

STOP_EXIT_CODE = 17  # --stop-after-step: the simulated kill


def _hard_exit(code: int) -> None:  # separate so tests can intercept it
    os._exit(code)


class FinetuneRun:
    """One launch of the run ``config`` describes, on every process: :meth:`__call__` trains (or resumes, or
    returns the finished run's result). Everything that can be checked before ``out`` is written is checked here."""

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
        self.resume: Optional[Checkpoint] = None
        self.timing: Dict[str, dict] = {}
        self.bad_images = {"train": 0}  # samples replaced this launch (summed over steps and processes)
        self.per_device = check_launch(c, acc.num_processes)
        self.previous = finished_result(self.out, c.fingerprint())
        if self.previous is not None:
            return
        set_seed(c.seed)
        self.data = load_data(c)
        n_classes = len(self.data.classes)
        self.loaded = lm = load_model(c.model, n_classes, self.data.classes, c.checkpoint, c.model_kwargs)
        if lm.class_names is not None and not lm.head_reset and list(lm.class_names) != self.data.classes:
            acc.print(f"warning: the model's classes {lm.class_names} differ from the dataset's {self.data.classes}")
        if c.distill_weight > 0 and lm.head_reset:
            raise UsageError(f"--distill-weight needs the original model's classifier; it has no {n_classes}-class head "
                             "for this dataset")
        self.original = lm.model.eval().requires_grad_(False)
        self.student = self._converted_copy()
        self.targets = lora_targets(self.student, c.lora_targets) if "finetune" in self.stages and c.lora_rank else None
        self.datasets = training_datasets(c, self.data, lm.transforms)

    def _converted_copy(self) -> nn.Module:
        try:
            return converted_copy(self.original, self.config)
        except (TypeError, ValueError) as e:
            raise UsageError(f"convert: {one_line(e)}") from None

    # ---- the output folder
    def _open_output(self) -> None:
        """Under the lock: pick the checkpoint to resume from and prepare ``out`` (the first writes)."""
        c, acc, ds = self.config, self.accelerator, self.datasets
        self.previous = finished_result(self.out, c.fingerprint())  # a run that finished while this one was loading
        if self.previous is not None:
            return
        self.resume = self._find_resume()
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_dir.glob(".tmp_step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            write_json(self.out / "run_config.json", c.fingerprint())
        acc.wait_for_everyone()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", acc.is_main_process,
                                  self.resume[1]["global_step"] if self.resume else None)
        self.original.to(acc.device)
        self.student.to(acc.device)
        sub = "" if ds.eval_subset is ds.eval else f", {len(ds.eval_subset)} of them for evaluations during training"
        acc.print(f"vit2cbsa finetune: {c.model} on {self.data.source} ({len(ds.train)} train / "
                  f"{len(ds.eval)} eval images{sub}, {len(self.data.classes)} classes); {acc.num_processes} "
                  f"process(es), mixed precision {acc.mixed_precision}, per-process batch {self.per_device} x "
                  f"{c.grad_accum} accumulation\n{conversion_info(self.student)}")

    def _find_resume(self) -> Optional[Checkpoint]:
        """The newest complete checkpoint, chosen by the main process (which sets incomplete newer ones aside)
        and shared with the others."""
        acc = self.accelerator
        found: List[Any] = [None]
        if acc.is_main_process and self.ckpt_dir.is_dir():
            best = set_aside(self.ckpt_dir, acc.print)
            found = [None if best is None else (str(best[0]), best[1])]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(found)
        return None if found[0] is None else (Path(found[0][0]), found[0][1])

    # ---- data and evaluation
    def _loader(self, train: bool, dataset: Optional[TransformedDataset] = None):
        c = self.config
        bs = self.per_device if train else (c.eval_batch_size or 2 * self.per_device)
        if dataset is None:
            dataset = self.datasets.train if train else self.datasets.eval
        return data_loader(dataset, bs, train, c.num_workers, c.seed, self.accelerator.device.type == "cuda")

    def unwrap(self, model: nn.Module) -> nn.Module:
        """``model`` without Accelerate's wrappers, ``torch.compile``'s included (``accelerate launch
        --dynamo_backend inductor`` compiles what ``prepare`` gets)."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def evaluate(self, model: nn.Module, subset: bool = False, desc: str = "eval") -> float:
        """Accuracy on the evaluation split (``subset``: the ``eval_subset`` images used during training);
        images counted, seconds and unreadable images left out (``skip_bad_images``) go to ``self.last_eval``."""
        full = self.datasets.eval
        ds = self.datasets.eval_subset if subset else full
        what = f"{len(ds)} of {len(full)} images" if ds is not full else f"{len(ds)} images"
        value, record = accuracy(self.accelerator, model, self._loader(train=False, dataset=ds), f"{desc} ({what})")
        if not self.config.skip_bad_images:
            del record["bad_images"]
        self.last_eval = record
        return value

    # ---- the stages
    def _stage(self, stage: str) -> Stage:
        c, acc = self.config, self.accelerator
        if stage == "align":
            return align_stage(c, self.student, self.original, acc, self.fsdp, self.unwrap)
        return finetune_stage(c, self.student, self.original, acc, self.targets, self.loaded.head_names, self.unwrap)

    def _resume_stage(self, stage: str) -> int:
        """Load the checkpoint to resume from if it is in ``stage`` (after ``prepare``); its step, else 0."""
        if self.resume is None or self.resume[1]["stage"] != stage:
            return 0
        acc, (folder, progress) = self.accelerator, self.resume
        sharded = bool(progress.get("sharded", False))
        if sharded != self.fsdp:
            raise UsageError(f"cannot resume from {folder}: it was written {'with' if sharded else 'without'}"
                             f" FSDP and this launch runs {'with' if self.fsdp else 'without'} it; relaunch with "
                             "the accelerate configuration of the run that wrote it")
        try:
            acc.load_state(str(folder))
        except Exception as e:  # damage the checks before resuming could not see
            raise UsageError(f"cannot resume from {folder}: {one_line(e)}; move that folder away to "
                             "resume from an older checkpoint") from None
        acc.print(f"resumed {stage} at step {progress['stage_step']}/{self.stage_steps[stage]} from {folder}")
        return progress["stage_step"]

    def train_stage(self, stage: str) -> nn.Module:
        """Set up ``stage``, resume it if the newest checkpoint is in it, train to its last step."""
        from torch.optim.lr_scheduler import LambdaLR
        c, acc = self.config, self.accelerator
        acc.free_memory()  # forget the previous stage's objects: the train loader is the first one checkpointed
        steps = self.stage_steps[stage]
        offset = sum(self.stage_steps[s] for s in self.stages[: self.stages.index(stage)])
        st = self._stage(stage)
        scheduler = LambdaLR(st.optimizer, warmup_cosine(steps, c.warmup_ratio))
        if self.fsdp:
            set_wrap_policy(acc.state.fsdp_plugin, st.module, self.fsdp_extra_units)
        module, optimizer, loader, scheduler = acc.prepare(st.module, st.optimizer, self._loader(train=True), scheduler)
        if self.fsdp:
            acc.print(f"FSDP2 units ({stage}): {describe_units(self.unwrap(module))}; {acc.num_processes} shards each")
        step = first_step = self._resume_stage(stage)
        steps_per_epoch = math.ceil(len(loader) / c.grad_accum)
        bar = progress_bar(acc.is_main_process, total=steps, initial=step, desc=stage, unit="step")
        clock = StageClock(bar)
        bad = torch.zeros((), device=acc.device)
        module.train()
        self.original.eval()  # the frozen original: no dropout / drop-path (module.train() reached it in align)
        while step < steps:
            epoch, done = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            self.datasets.train.set_epoch(epoch)
            batches = acc.skip_first_batches(loader, done * c.grad_accum) if done else loader
            running = 0.0
            for batch in batches:
                with acc.accumulate(module):
                    loss = st.loss(module, batch)
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
                        accuracy = self.evaluate(st.eval_model(module), subset=True, desc=f"{stage} eval")
                    self.metrics.write(stage=stage, step=step, global_step=gstep, eval_accuracy=accuracy,
                                       **self.last_eval)
                    acc.print(f"{stage} step {step}: eval accuracy {accuracy:.4f} ({self.last_eval['eval_images']} "
                              f"images, {self.last_eval['eval_s']:.1f} s)")
                if step % c.checkpoint_every == 0 or step == steps:
                    with clock.pause("checkpoint"):
                        save_checkpoint(acc, self.ckpt_dir, dict(
                            stage=stage, stage_step=step, stage_steps=steps, global_step=gstep,
                            epoch=divmod(step, steps_per_epoch)[0], step_in_epoch=divmod(step, steps_per_epoch)[1],
                            num_processes=acc.num_processes, sharded=self.fsdp), c.keep_checkpoints)
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
            state = full_state_dict(self.unwrap(module), "student." if stage == "align" else "")
            trained = plain_copy(self.original, c, state, self.targets if lora else None,
                                 self.loaded.head_names).to(acc.device)
        else:
            trained = st.eval_model(module)
        if stage == "align":
            self.unwrap(module).remove()
            if self.fsdp:
                self.student = trained
        return trained

    # ---- the whole run
    def __call__(self) -> dict:
        """Train (or resume) and return ``final.json``'s content; a finished run's result as it is."""
        if self.previous is None:
            with hold_output_lock(self.accelerator, self.out):
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
        saved_as = save_final(acc, model, self.out / "final", self.data.classes, self.unwrap)
        start = [r for r in self.metrics.records() if r["stage"] == "start"] if acc.is_main_process else []
        result = dict(
            original_accuracy=original_acc, converted_accuracy=converted_acc,
            converted_accuracy_before_training=start[0]["eval_accuracy"] if start else None,
            eval_images=final_eval["eval_images"], intermediate_eval_images=len(self.datasets.eval_subset),
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
            write_json(self.out / "final.json", result)
        acc.wait_for_everyone()
        acc.print(f"original accuracy {original_acc:.4f}, converted accuracy {converted_acc:.4f} "
                  f"({final_eval['eval_images']} images) -> {self.out / 'final.json'}")
        return result


def run(config: FinetuneConfig) -> dict:
    """Run (or resume, or return the result of) the fine-tuning described by ``config``.

    Returns the content of ``out/final.json``. Raises :class:`~vit2cbsa.errors.UsageError` on bad input, before
    anything is written to ``config.output_dir``, and when another run holds ``out/run.lock``;
    :class:`~vit2cbsa.errors.BadImageError` for an unreadable image (without ``skip_bad_images``).
    """
    return FinetuneRun(config)()
