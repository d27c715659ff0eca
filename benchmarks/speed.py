"""Speed of converted vs original ViTs: throughput, FLOPs, peak memory and scaling in the token count.

For each model (timm, random weights: speed does not depend on training) and resolution, the
original (timm's fused SDPA attention) and each converted variant are built once and then timed
side by side in this process: alternately on the same input, after two untimed rounds, median of
``--repeats``. Reported per row: inference and training-step throughput (forward + backward + SGD
step), their ratios to the original (ratio of the medians; ``*_ratio_rounds``: lower quartile, median
and upper quartile of the per-round ratios, each from two calls made back to back, i.e. how much the
ratio moves with the machine's load), FLOPs (``torch.utils.flop_counter``, batch 1), the
FLOP ratio original/converted (the ideal speed-up), the measured/ideal efficiency, and peak
training memory (CUDA allocator peak on a GPU; on the CPU the peak of live tensors of one
training step, tracked by ``torch.distributed._tools.mem_tracker.MemTracker``).
Exponents of time vs tokens are fitted (log-log least squares) on the square resolutions for whole
models, and on one attention layer alone at N = 257..4097 (all sizes timed close together, so the
fit is robust to the load drifting during a long run).
With ``--compile``: graph breaks inside converted attention (``torch._dynamo.explain``), the
compile speed-up of the converted model, and the converted/original ratio with both compiled, for
inference and (unless ``--no-train``) training steps.

    python benchmarks/speed.py                       # the CPU table of benchmarks/README.md (~30 min)
    python benchmarks/speed.py --quick               # smoke run, < 1 min (CI runs it)
    python benchmarks/speed.py --resolutions 224 --variants cbsa --keep-intermediates   # recompute=False
    python benchmarks/speed.py --device cuda --dtype bfloat16 --batch 32 --compile

Writes ``benchmarks/results/speed_<device>.json`` and ``.png`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import vit2cbsa
from vit2cbsa.measure import count_flops, paired_ratio_quartiles, time_repeats, time_side_by_side
from vit2cbsa.specs import parse_design

RESULTS = Path(__file__).parent / "results"


def parse_res(text: str):
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def convert_variant(orig, variant: str, reps: int):
    """A converted copy of ``orig``; ``variant`` may name a representative design: ``cbsa@none/key``."""
    name, _, design = variant.partition("@")
    return vit2cbsa.convert(orig, name, reps, inplace=False, **(parse_design(design) if design else {}))


def build(name: str, res, variants, reps: int, device, dtype, recompute: bool = True):
    import timm

    torch.manual_seed(0)
    orig = timm.create_model(name, pretrained=False, img_size=res).to(device=device, dtype=dtype)
    models = {"original": orig}
    for v in variants:
        models[v] = convert_variant(orig, v, reps)
        for mixer in models[v].modules():
            if hasattr(mixer, "recompute"):  # CBSA-type mixers: keep A, B for backward instead
                mixer.recompute = recompute
    return models


def peak_train_memory(model, x, y, device) -> float:
    """Peak bytes of one training step (MiB)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")[x.device]
    return sum(v for k, v in peak.items() if k != "Total" and "PARAM" not in str(k)) / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, x, y, device, forward=None):
    """One SGD training step of ``model`` as a closure, called through ``forward`` (e.g. its compiled form)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    forward = model if forward is None else forward

    def fn():
        torch.nn.functional.cross_entropy(forward(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
    return fn


def bench_row(name, res, args, device, dtype):
    models = build(name, res, args.variants, args.representatives, device, dtype, not args.keep_intermediates)
    h, w = res
    tokens = 1 + (h // 16) * (w // 16)
    x1 = torch.randn(1, 3, h, w, device=device, dtype=dtype)
    flops = {k: count_flops(m, x1) for k, m in models.items()}
    xb = torch.randn(args.batch, 3, h, w, device=device, dtype=dtype)
    yb = torch.randint(0, 1000, (args.batch,), device=device)

    def infer(m):
        def fn():
            with torch.inference_mode():
                m(xb)
            sync(device)
        return fn

    for m in models.values():
        m.eval()
    s_inf = time_repeats({k: infer(m) for k, m in models.items()}, repeats=args.repeats, warmup=2)

    s_train = {}
    mem = {}
    if not args.no_train and max(h, w) <= args.max_train_res:
        for m in models.values():
            m.train()
        s_train = time_repeats({k: train_step(m, xb, yb, device) for k, m in models.items()},
                               repeats=args.repeats, warmup=2)
        if not args.no_memory:
            mem = {k: peak_train_memory(m, xb, yb, device) for k, m in models.items()}

    t_inf = {k: statistics.median(ts) for k, ts in s_inf.items()}
    t_train = {k: statistics.median(ts) for k, ts in s_train.items()}

    def rounds(samples, k):  # lower quartile, median, upper quartile of the per-round ratios original/converted
        return [round(r, 4) for r in paired_ratio_quartiles(samples["original"], samples[k])]

    rows = []
    for k in models:
        row = {
            "model": name, "resolution": f"{h}x{w}", "tokens": tokens, "variant": k, "batch": args.batch,
            "gflops": flops[k] / 1e9, "flop_ratio": flops["original"] / flops[k],
            "infer_s": t_inf[k], "infer_img_s": args.batch / t_inf[k],
            "infer_ratio": t_inf["original"] / t_inf[k], "infer_ratio_rounds": rounds(s_inf, k),
        }
        row["infer_efficiency"] = row["infer_ratio"] / row["flop_ratio"]
        if t_train:
            row.update(train_s=t_train[k], train_img_s=args.batch / t_train[k],
                       train_ratio=t_train["original"] / t_train[k], train_ratio_rounds=rounds(s_train, k))
        if mem:
            row.update(peak_train_mem_mib=mem[k], mem_ratio=mem[k] / mem["original"])
        rows.append(row)
        print("  " + "  ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                               for key, val in row.items() if key not in ("model",)), flush=True)
    return rows


def fit_exponents(rows):
    out = {}
    for model in sorted({r["model"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows}):
            pts = [(r["tokens"], r["infer_s"]) for r in rows if r["model"] == model and r["variant"] == variant
                   and r["resolution"].split("x")[0] == r["resolution"].split("x")[1]]
            if len(pts) >= 2:
                xs, ys = [math.log(p[0]) for p in pts], [math.log(p[1]) for p in pts]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
                # the exponent between the two largest sizes (where attention dominates)
                tail = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
                out[f"{model}/{variant}"] = {"fit": slope, "last_two": tail}
    return out


def attention_scaling(name, args, device, dtype):
    """Time of one attention layer alone vs N (grids 16..64), original and each variant, side by side.

    A single layer runs in milliseconds, so all sizes are measured close together in time and the
    fitted exponent is not bent by the machine's load drifting over a long benchmark.
    """
    import timm

    orig = timm.create_model(name, pretrained=False, dynamic_img_size=True, depth=1).to(device=device, dtype=dtype)
    layers = {"original": orig.blocks[0].attn.eval()}
    for v in args.variants:
        conv = convert_variant(orig, v, args.representatives)
        layers[v] = (conv.blocks[0].attn.eval(), vit2cbsa.layout_of(conv))
    sides = [8, 12, 16] if args.quick else [16, 24, 32, 48, 64]
    times = {k: [] for k in layers}
    for side in sides:
        x = torch.randn(args.batch, 1 + side * side, orig.embed_dim, device=device, dtype=dtype)
        fns = {}
        for k, entry in layers.items():
            if k == "original":
                fns[k] = (lambda m: lambda: (m(x), sync(device)))(entry)
            else:
                m, layout = entry
                fns[k] = (lambda m, layout, s=side: lambda: (layout.use_grid((s, s)), m(x), sync(device)))(m, layout)
        with torch.inference_mode():
            t = time_side_by_side(fns, repeats=max(5, args.repeats))
        for k in layers:
            times[k].append(t[k])
    ns = [1 + s * s for s in sides]
    out = {"model": name, "tokens": ns, "seconds": times, "exponent": {}}
    for k, ts in times.items():
        xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out["exponent"][k] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    print("attention layer alone, time exponent in N:", {k: round(v, 3) for k, v in out["exponent"].items()}, flush=True)
    return out


def compile_check(name, args, device, dtype):
    """No graph breaks inside converted attention; torch.compile speed-up of the CBSA model, and the
    converted/original throughput ratio when both are compiled (all four timed side by side)."""
    models = build(name, parse_res(args.compile_res), ["cbsa"], args.representatives, device, dtype)
    orig, model = models["original"].eval(), models["cbsa"].eval()
    h, w = parse_res(args.compile_res)
    x = torch.randn(args.batch, 3, h, w, device=device, dtype=dtype)
    attn = next(m for m in model.modules() if isinstance(m, vit2cbsa.adapters.ConvertedAttention))
    with torch.no_grad():
        model(x)  # records the grid
        tokens = model.patch_embed(x).shape[1] + model.num_prefix_tokens
        explanation = torch._dynamo.explain(attn)(torch.randn(args.batch, tokens, attn.spec.dim, device=device, dtype=dtype))
    compiled, orig_compiled = torch.compile(model), torch.compile(orig)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        orig_compiled(x)

    def run(m):
        def fn():
            with torch.inference_mode():
                m(x)
            sync(device)
        return fn

    t = time_side_by_side({"eager": run(model), "compiled": run(compiled), "original_eager": run(orig),
                           "original_compiled": run(orig_compiled)}, repeats=args.repeats)
    result = {"model": name, "resolution": args.compile_res, "batch": args.batch,
              "attention_graph_breaks": explanation.graph_break_count,
              "compile_s": compile_s, "eager_s": t["eager"], "compiled_s": t["compiled"],
              "compile_speedup": t["eager"] / t["compiled"],
              "original_eager_s": t["original_eager"], "original_compiled_s": t["original_compiled"],
              "infer_ratio_eager": t["original_eager"] / t["eager"],
              "infer_ratio_both_compiled": t["original_compiled"] / t["compiled"]}
    if not args.no_train:  # training steps (the hand-written backward traced by torch.compile)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        model.train()
        orig.train()
        steps = {"eager": train_step(model, x, y, device), "compiled": train_step(model, x, y, device, compiled),
                 "original_eager": train_step(orig, x, y, device),
                 "original_compiled": train_step(orig, x, y, device, orig_compiled)}
        t0 = time.perf_counter()
        steps["compiled"]()
        result["train_compile_s"] = time.perf_counter() - t0
        steps["original_compiled"]()
        tt = time_side_by_side(steps, repeats=args.repeats)
        result.update(train_compile_speedup=tt["eager"] / tt["compiled"],
                      train_ratio_eager=tt["original_eager"] / tt["eager"],
                      train_ratio_both_compiled=tt["original_compiled"] / tt["compiled"])
    return result


def plot(rows, exps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in sorted({r["model"] for r in rows}):
        for variant in [v for v in dict.fromkeys(r["variant"] for r in rows)]:
            pts = sorted((r["tokens"], r) for r in rows if r["model"] == model and r["variant"] == variant
                         and r["resolution"].split("x")[0] == r["resolution"].split("x")[1])
            ns = [p[0] for p in pts]
            short = model.replace("vit_", "").replace("_patch16_224", "")
            e = exps.get(f"{model}/{variant}", {}).get("fit", float("nan"))
            axes[1].loglog(ns, [p[1]["infer_s"] for p in pts], "o-", label=f"{short} {variant} (N^{e:.2f})")
            if variant != "original":
                axes[0].semilogx(ns, [p[1]["infer_ratio"] for p in pts], "o-", label=f"{short} {variant} inference")
                if all("train_ratio" in p[1] for p in pts):
                    axes[0].semilogx(ns, [p[1]["train_ratio"] for p in pts], "s--", label=f"{short} {variant} training")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(xlabel="tokens N", ylabel="throughput ratio converted / original", title="speed-up (side by side)")
    axes[1].set(xlabel="tokens N", ylabel="seconds per inference batch", title="time vs tokens (log-log, fitted exponent)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--resolutions", nargs="+", default=["224", "384", "512", "768", "1024", "512x1024"])
    ap.add_argument("--variants", nargs="+", default=["cbsa", "contraction_free", "linear"],
                    help="variants, optionally with a representative design: cbsa@none/key (see vit2cbsa.specs)")
    ap.add_argument("--representatives", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-train-res", type=int, default=1024, help="skip training timing above this side")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-scaling", action="store_true", help="skip the single-layer time-vs-N fit")
    ap.add_argument("--only-scaling", action="store_true", help="run only the single-layer time-vs-N fit")
    ap.add_argument("--keep-intermediates", action="store_true",
                    help="CBSA training keeps A, B and the m x d steps for backward (recompute=False) instead "
                         "of recomputing them: more memory (1.28x at 224, batch 8), no faster at 224 in our runs")
    ap.add_argument("--compile", action="store_true", help="also check torch.compile (graph breaks, speed-up)")
    ap.add_argument("--compile-res", default="512")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.resolutions, args.repeats = ["vit_small_patch16_224"], ["224", "160x224"], 1
        args.threads = 1  # a smoke run must not fight other jobs for cores (OpenMP threads spin)
        args.compile = False
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tag = "quick" if args.quick else (f"{device.type}_{args.dtype}" if device.type != "cpu" else "cpu")
    out = args.out or RESULTS / f"speed_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in ([] if args.only_scaling else args.models):
        for res_text in args.resolutions:
            print(f"{name} @ {res_text}", flush=True)
            rows.extend(bench_row(name, parse_res(res_text), args, device, dtype))
    exps = fit_exponents(rows)
    scaling = [] if args.no_scaling else [attention_scaling(name, args, device, dtype) for name in args.models]
    record = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "dtype": args.dtype, "torch": torch.__version__, "python": sys.version.split()[0],
        "representatives": args.representatives, "batch": args.batch, "repeats": args.repeats,
        "recompute": not args.keep_intermediates,
        "rows": rows, "time_exponents": exps, "attention_scaling": scaling,
    }
    if args.compile:
        record["compile"] = [compile_check(name, args, device, dtype) for name in args.models[:1]]
        print(record["compile"], flush=True)
    out.write_text(json.dumps(record, indent=2))
    if rows:
        plot(rows, exps, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if rows else ""))
    print(json.dumps(exps, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
