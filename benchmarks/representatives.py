"""Zero-shot representative design on the CIFAR-10 teacher: extra representatives, broadcast, count.

For every combination of

* variant at conversion (``cbsa`` and ``contraction_free`` are the same network at conversion, because the
  contraction step ``gamma`` starts at 0, so only ``contraction_free`` is measured; ``linear`` has no
  representatives and is measured once as a reference),
* ``extra_representatives`` (``none``: only the pooled grid; ``prefix``: each prefix token's query is a
  representative too; ``global``: one more representative, the mean of the patch queries) and, with
  ``prefix``, ``prefix_broadcast`` (``own``: the class token reads back only its own representative;
  ``all``: every representative, like the patches),
* ``broadcast`` (``key``, ``query``, ``transpose``),
* the representative grid (``--grids``: 1x1, 2x2, 4x4 and 8x8 on the teacher's 8x8 patch grid for every design,
  ``--more-grids`` 3x3 and 6x6 for the designs of ``--more-designs``),

this converts the embedded teacher (no training) and measures, on all 10,000 CIFAR-10 test images, the top-1
accuracy and the cosine similarity of the pre-logits features to the original's, plus the FLOPs of one forward
pass (``vit2cbsa.measure.count_flops``) at 32x32 and of ViT-S/16 (random weights) at 224 and 1024.

    .venv/bin/python benchmarks/representatives.py                  # ~20 min on 2 threads
    .venv/bin/python benchmarks/representatives.py --limit 500 --grids 2x2,4x4 --no-vit-s  # quick look

Writes ``benchmarks/results/representatives.json``, ``representatives.md`` (the tables) and ``representatives.png``
(accuracy against FLOPs, one curve per design). ``--from-json FILE`` rewrites the table and plot from a result.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import vit2cbsa
from vit2cbsa import zoo
from vit2cbsa.measure import count_flops, feature_cosine
from vit2cbsa.specs import parse_design, parse_grid
from vit2cbsa.train.data import load_image_data, subset_indices, teacher_transforms

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("~/.cache/vit2cbsa/cifar10").expanduser()


def log(msg: str) -> None:
    print(f"[representatives {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_test_set(data_dir: Path, cfg: dict, limit, cache: Path):
    """The preprocessed test images (cached as a tensor file next to the data) and their labels."""
    cache_file = cache / f"cifar10_test_{limit or 'all'}.pt"
    if cache_file.is_file():
        blob = torch.load(cache_file, weights_only=True)
        return blob["x"], blob["y"]
    data = load_image_data(str(data_dir))
    idx = subset_indices(len(data.eval), limit, 0) or range(len(data.eval))
    tf = teacher_transforms(cfg).eval
    xs, ys = [], []
    for i in idx:
        img, y = data.eval[i]
        xs.append(tf(img.convert("RGB")))
        ys.append(int(y))
    x, y = torch.stack(xs), torch.tensor(ys)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, cache_file)
    return x, y


@torch.no_grad()
def features_logits(model, x, batch=500):
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True)
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


DESIGNS = ("none/key", "none/query", "none/transpose", "prefix-all/key", "prefix-all/query", "prefix-own/key",
           "prefix-own/query", "prefix-own/transpose", "global/key", "global/query")


def grids_of(text: str):
    out = []
    for g in filter(None, text.split(",")):
        g = parse_grid(g)
        out.append(g if isinstance(g, tuple) else (int(round(g ** 0.5)),) * 2)
    return out


def vit_s_flops(grid, opts, res):
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=res, num_classes=0).eval()
    if grid is not None:
        vit2cbsa.convert(model, "contraction_free", grid, **opts)
    return count_flops(model, torch.randn(1, 3, res, res))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 image folder (train/ + test/)")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all 10,000)")
    ap.add_argument("--grids", default="1x1,2x2,4x4,8x8", help="representative grids measured for every design")
    ap.add_argument("--designs", default=",".join(DESIGNS),
                    help="EXTRA[-PREFIX_BROADCAST]/BROADCAST, comma-separated")
    ap.add_argument("--more-grids", default="3x3,6x6")
    ap.add_argument("--more-designs", default="prefix-own/key,prefix-own/query")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--no-vit-s", action="store_true", help="skip the ViT-S/16 FLOP counts at 224 and 1024")
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite the .md and .png of this result")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        (args.from_json.parent / "representatives.md").write_text(markdown(result))
        plot(result, args.from_json.parent / "representatives.png")
        return
    torch.set_num_threads(args.threads)
    plan = [(g, d) for g in grids_of(args.grids) for d in args.designs.split(",")]
    plan += [(g, d) for g in grids_of(args.more_grids) for d in args.more_designs.split(",")]

    teacher, cfg = zoo.load_cifar10_teacher()
    x, y = load_test_set(args.data, cfg, args.limit, Path("~/.cache/vit2cbsa").expanduser())
    log(f"{len(y)} test images")
    t0 = time.time()
    ref_feats, ref_logits = features_logits(teacher, x)
    teacher_acc = (ref_logits.argmax(-1) == y).float().mean().item()
    log(f"teacher {teacher_acc:.4f} ({time.time() - t0:.1f}s)")
    x1 = x[:1]
    rows = [{"variant": "original", "accuracy": teacher_acc, "feature_cosine": 1.0,
             "flops_32": count_flops(teacher, x1)}]

    def measure(model, **row):
        t = time.time()
        feats, logits = features_logits(model, x)
        row.update(accuracy=(logits.argmax(-1) == y).float().mean().item(),
                   feature_cosine=feature_cosine(feats, ref_feats), flops_32=count_flops(model, x1),
                   seconds=round(time.time() - t, 1))
        rows.append(row)
        log(json.dumps(row))

    measure(vit2cbsa.convert(copy.deepcopy(teacher), "linear"), variant="linear")
    for grid, design in sorted(plan, key=lambda gd: (gd[0][0] * gd[0][1], gd[1])):
        opts = parse_design(design)
        model = vit2cbsa.convert(copy.deepcopy(teacher), "contraction_free", grid, **opts)
        extra = int(opts["extra_representatives"] != "none")  # the teacher has one prefix token
        measure(model, variant="contraction_free", design=design, grid=list(grid), m=grid[0] * grid[1] + extra, **opts)

    vit_s = []
    if not args.no_vit_s:
        for res in (224, 1024):
            vit_s.append({"variant": "original", "resolution": res, "flops": vit_s_flops(None, None, res)})
            for grid in grids_of(args.grids + "," + args.more_grids):
                for design in ("none/key", "prefix-own/key", "prefix-own/query"):
                    vit_s.append({"variant": "contraction_free", "resolution": res, "grid": list(grid), "design": design,
                                  "flops": vit_s_flops(grid, parse_design(design), res)})
            log(f"ViT-S FLOPs at {res} counted")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/representatives.py" + ("" if argv is None else " " + " ".join(argv)),
              "test_images": len(y), "teacher_accuracy": teacher_acc, "rows": rows, "vit_s_flops": vit_s}
    (args.out / "representatives.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "representatives.md").write_text(markdown(result))
    plot(result, args.out / "representatives.png")
    log(f"wrote {args.out / 'representatives.json'}")


def markdown(result: dict) -> str:
    """Zero-shot accuracy (feature cosine) per grid and design, and ViT-S/16 GFLOPs per grid."""
    rows = [r for r in result["rows"] if r["variant"] == "contraction_free"]
    designs = list(dict.fromkeys(r["design"] for r in rows))
    grids = sorted({tuple(r["grid"]) for r in rows}, key=lambda g: g[0] * g[1])
    cell = {(tuple(r["grid"]), r["design"]): r for r in rows}
    orig, lin = result["rows"][0], next((r for r in result["rows"] if r["variant"] == "linear"), None)
    out = [f"Zero-shot top-1 % (feature cosine) of the converted CIFAR-10 teacher on {result['test_images']:,} test "
           f"images; original {100 * orig['accuracy']:.2f}%" + (f", linear {100 * lin['accuracy']:.2f}% "
                                                                   f"({lin['feature_cosine']:.3f})" if lin else "") + ".",
           "", "| pooled grid | " + " | ".join(f"`{d}`" for d in designs) + " |",
           "|---|" + "---:|" * len(designs)]
    for g in grids:
        vals = [cell.get((g, d)) for d in designs]
        out.append(f"| {g[0]}x{g[1]} | " + " | ".join(
            "–" if v is None else f"{100 * v['accuracy']:.2f} ({v['feature_cosine']:.3f})" for v in vals) + " |")
    vit_s = result.get("vit_s_flops") or []
    if vit_s:
        out += ["", "ViT-S/16 GFLOPs of one image (`contraction_free`; `cbsa` adds the m x m contraction):", "",
                "| pooled grid | design | 224 | 1024 |", "|---|---|---:|---:|"]
        by = {}
        for r in vit_s:
            key = ("original", "") if r["variant"] == "original" else (f"{r['grid'][0]}x{r['grid'][1]}", r["design"])
            by.setdefault(key, {})[r["resolution"]] = r["flops"] / 1e9
        for (g, d), f in by.items():
            out.append(f"| {g} | {d and '`' + d + '`'} | {f.get(224, float('nan')):.2f} | {f.get(1024, float('nan')):.1f} |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["variant"] == "contraction_free"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"key": "-", "query": "--", "transpose": ":"}
    colours = {"none": "tab:grey", "prefix-all": "tab:green", "prefix-own": "tab:blue", "global": "tab:orange"}
    for design in sorted({r["design"] for r in rows}):
        pts = sorted((r["flops_32"] / 1e6, 100 * r["accuracy"], r["m"]) for r in rows if r["design"] == design)
        extra, broadcast = design.split("/")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(broadcast, "-"), marker="o",
                color=colours.get(extra), label=design, ms=3.5)
        if design == "prefix-own/query":
            for f, acc, m in pts:
                ax.annotate(f"m={m}", (f, acc), fontsize=7, textcoords="offset points", xytext=(3, -9))
    orig = result["rows"][0]
    ax.axhline(100 * orig["accuracy"], color="k", lw=0.8)
    ax.annotate(f"original {100 * orig['accuracy']:.2f}% ({orig['flops_32'] / 1e6:.1f} MFLOPs)",
                (ax.get_xlim()[0], 100 * orig["accuracy"]), fontsize=8, va="top")
    ax.set_xlabel("FLOPs of one 32x32 image (millions)")
    ax.set_ylabel(f"zero-shot top-1 (%), {result['test_images']:,} CIFAR-10 test images")
    ax.set_title("Converted CIFAR-10 teacher before any training (all 6 layers, contraction-free = CBSA at init)",
                 fontsize=9)
    ax.legend(fontsize=6.5, ncol=2, loc="lower right", title="extra representatives / broadcast", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
