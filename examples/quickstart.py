"""vit2cbsa quickstart: convert the embedded CIFAR-10 ViT teacher, align and fine-tune it briefly,
and measure what changed (offline, CPU, a few minutes).

The 1,000 embedded CIFAR-10 test images are split in two: 50 per class to train on, the other 50
per class to evaluate on (they are written once as a small image folder in a temporary directory,
so the run goes through the same ``vit2cbsa.train.run`` pipeline as
``accelerate launch examples/finetune.py``). For each variant (cbsa, contraction_free, linear):

  1. convert a copy of the teacher (16 pooled representatives = a 4x4 grid on its 8x8 patch grid, plus
     the class token as its own representative: the default design) and report its zero-shot accuracy
     and the cosine similarity of its features to the teacher's;
  2. attention alignment, for ``linear`` only: train the attention layers so that each reproduces the
     teacher's layer output (no labels) for ``--align-steps`` steps (the CBSA variants start too close to
     the teacher for it to pay: ``benchmarks/recovery.py``; they fine-tune for those steps instead);
  3. fine-tuning of the whole model by distilling the teacher's logits (no labels) for ``--finetune-steps``
     steps; accuracy after each stage.

Then FLOPs and side-by-side inference time of the teacher and the CBSA model at 32x32 (65 tokens)
and at 256x256 (4,097 tokens; the patch grid grows, the representatives don't).

    python examples/quickstart.py [--align-steps 40] [--finetune-steps 40] [--representatives 16]

Brief on purpose: 500 training images and a few dozen steps show the stages working, not the
final recovery (``benchmarks/recovery.py`` trains on all 50,000 CIFAR-10 images).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

import vit2cbsa
from vit2cbsa.measure import accuracy, count_flops, feature_cosine, time_side_by_side
from vit2cbsa.train import FinetuneConfig, run
from vit2cbsa.zoo import cifar10_samples, load_cifar10_teacher, normalize


def write_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, classes, fit: torch.Tensor) -> None:
    """``root/train/<class>/*.png`` (the ``fit`` images) and ``root/test/<class>/*.png`` (the others)."""
    for i, (img, y) in enumerate(zip(images, labels.tolist())):
        d = root / ("train" if fit[i] else "test") / classes[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")


def pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--align-steps", type=int, default=40)
    ap.add_argument("--finetune-steps", type=int, default=40)
    ap.add_argument("--representatives", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher, cfg = load_cifar10_teacher()
    images, labels, classes = cifar10_samples()
    x = normalize(images, cfg)
    fit = (torch.arange(len(x)) % 100) < 50  # 50 images per class to train on, 50 to evaluate on
    x_eval, y_eval = x[~fit], labels[~fit]
    t_feats = pre_logits(teacher, x_eval)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params, "
          f"recorded test accuracy {cfg.get('test_accuracy', float('nan')):.4f} (10k images), "
          f"{accuracy(teacher, x_eval, y_eval):.4f} on the 500 held-out embedded images\n")

    rows, students = [], {}
    with tempfile.TemporaryDirectory(prefix="vit2cbsa_quickstart_") as tmp:
        data = Path(tmp) / "cifar10_embedded"
        write_image_folder(data, images, labels, classes, fit)
        for variant in ("cbsa", "contraction_free", "linear"):
            student = vit2cbsa.convert(teacher, variant, args.representatives, inplace=False)
            cos0 = feature_cosine(pre_logits(student, x_eval), t_feats)
            out = Path(tmp) / variant
            align = args.align_steps if variant == "linear" else 0
            t0 = time.perf_counter()
            result = run(FinetuneConfig(
                model="cifar10-teacher", dataset=str(data), output_dir=str(out),
                conversion=vit2cbsa.ConversionConfig(variant, args.representatives), align_steps=align, align_lr=1e-2,
                finetune_steps=args.finetune_steps + args.align_steps - align, lr=1e-4, distill_weight=1.0,
                batch_size=50,
                num_workers=0, cpu=True, eval_every=0, checkpoint_every=10**9, log_every=10**9))
            seconds = time.perf_counter() - t0
            evals = {r["stage"]: r["eval_accuracy"] for r in map(json.loads, (out / "metrics.jsonl").open())
                     if "eval_accuracy" in r}
            student.load_state_dict(load_file(str(out / "final" / "model.safetensors")))  # the trained weights
            cos1 = feature_cosine(pre_logits(student.eval(), x_eval), t_feats)
            students[variant] = student
            rows.append((variant, evals.get("start"), cos0, evals.get("align"), result["converted_accuracy"], cos1,
                         seconds))

    print(f"\n{'variant':<18}{'zero-shot':>10}{'feat cos':>10}{'aligned':>9}{'fine-tuned':>12}{'feat cos':>10}"
          f"{'train s':>9}")
    for variant, a0, c0, a1, a2, c2, s in rows:
        aligned = "–" if a1 is None else f"{a1:.4f}"
        print(f"{variant:<18}{a0:>10.4f}{c0:>10.4f}{aligned:>9}{a2:>12.4f}{c2:>10.4f}{s:>9.1f}")
    print(f"(accuracy on the 500 held-out embedded images; {args.align_steps} alignment + {args.finetune_steps} "
          f"fine-tuning steps (linear) or {args.align_steps + args.finetune_steps} fine-tuning steps (cbsa, "
          f"contraction_free) of batch 50 on the other 500)")

    print(f"\nspeed, teacher vs cbsa ({args.representatives} representatives), median of 5, side by side:")
    cbsa = students["cbsa"]
    for side, batch in ((32, 8), (256, 2)):
        inp = torch.randn(batch, 3, side, side)
        f_t, f_c = count_flops(teacher, inp), count_flops(cbsa, inp)
        with torch.inference_mode():
            t = time_side_by_side({"teacher": lambda: teacher(inp), "cbsa": lambda: cbsa(inp)}, repeats=5)
        n = 1 + (side // 4) ** 2
        print(f"  {side}x{side} ({n} tokens, batch {batch}): GFLOPs {f_t / 1e9:.2f} -> {f_c / 1e9:.2f} "
              f"(ideal speed-up {f_t / f_c:.2f}x); time {t['teacher'] * 1e3:.1f} ms -> {t['cbsa'] * 1e3:.1f} ms "
              f"(measured speed-up {t['teacher'] / t['cbsa']:.2f}x)")


if __name__ == "__main__":
    main()
