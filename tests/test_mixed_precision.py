"""Every variant in bf16 and fp16: finite, and within stated tolerances of a float64 reference.

Mixers alone (``H = 2`` heads of ``d = 64``, ViT-B's head width), on inputs that stress them:

* ``normal``: 1 + 14 x 14 tokens of unit Gaussians;
* ``large_logits``: the same with queries and keys 4x larger (logits of standard deviation ~16: near one-hot
  softmaxes, where the rounding of a logit moves a probability most);
* ``tokens_4097``: 1 + 64 x 64 tokens (a 1024 x 1024 image at patch 16): sums over 4097 tokens;
* ``collapsed``: every patch token the same up to 1e-3 (a uniform image region, or the over-smoothed tokens of a
  deep layer): all pooled representatives collapse onto one.

Two modes: ``cast`` (``mixer.to(dtype)``, inputs in ``dtype``: a model cast with ``.to(dtype)``, or FSDP's
``param_dtype``) and ``autocast`` (float32 parameters, ``dtype`` inputs, under ``torch.autocast``); the training
path (the hand-written backward) and the inference path (no graph) are both checked.

The tolerance is stated against the **floor**: the same computation with the inputs (and, cast, the parameters)
rounded to ``dtype`` but carried out in float32, its output and gradients rounded to ``dtype`` -- the error no
implementation in ``dtype`` can avoid. Each relative error (Frobenius norm, against float64) must be at most
``max(R x floor, A x eps(dtype))``: outputs ``R = 3, A = 4``; gradients of q, k, v ``R = 6, A = 4``; gradients of
the added parameters (per-head sums over the whole batch) ``R = 8, A = 12``. Where the computation in ``dtype`` itself adds error (``XFAIL`` below), the cases are
marked ``xfail(strict=True)`` (none today: the mixers compute in float32 under bf16/fp16, which brought every case
within it); ``python tests/test_mixed_precision.py`` prints the whole table.

Also: whole converted models under autocast and cast (finite, logits and gradients as close to float64 as the
original model's), ``save_pretrained`` / ``from_pretrained`` keep each dtype, and ``--mixed-precision bf16`` and
``fp16`` fine-tuning runs end to end on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vit2cbsa.attention import VARIANTS, build_mixer
from vit2cbsa.layout import TokenLayout

H, D = 2, 64
#: the mixers checked, name -> (variant, broadcast): every registered variant (those with representatives with the
#: query broadcast), and CBSA with its other broadcasts too
MIXERS = {(f"{v}/query" if VARIANTS[v].uses_representatives else v): (v, "query") for v in sorted(VARIANTS)}
MIXERS.update({f"cbsa/{b}": ("cbsa", b) for b in ("key", "transpose")})
CASES = ("normal", "large_logits", "tokens_4097", "collapsed")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("cast", "autocast")
#: (R, A) of the tolerance max(R x floor, A x eps) for outputs, q/k/v gradients and parameter gradients
TOLERANCE = {"out": (3.0, 4.0), "qkv": (6.0, 4.0), "param": (8.0, 12.0)}


def _kind(name: str) -> str:
    return "out" if name in ("out", "infer") else "qkv" if name in ("dq", "dk", "dv") else "param"


def _inputs(case: str):
    g = torch.Generator().manual_seed(0)
    side = 64 if case == "tokens_4097" else 14
    q, k, v = (torch.randn(1, H, 1 + side * side, D, generator=g, dtype=torch.float64) for _ in range(3))
    if case == "large_logits":
        q, k = 4 * q, 4 * k
    if case == "collapsed":
        for t in (q, k, v):
            t[:, :, 1:] = t[:, :, 1:2] + 1e-3 * t[:, :, 1:]
    return (q, k, v), side


def _mixer(name: str) -> torch.nn.Module:
    variant, broadcast = MIXERS[name]
    torch.manual_seed(0)
    mixer = build_mixer(variant, H, D, (4, 4), broadcast, extra_representatives="prefix", prefix_broadcast="own")
    with torch.no_grad():  # step sizes, temperatures, feature maps away from their initial values
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _run(mixer, qkv, side, dtype, *, autocast=None, floor=False):
    """``(train output, inference output, [dq, dk, dv, *parameter gradients])`` of ``mixer`` on ``qkv`` in ``dtype``.

    ``floor``: inputs rounded to ``dtype``, computed in float32, results rounded to ``dtype``."""
    layout = TokenLayout((side, side))
    compute = torch.float32 if floor else dtype
    q, k, v = (t.detach().to(dtype).to(compute).requires_grad_(True) for t in qkv)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None and not floor else contextlib.nullcontext()
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with ctx:
        out = mixer(q, k, v, layout)
        with torch.no_grad():
            infer = mixer(q.detach(), k.detach(), v.detach(), layout)
    (out.double() * w).sum().backward()
    grads = [q.grad, k.grad, v.grad] + [p.grad for p in mixer.parameters()]
    back = dtype if floor else None
    rounded = lambda t: t.to(back) if back is not None else t  # noqa: E731
    return rounded(out.detach()), rounded(infer), [rounded(g) for g in grads]


@functools.lru_cache(maxsize=None)
def measure(name: str, case: str, dtype_name: str, mode: str) -> dict:
    """Relative errors against float64 of the mixer in ``dtype`` and of its floor, per output and gradient."""
    dtype = DTYPES[dtype_name]
    qkv, side = _inputs(case)
    base = _mixer(name)
    ref = _run(base.double(), qkv, side, torch.float64)
    base = _mixer(name)
    if mode == "cast":
        got = _run(base.to(dtype), qkv, side, dtype)
        floor = _run(_mixer(name).to(dtype).float(), qkv, side, dtype, floor=True)
    else:
        got = _run(base, qkv, side, dtype, autocast=dtype)
        floor = _run(_mixer(name), qkv, side, dtype, floor=True)
    names = ["out", "infer", "dq", "dk", "dv"] + [n for n, _ in base.named_parameters()]

    def flat(r):
        return [r[0], r[1], *r[2]]

    finite = all(bool(torch.isfinite(t).all()) for t in flat(got))
    err = {n: _rel(a, b) for n, a, b in zip(names, flat(got), flat(ref))}
    low = {n: _rel(a, b) for n, a, b in zip(names, flat(floor), flat(ref))}
    eps = torch.finfo(dtype).eps
    ratio = {n: err[n] / max(low[n], 1e-12) for n in names}
    tol = {n: max(TOLERANCE[_kind(n)][0] * low[n], TOLERANCE[_kind(n)][1] * eps) for n in names}
    return dict(finite=finite, err=err, floor=low, ratio=ratio, tol=tol,
                over=sorted(n for n in names if err[n] > tol[n]))


# Cases whose error exceeded R x floor while the mixers computed in bf16/fp16 (measured 2026-12-01, torch 2.14 CPU):
# linear in fp16 (gradients summed in float16 13-19x the floor; phi(K)^T V and sum phi(k) overflowing at 4097 tokens),
# collapsed representatives in every softmax variant (softmax-gradient cancellation, dq 40-60x the floor), bf16
# temperature gradients on near one-hot softmaxes (10x). The mixers now compute in float32 for half inputs
# (vit2cbsa.attention.cbsa_explicit.compute_dtype), and all of them are within the tolerance: none is expected to fail.
XFAIL: dict = {}


def _params():
    out = []
    for name in MIXERS:
        for case in CASES:
            for dt in DTYPES:
                for mode in MODES:
                    why = XFAIL.get((name, case, dt))
                    marks = [pytest.mark.xfail(strict=True, reason=f"needs float32 compute in the mixer: {why}")] \
                        if why else []
                    out.append(pytest.param(name, case, dt, mode, marks=marks, id=f"{name}-{case}-{dt}-{mode}"))
    return out


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_finite_on_every_stress_input(name, dt):
    """Forward (training and inference paths) and the hand-written backward stay finite, both modes."""
    for case in CASES:
        for mode in MODES:
            assert measure(name, case, dt, mode)["finite"], (case, mode)


@pytest.mark.parametrize("name,case,dt,mode", _params())
def test_within_tolerance_of_float64(name, case, dt, mode):
    r = measure(name, case, dt, mode)
    assert r["finite"] and not r["over"], {n: (f"{r['err'][n]:.2e}", f"tol {r['tol'][n]:.2e}") for n in r["over"]}


# --------------------------------------------------------------------------- whole models


def _tiny_vit(variant=None, side=64):
    import timm

    import vit2cbsa

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=side * 8, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, num_classes=5)
    if variant is not None:
        name, broadcast = MIXERS[variant]
        model = vit2cbsa.convert(model, name, 16, broadcast=broadcast)
    return model.eval()


def _run_model(model, xin, ctx):
    xin = xin.clone().requires_grad_(True)
    with ctx:
        logits = model(xin)
    (logits.double() * torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits)).sum().backward()
    return logits.detach(), xin.grad


def _image(side):
    return torch.randn(1, 3, side * 8, side * 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _model_reference(variant, side):
    return _run_model(_tiny_vit(variant, side).double(), _image(side), contextlib.nullcontext())


def _model_errors(variant, dtype, mode, side):
    """Logit and input-gradient errors of a tiny ViT (converted or not) in ``dtype`` against its float64 self."""
    x, run = _image(side), _run_model
    ref = _model_reference(variant, side)
    model = _tiny_vit(variant, side)
    if mode == "cast":
        got = run(model.to(dtype), x.to(dtype), contextlib.nullcontext())
    else:
        got = run(model, x.float(), torch.autocast("cpu", dtype=dtype))
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    return finite, _rel(got[0], ref[0]), _rel(got[1], ref[1])


def _model_params():
    out = []
    for variant in MIXERS:
        for dt in DTYPES:
            for mode in MODES:
                marks = []
                out.append(pytest.param(variant, dt, mode, marks=marks, id=f"{variant}-{dt}-{mode}"))
    return out


@pytest.mark.parametrize("variant,dt,mode", _model_params())
def test_whole_models_as_close_as_the_original(variant, dt, mode):
    """1 + 32 x 32 tokens, 2 blocks: the converted model's logits and input gradients are finite and within 3x
    (logits) / 5x (gradients) of the original model's own error in the same dtype and mode (or 2 eps)."""
    dtype, eps = DTYPES[dt], torch.finfo(DTYPES[dt]).eps
    ok, base_logits, base_grad = _model_errors(None, dtype, mode, 32)
    assert ok
    finite, e_logits, e_grad = _model_errors(variant, dtype, mode, 32)
    assert finite
    assert e_logits <= max(3 * base_logits, 2 * eps), (e_logits, base_logits)
    assert e_grad <= max(5 * base_grad, 2 * eps), (e_grad, base_grad)


def test_linear_model_cast_to_fp16_at_4097_tokens():
    """1 + 64 x 64 tokens, one block: the converted model's logits as close as the original's."""
    def errors(variant):
        import timm

        import vit2cbsa

        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=512, patch_size=8, embed_dim=64,
                                  depth=1, num_heads=2, num_classes=5).eval()
        if variant:
            model = vit2cbsa.convert(model, variant, 16)
        x = _image(64)
        with torch.no_grad():
            ref = model.double()(x)
            got = model.half()(x.half())
        return bool(torch.isfinite(got).all()), _rel(got, ref)

    _, base = errors(None)
    finite, err = errors("linear")
    assert finite and err <= 3 * base, (err, base)


# --------------------------------------------------------------------------- saving keeps the dtype


@pytest.mark.parametrize("dt", list(DTYPES))
def test_save_and_load_keep_the_dtype(tmp_path, dt):
    import vit2cbsa

    dtype = DTYPES[dt]
    model = _tiny_vit("cbsa/query", side=4).to(dtype)
    vit2cbsa.save_pretrained(model, tmp_path / "m")
    loaded = vit2cbsa.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(2, 3, 32, 32).to(dtype)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # a float32 model with one half-precision tensor comes back mixed, as saved
    mixed = _tiny_vit("cbsa/query", side=4)
    mixed.head.to(dtype)
    vit2cbsa.save_pretrained(mixed, tmp_path / "mixed")
    back = vit2cbsa.from_pretrained(tmp_path / "mixed")
    assert back.head.weight.dtype == dtype and back.blocks[0].attn.mixer.kappa.dtype == torch.float32
    # casting on request: .to() after loading (from_pretrained has no dtype argument)
    assert {p.dtype for p in vit2cbsa.from_pretrained(tmp_path / "m").float().parameters()} == {torch.float32}


# --------------------------------------------------------------------------- fine-tuning in bf16 / fp16 on the CPU

ROOT = Path(__file__).resolve().parents[1]
TINY_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mp_assets")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in range(4):
            d = root / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(d / f"{i}.png")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_KW).state_dict(),
              str(root / "tiny.safetensors"))
    return root


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one mixed precision per process: reset its shared state around each run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_finetune_end_to_end_in_mixed_precision_on_cpu(assets, tmp_path, fresh_accelerate, dt):
    import vit2cbsa
    from vit2cbsa import train

    spec = importlib.util.spec_from_file_location("finetune_cli_mp", ROOT / "examples" / "finetune.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    argv = ["--model", "timm:vit_tiny_patch16_224", "--checkpoint", str(assets / "tiny.safetensors"), "--model-kwargs",
            json.dumps(TINY_KW), "--dataset", str(assets / "data"), "--out", str(out), "--representatives", "4",
            "--num-workers", "0", "--cpu", "--log-every", "1", "--batch-size", "8", "--align-steps", "2",
            "--finetune-steps", "3", "--lora-rank", "2", "--distill-weight", "0.5", "--mixed-precision", dt]
    result = train.run(train.FinetuneConfig.from_arguments(cli.build_parser().parse_args(argv)))
    assert result["mixed_precision"] == dt and result["final_format"] == "vit2cbsa"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 5 and all(np.isfinite(losses))
    loaded = vit2cbsa.from_pretrained(out / "final")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # float32 master weights, as trained
    if dt == "fp16":  # the loss scaler ran (Accelerate's own, which it leaves off on the CPU)
        assert any("scaler.pt" in p.name for p in (out / "checkpoints").rglob("*"))


if __name__ == "__main__":  # the whole table: python tests/test_mixed_precision.py
    torch.set_num_threads(1)
    for mode in MODES:
        for name in MIXERS:
            for case in CASES:
                for dt in DTYPES:
                    r = measure(name, case, dt, mode)
                    worst = max(r["ratio"], key=r["ratio"].get)
                    cells = " ".join(f"{n}={r['err'][n]:.1e}({r['ratio'][n]:.1f}x)" for n in ("out", "infer", "dq", "dk",
                                                                                               "dv"))
                    flag = "XFAIL" if (name, case, dt) in XFAIL else ("OVER " + ",".join(r["over"]) if r["over"] else "")
                    print(f"{mode:8s} {name:22s} {case:12s} {dt}: {cells} worst {worst} {r['ratio'][worst]:.1f}x "
                          f"{'' if r['finite'] else 'NONFINITE '}{flag}", flush=True)
