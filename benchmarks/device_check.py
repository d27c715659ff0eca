"""The GPU check: correctness of every variant on the device against float64 on the CPU, then speed.

    bash benchmarks/device_check.sh                       # a fresh GPU machine: set up, then this (< 8 min)
    python benchmarks/device_check.py --device cuda       # the same, set up already
    python benchmarks/device_check.py --device cpu --quick --compile-backend aot_eager --out /tmp/dc   # the tests

1. **Correctness** (first; the run fails, exit code 1, if any check fails, after writing its results):
   every mixer (``cbsa`` with key / query / transpose broadcast, ``cbsa`` keeping its intermediates, ``contraction_free``,
   ``linear``) on the device in float32 and in ``--dtype`` (bf16), forward and gradients (q, k, v and every added
   parameter), against the same mixer in float64 on the CPU; half precision is held to the tolerance of
   ``tests/test_mixed_precision.py`` (``max(R x floor, A x eps)``, the floor being the same inputs rounded to the dtype
   and computed in float32 on the device). Whole tiny converted ViTs (square and non-square inputs): logits and
   gradients in float32 on the device against float64 on the CPU; ``torch.compile`` against eager on the device;
   the SDPA alternative (below) against the library's mixer.
2. **Speed**: ViT-S/16 and ViT-B/16 (timm, random weights), the original (timm's fused SDPA attention) and each
   variant converted with 64 representatives, in ``--dtype`` (bf16): batch 64 at 224, batch 1 and 4 at 512 and
   1024; inference (``torch.inference_mode``) and a training step (forward, backward, SGD step), eager and
   ``torch.compile``; peak memory of a training step (CUDA allocator peak above the model). All variants of one
   configuration are timed alternately after two warm-up calls, median of ``--repeats``.
   Besides the library's explicit-matmul mixers, two benchmark-only alternatives are timed, so the choice can be
   made from one run:

   * ``+sdpa`` -- :class:`SDPAMixer`: the same CBSA with its three softmax-weighted sums done by
     ``torch.nn.functional.scaled_dot_product_attention`` (which takes queries and keys of different lengths):
     representatives ``P`` from :func:`vit2cbsa.pooling.representatives`, extraction ``V_r = sdpa(t0 P, K, V)`` and
     ``K_r = sdpa(t0 P, K, K)``, contraction ``sdpa(t0 P, K_r, V_r)``, broadcast ``sdpa(Q, t1 K_b, C)``; gradients
     by autograd through the fused kernels (key / query broadcast; the transpose broadcast is not an SDPA);
   * ``+fp32`` -- :class:`Float32Mixer`: the mixer computed in float32 on bf16 inputs (the change that
     ``tests/test_mixed_precision.py`` asks for), to see what it costs. It saves float32 q, k, v for backward where
     the proposed change saves them in bf16, so its peak memory is an upper bound.

   Everything has a time budget (``--budget-s``, default 420 s): the correctness checks and the eager timings
   first, then ``torch.compile`` in order of importance (ViT-B at 224 and 1024 first); what does not fit is listed
   as skipped in the results.

Writes ``benchmarks/results/device_check/device_check_<device>.json`` and ``.md`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import speed  # speed.py, next to this file

import vit2cbsa
from vit2cbsa.adapters import ConvertedAttention
from vit2cbsa.attention import CBSAMixer, build_mixer
from vit2cbsa.layout import TokenLayout
from vit2cbsa.pooling import representatives
from vit2cbsa.measure import time_repeats

RESULTS = Path(__file__).parent / "results" / "device_check"

#: the mixers checked: name -> (variant, broadcast, recompute)
MIXERS = {
    "cbsa/query": ("cbsa", "query", True),
    "cbsa/key": ("cbsa", "key", True),
    "cbsa/transpose": ("cbsa", "transpose", True),
    "cbsa/query/keep": ("cbsa", "query", False),
    "contraction_free/query": ("contraction_free", "query", True),
    "linear": ("linear", "query", True),
}
#: the models timed: original, the library's variants, and the benchmark-only alternatives
TIMED = ["original", "cbsa", "contraction_free", "linear", "cbsa+sdpa", "contraction_free+sdpa", "cbsa+fp32"]
#: (R, A): relative error at most max(R x floor, A x eps) in half precision (tests/test_mixed_precision.py)
HALF_TOLERANCE = {"out": (3.0, 4.0), "qkv": (6.0, 4.0), "param": (8.0, 12.0)}
#: relative error allowed for float32 / float64 on the device against float64 on the CPU
FULL_TOLERANCE = {torch.float32: {"out": 1e-4, "qkv": 1e-3, "param": 1e-3},
                  torch.float64: {"out": 1e-10, "qkv": 1e-9, "param": 1e-9}}


# --------------------------------------------------------------------------- benchmark-only mixers


def _per_head(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, -1, 1, 1)


class SDPAMixer(nn.Module):
    """CBSA (key or query broadcast) with its softmax-weighted sums done by ``scaled_dot_product_attention``.

    Shares the parameters of the library's :class:`~vit2cbsa.attention.CBSAMixer` ``inner`` (so it can replace it in
    a converted model) and computes the same function (module docstring of :mod:`vit2cbsa.attention.cbsa`): the
    temperatures are folded into the queries / keys (``scale=1``), ``K_r`` and ``V_r`` are two calls (a fused kernel
    wants the value width equal to the key width), and the prefix tokens that read only their own representative
    take ``C`` directly. Benchmark-only: gradients by autograd through the fused kernels."""

    def __init__(self, inner: CBSAMixer) -> None:
        super().__init__()
        if inner.broadcast == "transpose":
            raise ValueError("the transpose broadcast (A^T / A^T 1) is not a scaled_dot_product_attention")
        self.inner = inner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        m = self.inner
        geo = m.geometry(q.shape[-2], layout)
        t0, t1, gamma, kappa = m.step_sizes(q.dtype)
        p = representatives(q, geo.prefix, geo.h, geo.w, geo.rep_grid, geo.extra)
        pe = p * _per_head(t0)
        vr = F.scaled_dot_product_attention(pe, k, v, scale=1.0)
        kr = F.scaled_dot_product_attention(pe, k, k, scale=1.0) if geo.broadcast == "key" or gamma is not None \
            else None
        cc = vr if gamma is None else vr + _per_head(gamma) * F.scaled_dot_product_attention(pe, kr, vr, scale=1.0)
        c = cc * _per_head(kappa)
        ks = (kr if geo.broadcast == "key" else p) * _per_head(t1)
        own = geo.own_rows
        out = F.scaled_dot_product_attention(q[:, :, own:], ks, c, scale=1.0)
        return torch.cat([c[:, :, :own], out], dim=2) if own else out


class Float32Mixer(nn.Module):
    """``inner`` computed in float32 on half-precision inputs, its output cast back (benchmark-only)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, layout):
        with torch.autocast(q.device.type, enabled=False):
            return self.inner(q.float(), k.float(), v.float(), layout).to(q.dtype)


def swap_mixers(model: nn.Module, wrapper) -> int:
    """Replace the mixer of every converted layer by ``wrapper(mixer)`` (where it applies); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, ConvertedAttention) and (wrapper is not SDPAMixer or isinstance(m.mixer, CBSAMixer)):
            m.mixer = wrapper(m.mixer)
            n += 1
    return n


def converted(orig: nn.Module, name: str, reps: int) -> nn.Module:
    """``name``: a variant (``cbsa``), or a variant with a benchmark-only alternative (``cbsa+sdpa``, ``cbsa+fp32``)."""
    variant, _, alt = name.partition("+")
    model = vit2cbsa.convert(orig, variant, reps, inplace=False)
    if alt:
        swap_mixers(model, {"sdpa": SDPAMixer, "fp32": Float32Mixer}[alt])
    return model


# --------------------------------------------------------------------------- correctness


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _kind(name: str) -> str:
    return "out" if name == "out" else "qkv" if name in ("dq", "dk", "dv") else "param"


def _mixer(name: str, d: int, heads: int) -> nn.Module:
    variant, broadcast, recompute = MIXERS[name]
    torch.manual_seed(0)
    mixer = build_mixer(variant, heads, d, (4, 4), broadcast, extra_representatives="prefix", prefix_broadcast="own")
    if hasattr(mixer, "recompute"):
        mixer.recompute = recompute
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def _mixer_run(mixer, qkv, w, layout, device, dtype, compute=None):
    """Output and gradients (q, k, v, parameters) of ``mixer`` on ``device``; inputs rounded to ``dtype`` and, if
    ``compute`` is given, computed in that dtype (results rounded back to ``dtype``)."""
    compute = compute or dtype
    q, k, v = (t.to(device=device, dtype=dtype).to(compute).detach().requires_grad_(True) for t in qkv)
    mixer = mixer.to(device=device, dtype=compute)
    mixer.zero_grad(set_to_none=True)
    out = mixer(q, k, v, layout)
    (out.double() * w.to(device)).sum().backward()
    names = ["out", "dq", "dk", "dv"] + [n.replace("inner.", "") for n, _ in mixer.named_parameters()]
    values = [out, q.grad, k.grad, v.grad] + [p.grad for p in mixer.parameters()]
    return {n: t.detach().to(dtype) for n, t in zip(names, values)}


def check_mixers(device: torch.device, dtypes, quick: bool, make=None, names=None) -> List[dict]:
    """Every mixer (of ``names``, default all) on ``device`` in each of ``dtypes`` against float64 on the CPU.
    ``make(name, d, heads)``: the mixer under test (default: the library's), compared with the library's own mixer in
    float64."""
    make = make or _mixer
    b, heads, side, d = (2, 3, 4, 16) if quick else (2, 3, 14, 64)
    layout = TokenLayout((side, side))
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(b, heads, 1 + side * side, d, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(b, heads, 1 + side * side, d, generator=g, dtype=torch.float64)
    rows = []
    for name in names or list(MIXERS):
        ref = _mixer_run(_mixer(name, d, heads).double(), qkv, w, layout, torch.device("cpu"), torch.float64)
        for dtype in dtypes:
            row = dict(check="mixer", name=name, dtype=str(dtype).replace("torch.", ""), device=device.type)
            try:
                got = _mixer_run(make(name, d, heads), qkv, w, layout, device, dtype)
                err = {n: _rel(got[n], ref[n]) for n in ref}
                finite = all(bool(torch.isfinite(t).all()) for t in got.values())
                if dtype in FULL_TOLERANCE:
                    tol = {n: FULL_TOLERANCE[dtype][_kind(n)] for n in ref}
                else:
                    floor = _mixer_run(make(name, d, heads).to(dtype), qkv, w, layout, device, dtype, torch.float32)
                    eps = torch.finfo(dtype).eps
                    tol = {n: max(HALF_TOLERANCE[_kind(n)][0] * _rel(floor[n], ref[n]),
                                  HALF_TOLERANCE[_kind(n)][1] * eps) for n in ref}
                over = [n for n in ref if not err[n] <= tol[n]]
                row.update(ok=finite and not over, finite=finite, out=err["out"],
                           grad=max(v for n, v in err.items() if n != "out"), over=over,
                           worst={n: [err[n], tol[n]] for n in over})
            except Exception as e:  # noqa: BLE001 -- a check that crashes is a failed check, reported
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
            rows.append(row)
    return rows


def check_sdpa(device: torch.device, dtype, quick: bool) -> List[dict]:
    """:class:`SDPAMixer` against the library's mixer in float64 on the CPU (forward and gradients)."""
    def make(name, d, heads):
        return SDPAMixer(_mixer(name, d, heads))

    rows = check_mixers(device, [dtype], quick, make=make, names=["cbsa/query", "cbsa/key", "contraction_free/query"])
    return [{**row, "check": "sdpa_alternative"} for row in rows]


def _tiny_vit(img, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, num_classes=5, dynamic_img_size=True, **kw)


def check_models(device: torch.device, compile_backend: Optional[str]) -> List[dict]:
    """Whole converted tiny ViTs in float32 on the device against float64 on the CPU: logits, input gradients and
    the gradients of every parameter; and the compiled model against eager on the device."""
    rows = []
    for variant in ("cbsa", "contraction_free", "linear"):
        for shape in ((64, 64), (48, 80)):
            row = dict(check="model", name=f"{variant} {shape[0]}x{shape[1]}", dtype="float32", device=device.type)
            try:
                x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                results = []
                for dev, dt in ((torch.device("cpu"), torch.float64), (device, torch.float32)):
                    model = vit2cbsa.convert(_tiny_vit(64), variant, 4).to(device=dev, dtype=dt).train()
                    xin = x.to(device=dev, dtype=dt).detach().requires_grad_(True)
                    logits = model(xin)
                    (logits.double() * torch.linspace(-1, 1, logits.numel(), device=dev,
                                                      dtype=torch.float64).view_as(logits)).sum().backward()
                    results.append([logits, xin.grad] + [p.grad for p in model.parameters()])
                errs = [_rel(a, b) for a, b in zip(results[1], results[0])]
                row.update(out=errs[0], grad=max(errs[1:]), ok=errs[0] <= 1e-4 and max(errs[1:]) <= 1e-3)
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
            rows.append(row)
    if compile_backend:
        row = dict(check="compile", name=f"cbsa 64x64 torch.compile(backend={compile_backend!r}) vs eager",
                   dtype="float32", device=device.type)
        try:
            torch._dynamo.reset()
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
            outs = []
            for compiled in (False, True):
                model = vit2cbsa.convert(_tiny_vit(64), "cbsa", 4).to(device).train()
                fn = torch.compile(model, backend=compile_backend) if compiled else model
                logits = fn(x)
                logits.sum().backward()
                outs.append([logits] + [p.grad for p in model.parameters()])
            errs = [_rel(a, b) for a, b in zip(outs[1], outs[0])]
            row.update(out=errs[0], grad=max(errs[1:]), ok=errs[0] <= 1e-4 and max(errs[1:]) <= 1e-3)
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- speed


class Budget:
    """Wall-clock seconds left for the run; estimates of what a step costs, to skip what does not fit."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, estimate: float) -> bool:
        return self.left() > estimate


def _peak_cuda(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_config(label, model_name, res, batch, args, device, dtype, budget: Budget, compile_jobs) -> List[dict]:
    """Eager timings (and peak memory) of every model of ``TIMED`` on one configuration; queues its compiled timings."""
    import timm

    kw = dict(img_size=res)
    if args.quick:
        kw.update(patch_size=8, embed_dim=64, depth=2, num_heads=2)
    torch.manual_seed(0)
    orig = timm.create_model(model_name, pretrained=False, **kw).to(device=device, dtype=dtype)
    models = {"original": orig}
    for name in TIMED[1:]:
        models[name] = converted(orig, name, args.representatives)
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    y = torch.randint(0, orig.num_classes, (batch,), device=device)

    def infer(m):
        def fn():
            with torch.inference_mode():
                m(x)
            speed.sync(device)
        return fn

    for m in models.values():
        m.eval()
    t_inf = {k: statistics.median(v) for k, v in time_repeats({k: infer(m) for k, m in models.items()},
                                                               repeats=args.repeats, warmup=2).items()}
    for m in models.values():
        m.train()
    t_train = {k: statistics.median(v) for k, v in time_repeats(
        {k: speed.train_step(m, x, y, device) for k, m in models.items()}, repeats=args.repeats, warmup=2).items()}
    mem = {}
    for k, m in models.items():
        if device.type == "cuda":
            mem[k] = _peak_cuda(speed.train_step(m, x, y, device))
        elif args.quick:  # the CPU tracker: slow, so only the smoke run's tiny models
            mem[k] = speed.peak_train_memory(m, x, y, device)
    rows = []
    for k in models:
        rows.append(dict(model=label, resolution=res, tokens=1 + (res // (8 if args.quick else 16)) ** 2, batch=batch,
                         variant=k, infer_ms=1e3 * t_inf[k], train_ms=1e3 * t_train[k],
                         infer_speedup=t_inf["original"] / t_inf[k], train_speedup=t_train["original"] / t_train[k],
                         peak_train_mib=mem.get(k), mem_ratio=(mem[k] / mem["original"]) if mem else None))
        print(f"  {label} {res} b{batch} {k:22s} infer {1e3 * t_inf[k]:8.2f} ms ({rows[-1]['infer_speedup']:.2f}x)  "
              f"train {1e3 * t_train[k]:8.2f} ms ({rows[-1]['train_speedup']:.2f}x)"
              + (f"  peak {mem[k]:.0f} MiB" if k in mem else ""), flush=True)
    compile_jobs.append((label, res, batch, models, x, y))
    return rows


def time_compiled(job, args, device, budget: Budget, priority_variants, estimate: Dict[str, float],
                  only_priority: bool = False) -> dict:
    """Compiled inference and training timings of one configuration (``priority_variants`` first); what the
    budget cannot fit is skipped (each compile is assumed to take as long as the slowest one so far)."""
    label, res, batch, models, x, y = job
    out = dict(model=label, resolution=res, batch=batch, compiled={}, skipped=[])
    order = [v for v in priority_variants if v in models]
    order += [] if only_priority else [v for v in models if v not in priority_variants]
    for mode in ("infer", "train"):
        fns, compile_s = {}, {}
        for k in order:
            guess = 2.5 * estimate.get(mode, 30.0 if device.type == "cuda" else 5.0)
            if not budget.allows(guess):
                out["skipped"].append(f"{k} {mode} (time budget)")
                continue
            m = models[k]
            try:
                torch._dynamo.reset()
                c = torch.compile(m, backend=args.compile_backend)
                if mode == "infer":
                    m.eval()

                    def fn(c=c):
                        with torch.inference_mode():
                            c(x)
                        speed.sync(device)
                else:
                    m.train()
                    fn = speed.train_step(m, x, y, device, forward=c)
                t0 = time.perf_counter()
                fn()
                compile_s[k] = time.perf_counter() - t0
                estimate[mode] = max(estimate.get(mode, 0.0), compile_s[k])
                # timed right away, against the eager original (compiled models are not kept: one graph at a time)
                eager = models["original"]
                eager.train(mode == "train")
                if mode == "train":
                    efn = speed.train_step(eager, x, y, device)
                else:
                    def efn():
                        with torch.inference_mode():
                            eager(x)
                        speed.sync(device)
                t = time_repeats({"compiled": fn, "eager_original": efn}, repeats=args.repeats, warmup=1)
                fns[k] = statistics.median(t["compiled"])
                mem = _peak_cuda(fn) if device.type == "cuda" and mode == "train" else None
                out["compiled"].setdefault(k, {})[mode] = dict(ms=1e3 * fns[k], compile_s=compile_s[k],
                                                               eager_original_ms=1e3 * statistics.median(
                                                                   t["eager_original"]), peak_train_mib=mem)
                print(f"  compiled {label} {res} b{batch} {k:22s} {mode} {1e3 * fns[k]:8.2f} ms "
                      f"(compile {compile_s[k]:.1f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 -- reported, the rest goes on
                out["compiled"].setdefault(k, {})[mode] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                print(f"  compiled {label} {res} b{batch} {k} {mode}: FAILED {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
    torch._dynamo.reset()
    return out


# --------------------------------------------------------------------------- report


def _fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# Device check: {env['device_name']}", "",
             f"torch {env['torch']}, vit2cbsa {env['vit2cbsa']} ({env.get('git', '?')}), {env['dtype']}, "
             f"{record['seconds']:.0f} s; correctness {'PASSED' if record['correct'] else 'FAILED'}.", "",
             "## Correctness (relative error, Frobenius norm, against float64 on the CPU)", "",
             "| check | name | dtype | output | worst gradient | ok |", "|---|---|---|---:|---:|---|"]
    def sci(v):
        return "–" if v is None else f"{v:.1e}"

    for r in record["correctness"]:
        ok = "yes" if r.get("ok") else "**NO** " + (r.get("error") or ", ".join(r.get("over", [])))
        lines.append(f"| {r['check']} | {r['name']} | {r['dtype']} | {sci(r.get('out'))} | {sci(r.get('grad'))} | {ok} |")
    compiled = {(c["model"], c["resolution"], c["batch"]): c for c in record["compiled"]}
    lines += ["", f"## Speed ({env['dtype']}; milliseconds, median; x: the original's time / this one's)", "",
              "| model | input | batch | variant | inference eager | inference compiled | training step eager | "
              "training step compiled | peak training MiB |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in record["speed"]:
        c = compiled.get((r["model"], r["resolution"], r["batch"]), {}).get("compiled", {})
        ci, ct = c.get(r["variant"], {}).get("infer", {}), c.get(r["variant"], {}).get("train", {})
        co = c.get("original", {})

        def comp(entry, orig_entry):
            if "ms" not in entry:
                return "error" if "error" in entry else "–"
            ratio = f" ({orig_entry['ms'] / entry['ms']:.2f}x)" if "ms" in orig_entry else ""
            return f"{entry['ms']:.2f}{ratio}"

        mem = "–" if r["peak_train_mib"] is None else f"{r['peak_train_mib']:.0f} ({r['mem_ratio']:.2f}x)"
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['variant']} | "
                     f"{r['infer_ms']:.2f} ({r['infer_speedup']:.2f}x) | {comp(ci, co.get('infer', {}))} | "
                     f"{r['train_ms']:.2f} ({r['train_speedup']:.2f}x) | {comp(ct, co.get('train', {}))} | {mem} |")
    lines += ["", "## Explicit matmuls or SDPA (the faster CBSA per configuration)", "",
              "| model | input | batch | inference eager | training eager | inference compiled | training compiled |",
              "|---|---|---:|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["resolution"], r["batch"]) for r in record["speed"]):
        rows = {r["variant"]: r for r in record["speed"] if (r["model"], r["resolution"], r["batch"]) == key}
        c = compiled.get(key, {}).get("compiled", {})

        def pick(a, b):
            if a is None or b is None:
                return "–"
            return f"{'explicit' if a <= b else 'sdpa'} ({max(a, b) / min(a, b):.2f}x)"

        get = lambda v, mode: c.get(v, {}).get(mode, {}).get("ms")  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {pick(rows['cbsa']['infer_ms'], rows['cbsa+sdpa']['infer_ms'])} | "
                     f"{pick(rows['cbsa']['train_ms'], rows['cbsa+sdpa']['train_ms'])} | "
                     f"{pick(get('cbsa', 'infer'), get('cbsa+sdpa', 'infer'))} | "
                     f"{pick(get('cbsa', 'train'), get('cbsa+sdpa', 'train'))} |")
    skipped = [s for c in record["compiled"] for s in c["skipped"]] + record["skipped"]
    if skipped:
        lines += ["", f"Skipped: {'; '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def environment(device: torch.device, dtype) -> dict:
    env = dict(torch=torch.__version__, vit2cbsa=getattr(vit2cbsa, "__version__", "?"), python=sys.version.split()[0],
               dtype=str(dtype).replace("torch.", ""), device=device.type)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env.update(device_name=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                    capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="tiny models and sizes (the tests: --device cpu --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for everything (default 420)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 5; quick 2)")
    ap.add_argument("--representatives", type=int, default=None, help="default 64 (quick 4)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the CPU tests: aot_eager)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.representatives = args.representatives or (4 if args.quick else 64)
    backend = None if args.no_compile else args.compile_backend
    budget = Budget(args.budget_s)
    t0 = time.perf_counter()
    env = environment(device, dtype)
    print(f"device check on {env['device_name']} (torch {env['torch']}), {args.dtype}, budget {args.budget_s:.0f} s",
          flush=True)

    correctness: List[dict] = []
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32 here
    steps = [("mixers", lambda: check_mixers(device, [torch.float32, dtype] if dtype != torch.float32
                                             else [torch.float32], args.quick)),
             ("sdpa alternative", lambda: check_sdpa(device, torch.float32, args.quick)),
             ("models", lambda: check_models(device, backend))]
    for what, step in steps:
        try:
            rows = step()
        except Exception as e:  # noqa: BLE001
            rows = [dict(check=what, name="(crashed)", dtype="-", ok=False,
                         error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])]
        correctness += rows
        bad = [r for r in rows if not r.get("ok")]
        print(f"correctness, {what}: {len(rows) - len(bad)}/{len(rows)} passed"
              + "".join(f"\n  FAILED {r['name']} {r['dtype']}: {r.get('error') or r.get('worst')}" for r in bad),
              flush=True)

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if args.quick:
        models = {"tiny/8": "vit_small_patch16_224"}
        configs = [(32, 4), (64, 1)]
        priority = [("tiny/8", 32, 4)]
    else:
        models = {"ViT-S/16": "vit_small_patch16_224", "ViT-B/16": "vit_base_patch16_224"}
        configs = [(224, 64), (512, 1), (512, 4), (1024, 1), (1024, 4)]
        priority = [("ViT-B/16", 224, 64), ("ViT-B/16", 1024, 1), ("ViT-S/16", 224, 64), ("ViT-B/16", 512, 4),
                    ("ViT-B/16", 1024, 4)]
    rows_speed, jobs, skipped = [], [], []
    order = sorted(((label, res, batch) for label in models for res, batch in configs),
                   key=lambda c: priority.index(c) if c in priority else len(priority))
    eager_cost = 0.0
    for label, res, batch in order:
        if not budget.allows(1.5 * eager_cost + (0.4 * args.budget_s if backend and not args.quick else 0.0)):
            skipped.append(f"{label} {res} batch {batch} (time budget)")
            continue
        t = time.perf_counter()
        try:
            rows_speed += time_config(label, models[label], res, batch, args, device, dtype, budget, jobs)
        except Exception as e:  # noqa: BLE001 (e.g. out of memory): reported, the rest goes on
            skipped.append(f"{label} {res} batch {batch} ({type(e).__name__}: {str(e)[:200]})")
            print(f"  {label} {res} b{batch}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        eager_cost = max(eager_cost, time.perf_counter() - t)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    compiled = []
    if backend:
        estimate: Dict[str, float] = {}
        wanted = [(label, res, batch) for label, res, batch in priority if any(j[:3] == (label, res, batch) for j in jobs)]
        # the smoke run compiles one configuration's original, cbsa and cbsa+sdpa: every code path, in seconds
        keys = wanted[:1] if args.quick else wanted + [j[:3] for j in jobs if j[:3] not in wanted]
        for key in keys:
            job = next(j for j in jobs if j[:3] == key)
            if not budget.allows(5.0):
                skipped.append(f"compiled {key[0]} {key[1]} batch {key[2]} (time budget)")
                continue
            compiled.append(time_compiled(job, args, device, budget, ["original", "cbsa", "cbsa+sdpa"], estimate,
                                          only_priority=args.quick))
    jobs.clear()
    record = dict(environment=env, seconds=time.perf_counter() - t0, budget_s=args.budget_s,
                  correct=all(r.get("ok") for r in correctness), correctness=correctness, speed=rows_speed,
                  compiled=compiled, skipped=skipped, representatives=args.representatives, repeats=args.repeats,
                  compile_backend=backend)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"device_check_{device.type}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')} ({record['seconds']:.0f} s); correctness "
          f"{'PASSED' if record['correct'] else 'FAILED'}", flush=True)
    return 0 if record["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
