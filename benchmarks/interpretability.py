"""Interpretability figures and curves for the CIFAR-10 teacher and its CBSA conversions (CPU).

Writes into ``benchmarks/results/interpretability/`` (``--out``):

* ``maps_<k>_<class>_<variant>.png``  attention maps of real CIFAR-10 test images: the original
  teacher's class-token attention side by side with the converted layer's class-token map,
  gather maps ``A`` of the representatives the class token uses most, a broadcast map ``B`` and
  the patch -> representative assignment (:func:`vit2cbsa.analysis.plot_explanation`);
* ``coding_rate.json`` / ``coding_rate.png``  compression term ``sum_k R(X U_k)`` (raw and with
  unit-norm tokens) of the tokens entering every layer, original vs converted, and of the
  converted layers' representatives (paper Figs. 5-6);
* ``robustness.json`` / ``robustness.png``  top-1 accuracy under relative Gaussian noise on the
  attention projections, original vs converted (paper Fig. 8);
* ``synthetic.json`` / ``synthetic.png``  the parameter-free linear variant of CBSA compressing a
  union of subspaces (paper Fig. 4);
* ``summary.json``  the command, settings, clean accuracies and alignment records.

Converted models: ``cbsa`` and ``contraction_free`` with 4x4 = 16 representatives per head (the
teacher's patch grid is 8x8, so 64 representatives would be one per patch) and ``linear``;
each is aligned to the teacher for ``--align-steps`` steps of layer-wise attention alignment
(:func:`vit2cbsa.train.align_attention`) on CIFAR-10 *training* images (the decoded cache of
``benchmarks/train_teacher.py``; without it, on the embedded test images with odd indices, and the
accuracies are then measured on the even ones only).

Run (from the repo root; about 15 minutes on 2 busy cores)::

    .venv/bin/python benchmarks/interpretability.py
    .venv/bin/python benchmarks/interpretability.py --quick --out /tmp/interp   # smoke run, ~3 min
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import vit2cbsa
from vit2cbsa import zoo
from vit2cbsa.attention import variant_uses_representatives
from vit2cbsa.analysis import (
    compress_synthetic,
    explain,
    layer_coding_rates,
    plot_explanation,
    plot_robustness,
    plot_synthetic,
    robustness_curve,
    union_of_subspaces,
)
from vit2cbsa.measure import accuracy
from vit2cbsa.train import AttentionAligner, align_attention

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {"cbsa": ("cbsa", 16), "contraction_free": ("contraction_free", 16), "linear": ("linear", 16)}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_teacher(teacher_dir):
    if teacher_dir is None:
        return zoo.load_cifar10_teacher()
    zoo_dir = zoo.TEACHER_DIR
    try:
        zoo.TEACHER_DIR = Path(teacher_dir)
        return zoo.load_cifar10_teacher()
    finally:
        zoo.TEACHER_DIR = zoo_dir


def alignment_images(config, n, fallback):
    cache = Path.home() / ".cache" / "vit2cbsa" / "cifar10_uint8.pt"
    if cache.is_file():
        data = torch.load(cache)
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(data["train_x"]), generator=gen)[:n]
        return zoo.normalize(data["train_x"][idx], config), f"CIFAR-10 train ({n} random images from {cache})"
    return fallback, "embedded test images with odd indices (no decoded training cache)"


@torch.no_grad()
def alignment_loss(student, teacher, images):
    aligner = AttentionAligner(student, teacher)
    try:
        total, per_layer = aligner(images)
    finally:
        aligner.remove()
    return total.item(), [x.item() for x in per_layer]


def build_students(teacher, align_x, eval_x, eval_y, steps, batch_size):
    students, records = {}, {}
    for name, (variant, reps) in VARIANTS.items():
        student = vit2cbsa.convert(teacher, variant, reps, inplace=False).eval()
        probe = align_x[:128]
        before_loss, _ = alignment_loss(student, teacher, probe)
        acc_before = accuracy(student, eval_x, eval_y)
        t0 = time.time()
        history = []
        if steps:
            batches = [align_x[i:i + batch_size] for i in range(0, len(align_x), batch_size)]
            def progress(step, loss):
                if (step + 1) % 100 == 0:
                    _log(f"  {name}: alignment step {step + 1}/{steps}, loss {loss:.4f}")

            history = align_attention(student, teacher, batches, steps=steps, lr=1e-2, trainable="attention",
                                      pretrained_lr=1e-4, callback=progress)
        student.eval()
        after_loss, per_layer = alignment_loss(student, teacher, probe)
        acc_after = accuracy(student, eval_x, eval_y)
        records[name] = {"variant": variant, "num_representatives": reps if variant_uses_representatives(variant) else None,
                         "align_steps": steps, "align_seconds": round(time.time() - t0, 1),
                         "alignment_loss_before": before_loss, "alignment_loss_after": after_loss,
                         "alignment_loss_per_layer_after": per_layer,
                         "accuracy_before_alignment": acc_before, "accuracy": acc_after,
                         "loss_history_every_10": history[::10]}
        _log(f"{name}: accuracy {acc_before:.3f} -> {acc_after:.3f} after {steps} alignment steps "
             f"(loss {before_loss:.4f} -> {after_loss:.4f})")
        students[name] = student
    return students, records


def pick_images(teacher, images_u8, labels, classes, config, count, wanted=("cat", "ship", "horse", "airplane",
                                                                             "truck", "frog", "bird", "dog")):
    x = zoo.normalize(images_u8, config)
    with torch.no_grad():
        pred = teacher(x).argmax(-1)
    picks = []
    for cls in wanted:
        c = classes.index(cls)
        ok = ((labels == c) & (pred == c)).nonzero().flatten()
        if len(ok):
            picks.append(int(ok[0]))
        if len(picks) == count:
            break
    return picks


def _strided(n, count):
    """``count`` indices spread evenly over ``range(n)`` (all of them if ``count >= n``)."""
    if count >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, count).round().long().unique()


def rep_token_correlation(rows):
    """Pearson correlation across layers between the tokens' and the representatives' rates (raw, normalised)."""
    out = {}
    for suffix in ("", "_normalized"):
        t = torch.tensor([r["tokens" + suffix] for r in rows], dtype=torch.float64)
        r = torch.tensor([r["representatives" + suffix] for r in rows], dtype=torch.float64)
        out["raw" if not suffix else "normalized"] = torch.corrcoef(torch.stack([t, r]))[0, 1].item()
    return out


def plot_coding_rates(curves, correlations, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    styles = {"original": ("k", "o"), "cbsa": ("C0", "s"), "contraction_free": ("C1", "^"), "linear": ("C2", "d")}
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for col, (suffix, label) in enumerate((("", "raw"), ("_normalized", "unit-norm"))):
        ax = axes[col]
        for name, rows in curves.items():
            color, marker = styles.get(name, ("C3", "o"))
            ax.plot([r["index"] for r in rows], [r["tokens" + suffix] for r in rows], color=color, marker=marker,
                    ms=4, label=name)
        ax.set_title(f"tokens entering each layer ({label})", fontsize=9)
        ax.set_ylabel("sum_k R(X U_k)  (nats)")
    ax = axes[2]
    twin = ax.twinx()
    for name, rows in curves.items():
        if rows[0]["representatives"] is None:
            continue
        color, marker = styles.get(name, ("C3", "o"))
        x = [r["index"] for r in rows]
        corr = correlations[name]
        ax.plot(x, [r["representatives"] for r in rows], color=color, marker=marker, ms=4,
                label=f"{name} raw (r={corr['raw']:+.2f} with tokens)")
        twin.plot(x, [r["representatives_normalized"] for r in rows], color=color, marker=marker, ms=4, ls="--",
                  label=f"{name} unit-norm, right axis (r={corr['normalized']:+.2f})")
    m = next(rows[0]["num_representatives"] for rows in curves.values() if rows[0]["representatives"] is not None)
    ax.set_title(f"representatives A X U_k of converted layers (m={m})", fontsize=9)
    ax.set_ylabel("sum_k R(A_k X U_k)  (nats)")
    twin.set_ylabel("unit-norm (dashed)")
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6, loc="lower center")
    for ax in axes:
        ax.set_xlabel("attention layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "interpretability")
    p.add_argument("--teacher-dir", type=Path, default=None, help="teacher folder (default: the embedded one)")
    p.add_argument("--align-steps", type=int, default=400)
    p.add_argument("--align-batch", type=int, default=32)
    p.add_argument("--align-images", type=int, default=4096)
    p.add_argument("--rate-images", type=int, default=256)
    p.add_argument("--robust-images", type=int, default=1000)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--figures", type=int, default=4, help="test images to draw")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on 2 shared cores, more threads oversubscribe and run slower)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.align_steps, args.align_images, args.rate_images, args.robust_images = 3, 256, 32, 100
        args.scales, args.seeds, args.figures = [0.0, 0.3, 1.0], [0], 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO))] + list(argv or sys.argv[1:]))
    t_start = time.time()

    teacher, config = load_teacher(args.teacher_dir)
    images_u8, labels, classes = zoo.cifar10_samples()
    x_all = zoo.normalize(images_u8, config)
    # the embedded samples are sorted by class: every subset below is strided, so all classes are in it
    align_x, align_source = alignment_images(config, args.align_images, x_all[1::2])
    keep = torch.arange(len(x_all)) if align_source.startswith("CIFAR-10 train") else torch.arange(0, len(x_all), 2)
    eval_x, eval_y, eval_u8 = x_all[keep], labels[keep], images_u8[keep]
    _log(f"teacher: {config.get('test_accuracy')} test accuracy recorded; alignment on {align_source}")
    teacher_acc = accuracy(teacher, eval_x, eval_y)
    _log(f"teacher accuracy on the {len(eval_x)} evaluation images: {teacher_acc:.3f}")

    students, align_records = build_students(teacher, align_x, eval_x, eval_y, args.align_steps, args.align_batch)

    # ---- attention maps on real test images
    picks = pick_images(teacher, eval_u8, eval_y, classes, config, args.figures)
    figures = []
    for k, j in enumerate(picks):
        i = int(keep[j])
        x = x_all[i:i + 1]
        pixels = images_u8[i].permute(1, 2, 0).numpy()
        ref, _ = explain(teacher, x, [2, 5])
        for name, layers in (("cbsa", [2, 5]), ("contraction_free", [5])):
            maps, logits = explain(students[name], x, layers)
            pred = classes[int(logits.argmax())]
            path = out / f"maps_{k}_{classes[int(labels[i])]}_{name}.png"
            plot_explanation(pixels, maps, path, reference=[r for r in ref if r.index in layers], num_reps=3,
                             title=f"CIFAR-10 test image {i} ({classes[int(labels[i])]}), teacher vs {name} "
                                   f"4x4 representatives (aligned); converted predicts {pred}")
            figures.append(path.name)
    _log(f"wrote {len(figures)} attention-map figures")

    # ---- coding rates per layer
    rx = x_all[_strided(len(x_all), args.rate_images)]
    curves = {"original": layer_coding_rates(teacher, rx, batch_size=64)}
    for name in ("cbsa", "contraction_free", "linear"):
        curves[name] = layer_coding_rates(students[name], rx, batch_size=64)
    correlations = {n: rep_token_correlation(rows) for n, rows in curves.items() if rows[0]["representatives"] is not None}
    rate_json = {"eps": 0.5, "basis": "value columns per head (orthonormalised)", "images": len(rx),
                 "representative_token_correlation_across_layers": correlations, "layers": curves}
    (out / "coding_rate.json").write_text(json.dumps(rate_json, indent=2))
    plot_coding_rates(curves, correlations, out / "coding_rate.png",
                      f"CIFAR-10 teacher vs conversions: coding rate of the tokens entering each attention layer "
                      f"(eps=0.5, {len(rx)} test images)")
    _log("coding rates: " + "; ".join(f"{n} " + ", ".join(f"{r['tokens']:.1f}" for r in rows)
                                      for n, rows in curves.items()))

    # ---- robustness to parameter perturbation
    sub = _strided(len(eval_x), args.robust_images)
    ex, ey = eval_x[sub], eval_y[sub]
    robust = {}
    for name, model in [("original", teacher)] + [(n, students[n]) for n in ("cbsa", "contraction_free", "linear")]:
        t0 = time.time()
        robust[name] = robustness_curve(model, ex, ey, scales=args.scales, seeds=args.seeds)
        _log(f"robustness {name}: " + ", ".join(f"{s:g}:{m:.3f}" for s, m in zip(args.scales, robust[name]["mean"]))
             + f" ({time.time() - t0:.0f}s)")
    rob_json = {"images": len(ex), "noise": "std = scale * rms(W) on q/k/v/o projection weights of every attention "
                "layer (timm qkv: per q/k/v block); same noise for every model", "models": robust}
    (out / "robustness.json").write_text(json.dumps(rob_json, indent=2))
    plot_robustness({n: r for n, r in robust.items()}, out / "robustness.png",
                    title=f"CIFAR-10 teacher vs conversions ({len(ex)} test images, {len(args.seeds)} noise seeds)")

    # ---- synthetic compression
    syn = {}
    xs, ls, bs = union_of_subspaces(num_classes=3, dim=3, subspace_dim=1, per_class=150, noise=0.5, seed=0)
    rec = compress_synthetic(xs, ls, bs, steps=20, eps=0.5, step=0.5, snapshots=(0, 5, 20))
    plot_synthetic(rec, ls, out / "synthetic.png", bases=bs,
                   title="parameter-free linear CBSA (step 0.5, eps 0.5) on 3 lines in R^3: unit-norm tokens, "
                         "150 per class, noise 0.5; lines = the true subspaces")
    syn["3_lines_in_R3"] = {k: rec[k] for k in ("steps", "class_rate", "total_rate", "rate_reduction", "off_subspace_energy")}
    xs, ls, bs = union_of_subspaces(num_classes=4, dim=32, subspace_dim=4, per_class=200, noise=0.5, seed=0)
    rec = compress_synthetic(xs, ls, bs, steps=20, eps=0.5, step=0.5, snapshots=())
    syn["4_subspaces_of_dim_4_in_R32"] = {k: rec[k] for k in ("steps", "class_rate", "total_rate", "rate_reduction",
                                                               "off_subspace_energy")}
    (out / "synthetic.json").write_text(json.dumps({"eps": 0.5, "step": 0.5, "noise": 0.5, "runs": syn}, indent=2))
    _log("synthetic: " + "; ".join(f"{k}: sum_j R(X_j) {v['class_rate'][0]:.2f} -> {v['class_rate'][-1]:.2f}, "
                                   f"off-subspace {100 * v['off_subspace_energy'][0]:.1f}% -> "
                                   f"{100 * v['off_subspace_energy'][-1]:.2f}%" for k, v in syn.items()))

    summary = {
        "command": command, "seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
        "teacher": {"config_test_accuracy": config.get("test_accuracy"), "epoch": config.get("epoch"),
                    "accuracy_eval_images": teacher_acc, "eval_images": len(eval_x)},
        "alignment_data": align_source, "students": align_records, "figures": figures,
        "robustness_clean_and_noisy": {n: dict(zip([str(s) for s in r["scales"]], r["mean"])) for n, r in robust.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(f"done in {summary['seconds']:.0f}s -> {out}")
    return summary


if __name__ == "__main__":
    main()
