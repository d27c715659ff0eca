"""vit2cbsa quickstart: convert the embedded CIFAR-10 ViT teacher and measure what changed (offline, CPU).

For each variant (cbsa, contraction_free, linear) this script
  1. converts a copy of the teacher (16 representatives = a 4x4 grid on its 8x8 patch grid),
  2. reports its zero-shot accuracy and feature cosine similarity to the teacher,
  3. aligns its attention layers to the teacher's (layer-wise distillation, no labels) for a
     few dozen steps on 500 embedded images, and reports accuracy again on 500 others,
and then compares FLOPs and side-by-side inference time of the teacher and the CBSA model at
32x32 (65 tokens) and at 256x256 (4,097 tokens; the patch grid grows, the representatives don't).

    python examples/quickstart.py [--align-steps 40] [--representatives 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import vit2cbsa
from vit2cbsa.measure import accuracy, count_flops, feature_cosine, time_side_by_side
from vit2cbsa.train import align_attention
from vit2cbsa.zoo import cifar10_samples, load_cifar10_teacher, normalize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--align-steps", type=int, default=40)
    ap.add_argument("--representatives", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher, cfg = load_cifar10_teacher()
    images, labels, _ = cifar10_samples()
    x = normalize(images, cfg)
    # 50 images per class to align on, the other 50 per class to evaluate on
    fit = (torch.arange(len(x)) % 100) < 50
    x_fit, x_eval, y_eval = x[fit], x[~fit], labels[~fit]
    batches = list(x_fit.split(50))

    with torch.no_grad():
        t_feats = teacher.forward_head(teacher.forward_features(x_eval), pre_logits=True)
    base_acc = accuracy(teacher, x_eval, y_eval)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params, "
          f"recorded test accuracy {cfg.get('test_accuracy', float('nan')):.4f} (10k images), "
          f"{base_acc:.4f} on the 500 held-out embedded images\n")
    print(f"{'variant':<18}{'zero-shot acc':>14}{'feat cos':>10}{'aligned acc':>13}{'feat cos':>10}{'align s':>9}")
    students = {}
    for variant in ("cbsa", "contraction_free", "linear"):
        student = vit2cbsa.convert(teacher, variant, args.representatives, inplace=False)
        with torch.no_grad():
            cos0 = feature_cosine(student.forward_head(student.forward_features(x_eval), pre_logits=True), t_feats)
        acc0 = accuracy(student, x_eval, y_eval)
        t0 = time.perf_counter()
        align_attention(student, teacher, batches, steps=args.align_steps, lr=1e-2, pretrained_lr=1e-4)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            cos1 = feature_cosine(student.forward_head(student.forward_features(x_eval), pre_logits=True), t_feats)
        acc1 = accuracy(student, x_eval, y_eval)
        students[variant] = student.eval()
        print(f"{variant:<18}{acc0:>14.4f}{cos0:>10.4f}{acc1:>13.4f}{cos1:>10.4f}{dt:>9.1f}")

    print(f"\nspeed, teacher vs cbsa ({args.representatives} representatives), batch 8, median of 5, side by side:")
    cbsa = students["cbsa"]
    for side in (32, 256):
        inp = torch.randn(8, 3, side, side)
        f_t, f_c = count_flops(teacher, inp), count_flops(cbsa, inp)
        with torch.inference_mode():
            t = time_side_by_side({"teacher": lambda: teacher(inp), "cbsa": lambda: cbsa(inp)}, repeats=5)
        n = 1 + (side // 4) ** 2
        print(f"  {side}x{side} ({n} tokens): GFLOPs {f_t / 1e9:.2f} -> {f_c / 1e9:.2f} "
              f"(ideal speed-up {f_t / f_c:.2f}x); time {t['teacher'] * 1e3:.1f} ms -> {t['cbsa'] * 1e3:.1f} ms "
              f"(measured speed-up {t['teacher'] / t['cbsa']:.2f}x)")


if __name__ == "__main__":
    main()
