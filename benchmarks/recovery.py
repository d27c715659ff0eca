"""Recovery of the CIFAR-10 teacher after conversion: "the table that matters".

For each attention variant (``cbsa``, ``contraction_free``, ``linear``; 16 representatives = a 4x4
grid on the teacher's 8x8 patch grid) this measures, on the full 10,000-image CIFAR-10 test set:

* the original's accuracy (from the teacher's config and re-measured here);
* the converted model at initialisation (zero-shot): accuracy, and cosine similarity of its
  pre-logits features to the original's (:func:`vit2cbsa.measure.feature_cosine`);
* after attention alignment, and after supervised fine-tuning (distilling the original's logits)
  for a fixed budget of steps, with the wall time of every stage and the parameters trained.

Runs (all with batch 128, seed 0, fine-tuning lr 5e-4, pure distillation of the original's logits
(distillation weight 1.0, no labels); flags change the defaults)::

    cbsa, contraction_free, linear   align 50 + full fine-tune 350 steps
    cbsa_noalign, linear_noalign     full fine-tune 400 steps, no alignment (same total steps)
    cbsa_lora                        align 50 + 350 steps of LoRA (rank 8, lr 2e-3)
    cbsa_lora_noalign                400 steps of LoRA, no alignment
    hybrid_cbsa                      layers "3:" only (blocks 0-2 keep softmax): align 50 + fine-tune 350

Alignment gets 50 steps because its accuracy curve saturates there (with 100 steps on the 71.96%
teacher: 61.6% at step 50, 62.6% at step 100), so the other 50 steps go to fine-tuning.

Cost: measured with ``--estimate`` on this 2-core machine while other jobs were running (1 thread):
~1.9 s per fine-tuning step and ~1.2 s per alignment step at batch 128, ~5 ms per evaluated image;
95 min for the whole benchmark on 1 thread. With the defaults on 2 threads the first six runs took 40 min on
2026-11-23 (0.9-1.2 s per fine-tuning step, 0.6-0.8 s per alignment step) and the two runs without alignment
added later (``--only linear_noalign,cbsa_lora_noalign --reuse``) 12 min, so about 52 min in all; run ``--estimate`` to check before launching.

The training is :func:`vit2cbsa.train.run` (one run per line above, each in its own folder
under ``--work-dir``, resumable: relaunching the same command continues an interrupted run and does
not redo finished ones). ``vit2cbsa.train.run`` evaluates on one evaluation set only, so the training
curves (every ``--eval-every`` steps) use a fixed random subset of ``--eval-subset`` test images
(``max_eval_samples``: ``subset_indices(10000, 1000, seed)``), and this script measures the final
numbers itself on all 10,000 test images from the saved weights: the converted model at
initialisation (same deterministic conversion as ``run``), the aligned model (the student's weights in
the checkpoint ``run`` saves at the end of the alignment stage) and ``OUT/final/model.safetensors``.

The teacher's weights are copied into ``--work-dir`` first and every run loads that copy (the file in
``vit2cbsa/assets`` may be replaced while this runs); its SHA-256 is recorded, and a run folder made with
another teacher or other settings is discarded and redone.

Writes into ``--out`` (default ``benchmarks/results``): ``recovery.json`` (everything, with a
``verdict``), ``recovery.png`` (eval accuracy against training steps for every run, and CBSA with vs
without alignment) and ``recovery.md`` (the markdown table, also printed to stdout).

    .venv/bin/python benchmarks/recovery.py --estimate          # ~3 min: time a few steps, project the total
    .venv/bin/python benchmarks/recovery.py                     # the full benchmark (2 threads)
    .venv/bin/python benchmarks/recovery.py --only cbsa,cbsa_noalign
    .venv/bin/python benchmarks/recovery.py --only linear_noalign --reuse benchmarks/results/recovery.json  # add a run
    .venv/bin/python benchmarks/recovery.py --smoke --threads 1  # plumbing check: ~5 steps, 256 images
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file

from vit2cbsa import ConversionConfig, zoo
from vit2cbsa.measure import feature_cosine
from vit2cbsa.train import FinetuneConfig, run
from vit2cbsa.train.align import AttentionAligner
from vit2cbsa.train.data import load_image_data, subset_indices, teacher_transforms
from vit2cbsa.train.loading import converted_copy
from vit2cbsa.train.lora import apply_lora, lora_targets

REPO = Path(__file__).resolve().parents[1]
RUN_NAMES = ("cbsa", "contraction_free", "linear", "cbsa_noalign", "linear_noalign", "cbsa_lora",
             "cbsa_lora_noalign", "hybrid_cbsa")
# (with alignment, without): the same run but for the alignment stage, whose steps go to fine-tuning instead
ALIGN_PAIRS = (("cbsa", "cbsa_noalign"), ("linear", "linear_noalign"), ("cbsa_lora", "cbsa_lora_noalign"))
VARIANTS = ("cbsa", "contraction_free", "linear")
DEFAULT_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_CACHE = Path("~/.cache/vit2cbsa").expanduser()


def log(msg: str) -> None:
    print(f"[recovery {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- setup: args, data, teacher


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="CIFAR-10 image folder (train/ + test/) or the .tar.gz to extract into --cache; default: "
                         "~/.cache/vit2cbsa/cifar10, /tmp/cifar/cifar10, else ../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where a --data tarball is extracted")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; with --smoke /tmp/vit2cbsa_recovery_smoke/results)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="run folders, checkpoints, teacher copy (default ~/.cache/vit2cbsa/recovery_runs; "
                         "with --smoke /tmp/vit2cbsa_recovery_smoke/runs)")
    ap.add_argument("--only", default=",".join(RUN_NAMES), help=f"comma-separated runs out of {','.join(RUN_NAMES)}")
    ap.add_argument("--align-steps", type=int, default=50)
    ap.add_argument("--finetune-steps", type=int, default=350)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--representatives", default="16", help="count (16 = 4x4 grid) or grid like 4x4")
    ap.add_argument("--hybrid-layers", default="3:", help="converted layers of the hybrid run")
    ap.add_argument("--broadcast", default=ConversionConfig.broadcast, help="key | query | transpose")
    ap.add_argument("--extra-representatives", default=ConversionConfig.extra_representatives,
                    help="prefix | global | none (none: the pooled grid only, the design before 2026-12-01)")
    ap.add_argument("--prefix-broadcast", default=ConversionConfig.prefix_broadcast, help="own | all")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--distill-weight", type=float, default=1.0,
                    help="weight of the KL to the original's logits (1.0: no labels used)")
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="fine-tuning learning rate (5e-4 beat 1e-4 by 0.8 points on contraction_free at this budget)")
    ap.add_argument("--lora-lr", type=float, default=None, help="learning rate of the LoRA run (default 4 x --lr)")
    ap.add_argument("--align-lr", type=float, default=1e-2,
                    help="alignment lr of the added per-head step sizes and temperatures (the pretrained "
                         "attention projections get 1/10 of it), as in examples/quickstart.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations on the eval subset")
    ap.add_argument("--eval-subset", type=int, default=1000, help="test images used for the training curves")
    ap.add_argument("--final-eval", type=int, default=None, help="test images for the final numbers (default all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--num-workers", type=int, default=1, help="data-loader worker processes per run")
    ap.add_argument("--reuse", type=Path, default=None, metavar="RECOVERY_JSON",
                    help="a recovery.json written earlier with the same teacher and settings: its runs that are not "
                         "in --only are copied into this result (marked 'reused_from'), so a run can be added to "
                         "a finished table without redoing the others")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each run's training checkpoints (default: deleted once the run is finished and measured)")
    ap.add_argument("--estimate", action="store_true",
                    help="time a few alignment / fine-tuning steps of every planned run (through vit2cbsa.train.run, "
                         "in --work-dir/estimate) and the evaluations, print the projected wall time of the full "
                         "benchmark with these settings, and exit (a few minutes)")
    ap.add_argument("--smoke", action="store_true",
                    help="plumbing check: 5 align + 5 fine-tune steps (10 without alignment), 256 eval images")
    args = ap.parse_args(argv)
    if args.smoke:
        args.align_steps, args.finetune_steps, args.eval_every = 5, 5, 5
        args.eval_subset = 256
        args.final_eval = 256
    smoke_root = Path("/tmp/vit2cbsa_recovery_smoke")
    args.out = args.out or (smoke_root / "results" if args.smoke else REPO / "benchmarks" / "results")
    args.work_dir = args.work_dir or (smoke_root / "runs" if args.smoke else DEFAULT_CACHE / "recovery_runs")
    args.lora_lr = args.lora_lr if args.lora_lr is not None else 4 * args.lr
    args.runs = [r.strip() for r in args.only.split(",") if r.strip()]
    bad = [r for r in args.runs if r not in RUN_NAMES]
    if bad:
        ap.error(f"--only: unknown run(s) {bad}; choose from {', '.join(RUN_NAMES)}")
    if args.eval_every < 1 or args.align_steps < 1 or args.finetune_steps < 1:
        ap.error("--eval-every, --align-steps and --finetune-steps must be positive")
    return args


def resolve_data(spec: Optional[str], cache: Path) -> Path:
    """An image folder with train/ and test/: ``spec`` itself, or ``spec`` (a tarball) extracted into ``cache``."""
    if spec is None:
        for cand in (cache / "cifar10", Path("/tmp/cifar/cifar10")):
            if (cand / "train").is_dir() and (cand / "test").is_dir():
                return cand
        spec = str(DEFAULT_TAR)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        root = cache / "cifar10"
        if not ((root / "train").is_dir() and (root / "test").is_dir()):
            log(f"extracting {path} into {cache}")
            cache.mkdir(parents=True, exist_ok=True)
            with tarfile.open(path) as tf:
                try:
                    tf.extractall(cache, filter="data")
                except TypeError:  # Python without extraction filters
                    tf.extractall(cache)
        return root
    raise SystemExit(f"error: --data {spec!r} is neither an image folder nor a tarball")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_teacher(work_dir: Path) -> Tuple[Path, str]:
    """Copy the embedded teacher (config + weights, consistently) and point ``vit2cbsa.zoo`` at the copy."""
    src = zoo.TEACHER_DIR
    tmp = work_dir / "teacher.tmp"
    for _ in range(5):
        before = sha256(src / "model.safetensors")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy2(src / "model.safetensors", tmp / "model.safetensors")
        shutil.copy2(src / "config.json", tmp / "config.json")
        digest = sha256(tmp / "model.safetensors")
        if digest == before == sha256(src / "model.safetensors"):
            break
        time.sleep(2)  # the background teacher training replaced the file while we copied it
    else:
        raise SystemExit(f"error: {src} keeps changing; try again")
    dest = work_dir / f"teacher_{digest[:12]}"
    if dest.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, dest)
    zoo.TEACHER_DIR = dest  # vit2cbsa.train.run -> load_model -> zoo.load_cifar10_teacher reads this
    return dest, digest


# --------------------------------------------------------------------------- measuring on the test set


class TestSet:
    """The (preprocessed) test images, the teacher's features on them, and measurement of any model."""

    def __init__(self, data_dir: Path, cfg: dict, limit: Optional[int], seed: int, eval_subset: int) -> None:
        data = load_image_data(str(data_dir))
        self.classes = data.classes
        self.n_total = len(data.eval)
        idx = subset_indices(self.n_total, limit, seed)
        self.indices = list(range(self.n_total)) if idx is None else idx
        tf = teacher_transforms(cfg).eval
        t0 = time.time()
        xs, ys = [], []
        for i in self.indices:
            img, y = data.eval[i]
            xs.append(tf(img.convert("RGB")))
            ys.append(int(y))
        self.x, self.y = torch.stack(xs), torch.tensor(ys)
        # the subset vit2cbsa.train.run evaluates on during training (same function, same seed)
        sub = subset_indices(self.n_total, eval_subset, seed)
        pos = {j: k for k, j in enumerate(self.indices)}
        self.subset_pos = None if sub is None else [pos[j] for j in sub if j in pos]
        self.subset_complete = sub is None or len(self.subset_pos) == len(sub)
        log(f"test set: {len(self.indices)} of {self.n_total} images from {data_dir} decoded in {time.time() - t0:.1f}s")
        self.teacher_feats: Optional[torch.Tensor] = None

    @torch.no_grad()
    def features_logits(self, model: torch.nn.Module, batch: int = 128) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pre-logits features and logits of a timm ViT (one forward pass per batch)."""
        model.eval()
        feats, logits = [], []
        for i in range(0, len(self.x), batch):
            x = self.x[i:i + batch]
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            z = model.head(f)
            if i == 0:  # the split forward is the model's forward
                ref = model(x[:8])
                assert torch.allclose(z[:8], ref, rtol=1e-3, atol=1e-4), "forward_head(pre_logits) + head != forward"
            feats.append(f)
            logits.append(z)
        return torch.cat(feats), torch.cat(logits)

    def measure(self, model: torch.nn.Module) -> dict:
        t0 = time.time()
        feats, logits = self.features_logits(model)
        correct = logits.argmax(-1) == self.y
        out = {"accuracy": correct.float().mean().item(), "images": len(self.y)}
        if self.subset_pos is not None:
            out["accuracy_eval_subset"] = correct[self.subset_pos].float().mean().item()
        if self.teacher_feats is None:
            self.teacher_feats = feats
        else:
            out["feature_cosine_to_original"] = feature_cosine(feats, self.teacher_feats)
        out["seconds"] = round(time.time() - t0, 1)
        return out


DESIGN = {}  # the representative design of this launch: broadcast, extra_representatives, prefix_broadcast


def count_trainable(teacher: torch.nn.Module, config: FinetuneConfig) -> dict:
    """Parameters each stage trains, counted with the objects ``vit2cbsa.train.run`` uses."""
    student = converted_copy(teacher, config)
    total = sum(p.numel() for p in student.parameters())
    t_copy = copy.deepcopy(teacher)
    aligner = AttentionAligner(student, t_copy, "attention")
    align = sum(p.numel() for p in aligner.parameters_to_train())
    new = sum(p.numel() for p in aligner.new)
    aligner.remove()
    student.requires_grad_(True)
    if config.lora_rank > 0:
        peft_model = apply_lora(student, lora_targets(student), ["head"], config.lora_rank)
        ft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    else:
        ft = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return {"model_total": total, "added_by_conversion": new, "align": align, "finetune": ft}


# --------------------------------------------------------------------------- one run


def run_specs(args) -> Dict[str, dict]:
    a, f = args.align_steps, args.finetune_steps
    return {
        "cbsa": dict(variant="cbsa", layers=None, align_steps=a, finetune_steps=f, lora_rank=0),
        "contraction_free": dict(variant="contraction_free", layers=None, align_steps=a, finetune_steps=f, lora_rank=0),
        "linear": dict(variant="linear", layers=None, align_steps=a, finetune_steps=f, lora_rank=0),
        "cbsa_noalign": dict(variant="cbsa", layers=None, align_steps=0, finetune_steps=a + f, lora_rank=0),
        "cbsa_lora": dict(variant="cbsa", layers=None, align_steps=a, finetune_steps=f, lora_rank=args.lora_rank),
        "hybrid_cbsa": dict(variant="cbsa", layers=args.hybrid_layers, align_steps=a, finetune_steps=f, lora_rank=0),
        "linear_noalign": dict(variant="linear", layers=None, align_steps=0, finetune_steps=a + f, lora_rank=0),
        "cbsa_lora_noalign": dict(variant="cbsa", layers=None, align_steps=0, finetune_steps=a + f,
                                  lora_rank=args.lora_rank),
    }


def make_config(args, spec: dict, out_dir: Path, data_dir: Path, **overrides) -> FinetuneConfig:
    kw = dict(
        model="cifar10-teacher", dataset=str(data_dir), output_dir=str(out_dir),
        conversion=ConversionConfig(spec["variant"], args.representatives, spec["layers"], broadcast=args.broadcast,
                                    extra_representatives=args.extra_representatives,
                                    prefix_broadcast=args.prefix_broadcast),
        max_eval_samples=args.eval_subset, eval_subset=0, num_workers=args.num_workers,  # all of max_eval_samples
        align_steps=spec["align_steps"], align_lr=args.align_lr,
        finetune_steps=spec["finetune_steps"], lr=args.lora_lr if spec["lora_rank"] else args.lr,
        lora_rank=spec["lora_rank"], eval_batch_size=128,
        distill_weight=args.distill_weight, batch_size=args.batch_size, mixed_precision="no", cpu=True,
        seed=args.seed, checkpoint_every=100, keep_checkpoints=1000,  # the end-of-alignment checkpoint must survive
        log_every=1 if args.smoke else min(10, args.eval_every), eval_every=args.eval_every)
    kw.update(overrides)
    return FinetuneConfig(**kw)


def prepare_run_dir(out_dir: Path, config: FinetuneConfig, teacher_sha: str) -> None:
    """Discard a run folder made with another teacher or other settings (vit2cbsa.train.run would refuse it or,
    for another teacher, return its stale result)."""
    key = {"teacher_sha256": teacher_sha, "config": config.fingerprint()}
    key_file = out_dir / "recovery_key.json"
    if out_dir.exists():
        old = json.loads(key_file.read_text()) if key_file.is_file() else None
        if old != key:
            log(f"{out_dir} holds a run with another teacher or other settings: discarding it")
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=2))


def parse_metrics(path: Path, align_steps: int) -> dict:
    """Eval curve (global step -> eval-subset accuracy) and per-stage wall time from metrics.jsonl.

    Evaluations are timed as the gap between an eval record and the log record of the same step just
    before it; ``train_s`` excludes them (it still includes checkpoint saving and stage setup)."""
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    # a resumed run restarts elapsed_s at 0: chain the launches (the time lost to the interruption is not counted)
    offset, last, resumed = 0.0, None, False
    for r in recs:
        if last is not None and r["elapsed_s"] + offset < last:
            offset, resumed = last - r["elapsed_s"], True
        r["elapsed_s"] += offset
        last = r["elapsed_s"]
    curve, eval_s = [], 0.0
    stage_wall: Dict[str, float] = {}
    stage_eval: Dict[str, float] = {}
    prev = None
    t_start = None
    stage_begin: Dict[str, float] = {}
    last_t = None
    for r in recs:
        if r["stage"] == "start":
            t_start = r["elapsed_s"]
            curve.append(dict(step=0, stage="start", accuracy=r["eval_accuracy"], train_s=0.0))
            last_t = t_start
            prev = r
            continue
        st = r["stage"]
        if st not in stage_begin:
            stage_begin[st] = last_t if last_t is not None else 0.0
        if "eval_accuracy" in r:
            dt = r["elapsed_s"] - prev["elapsed_s"] if prev is not None and prev["global_step"] == r["global_step"] \
                and "loss" in prev else 0.0
            eval_s += dt
            stage_eval[st] = stage_eval.get(st, 0.0) + dt
            curve.append(dict(step=r["global_step"], stage=st, accuracy=r["eval_accuracy"],
                              train_s=round(r["elapsed_s"] - (t_start or 0.0) - eval_s, 2)))
        stage_wall[st] = r["elapsed_s"] - stage_begin[st]
        last_t = r["elapsed_s"]
        prev = r
    stages = {st: {"wall_s": round(w, 1), "eval_s": round(stage_eval.get(st, 0.0), 1),
                   "train_s": round(w - stage_eval.get(st, 0.0), 1)} for st, w in stage_wall.items()}
    for st, s in stages.items():
        n = align_steps if st == "align" else None
        s["steps"] = n if n is not None else max((r["step"] for r in recs if r["stage"] == st), default=0)
        s["train_s_per_step"] = round(s["train_s"] / max(1, s["steps"]), 3)
        s["resumed"] = resumed  # then the times miss the steps redone after the interruption
    return {"curve": curve, "stages": stages}


def aligned_weights(run_dir: Path) -> Optional[Path]:
    """The student's weights at the end of alignment: extracted once from the stage-end checkpoint."""
    dest = run_dir / "aligned" / "model.safetensors"
    if dest.is_file():
        return dest
    ckpt_dir = run_dir / "checkpoints"
    for d in sorted(ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []:
        prog = json.loads((d / "progress.json").read_text()) if (d / "progress.json").is_file() else {}
        if prog.get("stage") == "align" and prog.get("stage_step") == prog.get("stage_steps"):
            state = load_file(str(d / "model.safetensors"))  # the AttentionAligner: student.* and teacher.*
            student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
            if not student:
                raise RuntimeError(f"{d}/model.safetensors has no 'student.' weights; keys: {list(state)[:5]}")
            from safetensors.torch import save_file

            dest.parent.mkdir(exist_ok=True)
            save_file(student, str(dest))
            return dest
    return None


def do_run(name: str, spec: dict, args, data_dir: Path, teacher: torch.nn.Module, teacher_sha: str,
           test: TestSet, init_cache: dict) -> dict:
    run_dir = args.work_dir / name
    config = make_config(args, spec, run_dir, data_dir)
    prepare_run_dir(run_dir, config, teacher_sha)
    log(f"run {name}: {spec['variant']} layers={spec['layers'] or 'all'} align {spec['align_steps']} + "
        f"{'LoRA r=' + str(spec['lora_rank']) if spec['lora_rank'] else 'full'} fine-tune {spec['finetune_steps']} steps "
        f"-> {run_dir}")
    t0 = time.time()
    final = run(config)
    wall = time.time() - t0
    metrics = parse_metrics(run_dir / "metrics.jsonl", spec["align_steps"])

    key = (spec["variant"], spec["layers"])
    if key not in init_cache:
        init_cache[key] = test.measure(converted_copy(teacher, config))
    res = {"init": init_cache[key]}
    if spec["align_steps"]:
        w = aligned_weights(run_dir)
        if w is None:
            raise RuntimeError(f"{run_dir}: no end-of-alignment checkpoint (was it deleted? rerun with a fresh --work-dir)")
        student = converted_copy(teacher, config)
        student.load_state_dict(load_file(str(w)), strict=True)
        res["aligned"] = test.measure(student)
    student = converted_copy(teacher, config)
    student.load_state_dict(load_file(final["weights"]), strict=True)
    res["final"] = test.measure(student)
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    # cross-check: our measurement on vit2cbsa.train.run's eval subset must give run's own numbers
    consistency = {}
    if test.subset_pos is not None and test.subset_complete:
        consistency["final"] = (res["final"]["accuracy_eval_subset"], final["converted_accuracy"])
        if "aligned" in res:
            at_align = [p["accuracy"] for p in metrics["curve"]
                        if p["stage"] == "align" and p["step"] == spec["align_steps"]]
            if at_align:
                consistency["aligned"] = (res["aligned"]["accuracy_eval_subset"], at_align[0])
        consistency["init"] = (res["init"]["accuracy_eval_subset"], metrics["curve"][0]["accuracy"])
        for k, (ours, theirs) in consistency.items():
            if abs(ours - theirs) > 2.5 / args.eval_subset:  # allow a couple of numerical argmax ties
                log(f"WARNING run {name}: {k} accuracy on the eval subset measured here {ours:.4f} != "
                    f"vit2cbsa.train.run's {theirs:.4f}")
    out = dict(
        name=name, **spec, representatives=str(args.representatives),
        full_finetune=spec["lora_rank"] == 0,
        trainable_params=count_trainable(teacher, config),
        test=res, consistency_eval_subset_ours_vs_run=consistency, curve=metrics["curve"], stages=metrics["stages"],
        wall_s_this_launch=round(wall, 1), run_seconds_reported=final.get("seconds_this_launch"),
        eval_subset_original_accuracy=final["original_accuracy"],
        eval_subset_final_accuracy=final["converted_accuracy"], run_dir=str(run_dir))
    log(f"run {name}: test accuracy init {res['init']['accuracy']:.4f} -> "
        f"{'aligned %.4f -> ' % res['aligned']['accuracy'] if 'aligned' in res else ''}final {res['final']['accuracy']:.4f} "
        f"({wall:.0f}s)")
    return out


# settings that may differ between a reused result and this launch (where things are, not what is run)
_REUSE_IGNORED = ("data", "work_dir", "torch", "cpu_count", "num_workers")


def reused_runs(path: Path, settings: dict, teacher_sha: str, skip: List[str]) -> Dict[str, dict]:
    """Runs of an earlier ``recovery.json`` (same teacher, same settings) that this launch did not run."""
    if not path.is_file():
        raise SystemExit(f"error: --reuse {path}: no such file")
    old = json.loads(path.read_text())
    if old.get("teacher", {}).get("sha256") != teacher_sha:
        raise SystemExit(f"error: --reuse {path} was measured on another teacher "
                         f"(sha256 {str(old.get('teacher', {}).get('sha256'))[:12]} vs {teacher_sha[:12]}); rerun those runs")
    diff = {k: (old["settings"].get(k), v) for k, v in settings.items()
            if k not in _REUSE_IGNORED and old["settings"].get(k) != v}
    if diff:
        raise SystemExit(f"error: --reuse {path} was run with other settings {diff} (old, now); use the same flags "
                         f"or rerun all runs")
    src = dict(file=str(path), date_utc=old.get("date_utc"), command=old.get("command"))
    out = {}
    for name, r in old["runs"].items():
        if name not in skip:
            out[name] = dict(r, reused_from=r.get("reused_from", src))
    return out


# --------------------------------------------------------------------------- summary: thresholds, verdict, table, plot


def first_step(curve: List[dict], thr: float) -> Optional[dict]:
    return next((p for p in curve if p["accuracy"] >= thr - 1e-12), None)


def compare_pair(a: List[dict], b: List[dict], teacher_sub: float) -> dict:
    """Global step at which curve ``a`` (with alignment) and curve ``b`` (without) first reach a threshold."""
    target = teacher_sub - 0.02
    if first_step(a, target) and first_step(b, target):
        thr, how = target, "teacher - 2 points (on the eval subset); both runs reach it"
    else:
        common = min(max(p["accuracy"] for p in a), max(p["accuracy"] for p in b))
        thr = math.floor(common * 200 + 1e-9) / 200  # down to a 0.5-point grid
        how = (f"teacher - 2 points ({target:.4f}) is not reached by both runs; the highest 0.5-point "
               f"threshold both reach instead")
    pa, pb = first_step(a, thr), first_step(b, thr)
    table = []
    for drop in (0.01, 0.02, 0.05, 0.10, 0.20):
        t = teacher_sub - drop
        qa, qb = first_step(a, t), first_step(b, t)
        table.append(dict(threshold=round(t, 4), drop_points=round(drop * 100),
                          with_alignment_step=qa and qa["step"], without_alignment_step=qb and qb["step"]))
    faster = pa is not None and pb is not None and pa["step"] < pb["step"]
    # the whole curves compared step by step: how often the aligned run is ahead, and by how much on average
    bs = {p["step"]: p["accuracy"] for p in b}
    at_step = [(p["step"], 100 * (p["accuracy"] - bs[p["step"]])) for p in a if p["step"] in bs and p["step"] > 0]
    diffs = [g for _, g in at_step]
    gaps = [(st, round(g, 2)) for st, g in at_step]
    return dict(threshold=round(thr, 4), threshold_rule=how, teacher_eval_subset_accuracy=teacher_sub,
                with_alignment=dict(step=pa and pa["step"], train_s=pa and pa["train_s"]),
                without_alignment=dict(step=pb and pb["step"], train_s=pb and pb["train_s"]),
                alignment_reaches_it_in_fewer_steps=faster, other_thresholds=table,
                gap_points_by_step=gaps, aligned_ahead_at_evals=f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
                mean_gap_points=round(sum(diffs) / max(1, len(diffs)), 2),
                note="steps count alignment steps and fine-tuning steps alike (global steps); train_s is training "
                     "wall time to that evaluation, evaluations excluded; curves are evaluated every "
                     "--eval-every steps, so step counts are resolved to that grid; gap_points_by_step: (with - without) "
                     "in points at each evaluation after step 0, mean_gap_points their mean")


def alignment_comparison(runs: Dict[str, dict], teacher_sub: float) -> Dict[str, dict]:
    """For every (with, without alignment) pair of :data:`ALIGN_PAIRS` present: :func:`compare_pair`."""
    out = {}
    for with_name, without_name in ALIGN_PAIRS:
        if with_name in runs and without_name in runs:
            out[with_name] = dict(with_run=with_name, without_run=without_name,
                                  **compare_pair(runs[with_name]["curve"], runs[without_name]["curve"], teacher_sub))
    return out


def verdict(runs: Dict[str, dict], teacher_acc: float, align_cmp: Dict[str, dict]) -> dict:
    v: dict = {}
    fin = {n: r["test"]["final"]["accuracy"] for n, r in runs.items()}
    base = {n: fin[n] for n in VARIANTS if n in fin}
    if base:
        best = max(base, key=base.get)
        gap = teacher_acc - base[best]
        v["best_variant"] = best
        v["best_variant_accuracy"] = base[best]
        v["best_variant_gap_points"] = round(100 * gap, 2)
        v["within_1_point_of_teacher"] = gap <= 0.01
        best_any = max(fin, key=fin.get)
        v["best_run_overall"] = best_any
        v["best_run_overall_gap_points"] = round(100 * (teacher_acc - fin[best_any]), 2)
    if align_cmp:
        v["alignment_faster"] = {k: c["alignment_reaches_it_in_fewer_steps"] for k, c in align_cmp.items()}
        parts = []
        for k, c in align_cmp.items():
            fw, fo = (runs[c["with_run"]]["test"]["final"]["accuracy"], runs[c["without_run"]]["test"]["final"]["accuracy"])
            parts.append(
                f"{k}: {pct(c['threshold'])}% on the eval subset reached at step {c['with_alignment']['step']} with "
                f"alignment (align stage included) vs {c['without_alignment']['step']} without "
                f"({'faster' if c['alignment_reaches_it_in_fewer_steps'] else 'NOT faster'}); aligned run ahead at "
                f"{c['aligned_ahead_at_evals']} evaluations (mean {c['mean_gap_points']:+.2f} points); final "
                f"{pct(fw)}% vs {pct(fo)}%")
        v["alignment_comparison"] = "Alignment vs none, same total steps -- " + "; ".join(parts)
    if all(n in base for n in VARIANTS):
        cf, li, cb = base["contraction_free"], base["linear"], base["cbsa"]
        margin, tol = 0.005, 0.01
        cf_first = cf - max(li, cb) >= margin
        li_eq_cb = abs(li - cb) <= tol
        holds = cf_first and li_eq_cb
        parts = [f"contraction_free {100 * cf:.2f}%, linear {100 * li:.2f}%, cbsa {100 * cb:.2f}% after adaptation"]
        parts.append("contraction-free is ahead of both by >= 0.5 point" if cf_first else
                     "contraction-free is NOT ahead of both by >= 0.5 point")
        parts.append("linear and CBSA are within 1 point of each other" if li_eq_cb else
                     f"linear and CBSA differ by {100 * abs(li - cb):.2f} points (> 1)")
        if runs["cbsa"]["test"]["init"]["accuracy"] == runs["contraction_free"]["test"]["init"]["accuracy"]:
            parts.append("note: CBSA starts as exactly the contraction-free form (its contraction step size gamma is "
                         "initialised to 0), so their difference is only what the learned contraction adds")
        v["paper_ordering_holds"] = holds
        v["paper_ordering"] = ("HOLDS" if holds else "DOES NOT HOLD") + \
            " here (paper: contraction-free > linear ~ CBSA): " + "; ".join(parts) + \
            ". One seed and a short budget: differences under ~1 point are within run-to-run noise."
    if "cbsa_lora" in fin and "cbsa" in fin:
        v["lora_vs_full"] = (f"cbsa LoRA r={runs['cbsa_lora']['lora_rank']}: {100 * fin['cbsa_lora']:.2f}% "
                             f"({runs['cbsa_lora']['trainable_params']['finetune']:,} params trained) vs full "
                             f"{100 * fin['cbsa']:.2f}% ({runs['cbsa']['trainable_params']['finetune']:,})")
    if "hybrid_cbsa" in fin:
        extra = f" vs all-layer cbsa {100 * fin['cbsa']:.2f}%" if "cbsa" in fin else ""
        v["hybrid"] = f"hybrid (layers {runs['hybrid_cbsa']['layers']} cbsa): {100 * fin['hybrid_cbsa']:.2f}%{extra}"
    return v


def pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def markdown(result: dict) -> str:
    t = result["teacher"]
    s = result["settings"]
    lines = [
        f"**Recovery of the CIFAR-10 teacher** (ViT, 6 blocks, {t['num_params'] / 1e6:.2f}M params; "
        f"teacher accuracy {pct(t['accuracy_measured'])}% re-measured on {t['test_images']:,} test images, "
        f"{pct(t['accuracy_from_config'])}% in its config). Converted models: {s['representatives']} pooled representatives "
        f"(on the 8x8 patch grid), extra representatives `{s.get('extra_representatives', 'none')}` "
        f"(prefix tokens read `{s.get('prefix_broadcast', 'all')}`), broadcast `{s.get('broadcast', 'key')}`; batch {s['batch_size']}, seed {s['seed']}, distillation weight "
        f"{s['distill_weight']} (KL to the original's logits, T=2); alignment lr {s['align_lr']}, fine-tuning lr {s['lr']} "
        f"(LoRA: {s['lora_lr']}), AdamW, 5% warm-up + cosine; "
        f"CPU, {s['threads']} thread(s). Accuracies on all {t['test_images']:,} test images; cos = mean cosine "
        f"similarity of pre-logits features to the original's.",
        "",
        "| run | attention (layers) | zero-shot acc | zero-shot cos | after align acc (cos) | final acc (cos) "
        "| Δ teacher | budget: align + fine-tune steps | wall: align + fine-tune | params trained: align / fine-tune |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in result["runs"].values():
        te = r["test"]
        al = te.get("aligned")
        fin = te["final"]
        ft_kind = f"LoRA r={r['lora_rank']}" if r["lora_rank"] else "full"
        st = r["stages"]
        wall = " + ".join(f"{st[k]['train_s']:.0f}s" for k in ("align", "finetune") if k in st)
        tp = r["trainable_params"]
        lines.append(
            f"| {r['name']} | {r['variant']} ({r['layers'] or 'all'}) | {pct(te['init']['accuracy'])} | "
            f"{te['init']['feature_cosine_to_original']:.3f} | "
            f"{pct(al['accuracy']) + ' (%.3f)' % al['feature_cosine_to_original'] if al else '–'} | "
            f"{pct(fin['accuracy'])} ({fin['feature_cosine_to_original']:.3f}) | "
            f"{100 * (fin['accuracy'] - t['accuracy_measured']):+.2f} | "
            f"{r['align_steps']} + {r['finetune_steps']} ({ft_kind}) | {wall} | "
            f"{(tp['align'] if r['align_steps'] else 0):,} / {tp['finetune']:,} |")
    v = result["verdict"]
    lines += ["", f"Wall times are training time on {s['threads']} CPU thread(s) with the periodic "
              f"{s['eval_subset']}-image evaluations excluded; " + (
        f"this launch took {result['total_wall_s'] / 60:.1f} min; runs " + ", ".join(
            f"{n} ({r['reused_from']['date_utc']})" for n, r in result["runs"].items() if "reused_from" in r) +
        " are reused from earlier launches with the same teacher and settings."
        if any("reused_from" in r for r in result["runs"].values()) else
        f"the whole benchmark took {result['total_wall_s'] / 60:.1f} min.")]
    for k, ac in (result.get("alignment_comparison") or {}).items():
        lines += ["", f"**Alignment vs none ({k} vs {ac['without_run']}, same total steps):** "
                  f"threshold {pct(ac['threshold'])}% on the {s['eval_subset']}-image eval subset "
                  f"(teacher there: {pct(ac['teacher_eval_subset_accuracy'])}%; {ac['threshold_rule']}). "
                  f"With alignment (align {s['align_steps']} + fine-tune) it is reached at step {ac['with_alignment']['step']} "
                  f"({ac['with_alignment']['train_s']}s), without at step {ac['without_alignment']['step']} "
                  f"({ac['without_alignment']['train_s']}s) → alignment "
                  f"{'IS' if ac['alignment_reaches_it_in_fewer_steps'] else 'is NOT'} faster in steps; the aligned "
                  f"run is ahead at {ac['aligned_ahead_at_evals']} evaluations (mean {ac['mean_gap_points']:+.2f} points)."]
    lines += ["", "**Verdict.**"]
    if "best_variant" in v:
        lines.append(f"- Best variant: {v['best_variant']} at {pct(v['best_variant_accuracy'])}%, "
                     f"{v['best_variant_gap_points']:.2f} points below the teacher → target (within 1 point) "
                     f"{'MET' if v['within_1_point_of_teacher'] else 'NOT MET'}.")
    for k in ("alignment_comparison", "paper_ordering", "lora_vs_full", "hybrid"):
        if k in v:
            lines.append(f"- {v[k]}")
    if s.get("smoke"):
        lines.append("- SMOKE RUN (a few steps, 256 images): plumbing only, the numbers mean nothing.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    s = result["settings"]
    teacher_sub = next(iter(runs.values()))["eval_subset_original_accuracy"]
    comparisons = result.get("alignment_comparison") or {}
    fig, axes = plt.subplots(1, 3 if comparisons else 2, figsize=(19 if comparisons else 13, 4.8))
    ax = axes[0]
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    markers = ["o", "s", "^", "v", "D", "x"]
    for i, (name, r) in enumerate((n, r) for n, r in runs.items() if not n.endswith("_noalign")):
        xs = [p["step"] for p in r["curve"]]
        ys = [100 * p["accuracy"] for p in r["curve"]]
        ax.plot(xs, ys, ls=styles[i % 6], marker=markers[i % 6], ms=4, label=name)
    ax.axhline(100 * teacher_sub, color="k", ls="--", lw=1, label="teacher")
    ax.axvline(s["align_steps"], color="grey", ls=":", lw=1)
    ax.text(s["align_steps"], ax.get_ylim()[0], " end of alignment", color="grey", fontsize=8, va="bottom")
    ax.set(xlabel="training step (alignment + fine-tuning)", ylabel=f"accuracy on {s['eval_subset']} test images (%)",
           title="Recovery per run (runs without alignment: right)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    colors = {with_name: f"C{i}" for i, (with_name, _) in enumerate(ALIGN_PAIRS)}
    for with_name, ac in comparisons.items():
        for name, ls, lab in ((with_name, "-", "align + fine-tune"), (ac["without_run"], "--", "fine-tune only")):
            r = runs[name]
            ax.plot([p["step"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], ls=ls,
                    color=colors[with_name], marker="o" if ls == "-" else "s", ms=3, label=f"{with_name}: {lab}")
        ax.axhline(100 * ac["threshold"], color=colors[with_name], ls=":", lw=0.8)
    ax.axhline(100 * teacher_sub, color="k", ls="--", lw=1, label="teacher")
    ax.axvline(s["align_steps"], color="grey", ls=":", lw=1)
    ax.set(xlabel="training step (alignment + fine-tuning)",
           title="With vs without attention alignment (dotted: comparison thresholds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if comparisons:
        ax = axes[2]
        for with_name, ac in comparisons.items():
            pts = ac["gap_points_by_step"]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, color=colors[with_name], label=with_name)
        ax.axhline(0, color="k", lw=1)
        ax.axvline(s["align_steps"], color="grey", ls=":", lw=1)
        ax.set(xlabel="training step", ylabel="with - without alignment (points)",
               title=f"Gain from alignment at equal steps ({s['eval_subset']} test images)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- --estimate


def estimate(args, data_dir: Path, teacher: torch.nn.Module, tsha: str, test: TestSet, teacher_eval_s: float,
             t_setup: float) -> dict:
    """Project the full benchmark's wall time from a few real steps of each kind of run (vit2cbsa.train.run with
    ``log_every=1``; per-step times from metrics.jsonl, the first step -- data-loader start -- excluded)."""
    specs = run_specs(args)
    probe_align, probe_ft, probe_eval = 4, 5, 256
    probes: Dict[tuple, dict] = {}
    for name in args.runs:
        sp = specs[name]
        key = (sp["variant"], sp["layers"], sp["lora_rank"])
        if key in probes:
            continue
        out_dir = args.work_dir / "estimate" / name
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = make_config(args, dict(sp, align_steps=probe_align, finetune_steps=probe_ft), out_dir, data_dir,
                          max_eval_samples=probe_eval, log_every=1, eval_every=0, checkpoint_every=10 ** 6)
        log(f"estimate: probing {name} ({probe_align} align + {probe_ft} fine-tune steps)")
        t0 = time.time()
        run(cfg)
        wall = time.time() - t0
        recs = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        per_step, eval_img = {}, []
        for st in ("align", "finetune"):
            logs = [r for r in recs if r["stage"] == st and "loss" in r]
            per_step[st] = (logs[-1]["elapsed_s"] - logs[0]["elapsed_s"]) / (len(logs) - 1)
            ev = next(r for r in recs if r["stage"] == st and "eval_accuracy" in r)
            eval_img.append((ev["elapsed_s"] - logs[-1]["elapsed_s"]) / probe_eval)
        t_img = sum(eval_img) / len(eval_img)
        # everything else in a run: start-up, first steps, final evaluation of both models, checkpoints, saving
        overhead = wall - (probe_align - 1) * per_step["align"] - (probe_ft - 1) * per_step["finetune"] \
            - 2 * probe_eval * t_img
        probes[key] = dict(align_s_per_step=per_step["align"], finetune_s_per_step=per_step["finetune"],
                           eval_s_per_image=t_img, overhead_s=overhead, probe_wall_s=wall)
        shutil.rmtree(out_dir, ignore_errors=True)
    teacher_img = teacher_eval_s / len(test.y)
    n_final = len(test.y)
    plan, total, seen = {}, t_setup + teacher_eval_s, set()
    for name in args.runs:
        sp = specs[name]
        pr = probes[(sp["variant"], sp["layers"], sp["lora_rank"])]
        a, f, e = sp["align_steps"], sp["finetune_steps"], args.eval_every
        n_sub = 1 + 2 + sum(n // e + (1 if n % e else 0) for n in (a, f) if n)  # start, stage evals, final 2
        mine = 1 + (1 if a else 0) + (0 if (sp["variant"], sp["layers"]) in seen else 1)
        seen.add((sp["variant"], sp["layers"]))
        t = dict(align=a * pr["align_s_per_step"], finetune=f * pr["finetune_s_per_step"],
                 evals_during_run=n_sub * args.eval_subset * pr["eval_s_per_image"],
                 overhead=pr["overhead_s"], test_set_measurements=mine * n_final * pr["eval_s_per_image"])
        t["total"] = sum(t.values())
        plan[name] = {k: round(v, 1) for k, v in t.items()}
        total += t["total"]
    est = dict(threads=args.threads, probes={f"{k[0]}|{k[1] or 'all'}|lora{k[2]}": {kk: round(vv, 5) for kk, vv in v.items()}
                                             for k, v in probes.items()},
               teacher_eval_s_per_image=round(teacher_img, 5), setup_s=round(t_setup, 1), runs=plan,
               projected_total_s=round(total, 1), projected_total_min=round(total / 60, 1),
               note="per-step times are from a few steps on this machine as loaded now; other jobs on the cores "
                    "inflate them")
    (args.work_dir / "estimate.json").write_text(json.dumps(est, indent=2))
    print(json.dumps(est, indent=2))
    log(f"estimate: the full benchmark with these settings would take about {total / 60:.1f} min on "
        f"{args.threads} thread(s) (this machine, as loaded now) -> {args.work_dir / 'estimate.json'}")
    return est


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    DESIGN.update(broadcast=args.broadcast, extra_representatives=args.extra_representatives,
                  prefix_broadcast=args.prefix_broadcast)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data(args.data, args.cache.expanduser())
    tdir, tsha = snapshot_teacher(args.work_dir)
    teacher, tcfg = zoo.load_cifar10_teacher()
    log(f"teacher {tdir} (sha256 {tsha[:12]}, epoch {tcfg.get('epoch')}, config test accuracy "
        f"{tcfg.get('test_accuracy')}); data {data_dir}; {args.threads} thread(s)")
    test = TestSet(data_dir, tcfg, args.final_eval, args.seed, args.eval_subset)
    if test.n_total != 10000 and not args.smoke:
        log(f"warning: the test split has {test.n_total} images, not 10,000")
    t_setup = time.time() - t_start
    t_meas = test.measure(teacher)
    log(f"teacher re-measured: {t_meas['accuracy']:.4f} on {t_meas['images']} images")
    if args.estimate:
        return estimate(args, data_dir, teacher, tsha, test, t_meas["seconds"], t_setup)
    settings = dict(smoke=args.smoke, align_steps=args.align_steps, finetune_steps=args.finetune_steps,
                    batch_size=args.batch_size, representatives=str(args.representatives),
                    hybrid_layers=args.hybrid_layers, lora_rank=args.lora_rank, lora_lr=args.lora_lr, **DESIGN,
                    distill_weight=args.distill_weight, temperature=FinetuneConfig.temperature, lr=args.lr,
                    align_lr=args.align_lr, seed=args.seed, eval_every=args.eval_every, eval_subset=args.eval_subset,
                    threads=args.threads, num_workers=args.num_workers, data=str(data_dir),
                    work_dir=str(args.work_dir), torch=torch.__version__, cpu_count=os.cpu_count())
    # read and checked before any training, merged after it
    old_runs = reused_runs(args.reuse, settings, tsha, args.runs) if args.reuse is not None else {}
    specs = run_specs(args)
    runs: Dict[str, dict] = {}
    init_cache: dict = {}
    for name in args.runs:
        runs[name] = do_run(name, specs[name], args, data_dir, teacher, tsha, test, init_cache)
    if args.reuse is not None:
        log(f"reusing runs {', '.join(old_runs) or '(none)'} from {args.reuse}")
        runs = {n: (runs.get(n) or old_runs[n]) for n in RUN_NAMES if n in runs or n in old_runs}
    teacher_sub = next(iter(runs.values()))["eval_subset_original_accuracy"] if runs else None
    align_cmp = alignment_comparison(runs, teacher_sub) if runs else {}
    result = dict(
        command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        settings=settings,
        teacher=dict(sha256=tsha, epoch=tcfg.get("epoch"), num_params=tcfg.get("num_params"),
                     accuracy_from_config=tcfg.get("test_accuracy"), accuracy_measured=t_meas["accuracy"],
                     accuracy_eval_subset=t_meas.get("accuracy_eval_subset"), test_images=t_meas["images"]),
        runs=runs, alignment_comparison=align_cmp,
        verdict=verdict(runs, t_meas["accuracy"], align_cmp),
        total_wall_s=round(time.time() - t_start, 1))
    (args.out / "recovery.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(result)
    (args.out / "recovery.md").write_text(md)
    if runs:
        plot(result, args.out / "recovery.png")
    print(md)
    log(f"wrote {args.out / 'recovery.json'}, {args.out / 'recovery.md'}, {args.out / 'recovery.png'} "
        f"in {result['total_wall_s'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
