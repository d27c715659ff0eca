"""vit2cbsa.analysis: coding rates, recomputed A/B maps, robustness, synthetic compression, explain CLI.

Every numeric routine is checked against an independent computation (a direct per-matrix
logdet, the mixer's own forward pass, the original module's output, autograd). Tiny
random-weight models only; nothing is downloaded.
"""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import vit2cbsa
from vit2cbsa.analysis import (
    AttentionCapture,
    attention_operator,
    attention_projection_weights,
    cbsa_maps,
    coding_rate,
    compress_synthetic,
    compression_term,
    head_bases,
    layer_coding_rates,
    linear_cbsa_step,
    logdet_spd,
    perturbed,
    plot_explanation,
    plot_robustness,
    plot_synthetic,
    representative_rate,
    robustness_curve,
    union_of_subspaces,
)
from vit2cbsa.cli import explain_main
from vit2cbsa.analysis.images import InputConfig, preprocess
from vit2cbsa.analysis.maps import explain, rep_window
from vit2cbsa.analysis.synthetic import linear_cbsa_update, off_subspace_energy
from vit2cbsa.attention import VARIANTS

IMAGENET_TAR = Path("/work/shared/data/imagenet-samples-100.tar")
#: the registered variants that mix through representatives (A, B maps)
REPRESENTATIVE_VARIANTS = sorted(name for name, cls in VARIANTS.items() if cls.uses_representatives)


def _tiny_timm(num_classes=10, distilled=False, img=32, patch=4, depth=2, heads=2, dim=32, seed=0):
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, img_size=img, patch_size=patch, embed_dim=dim, depth=depth,
                              num_heads=heads, num_classes=num_classes, dynamic_img_size=True)
    with torch.no_grad():  # peakier attention than the random init
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return model.eval()


def _randomise_mixers(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "log_temperature"):
                m.log_temperature.copy_(0.3 * torch.randn(m.log_temperature.shape, generator=gen))
                m.kappa.copy_(1 + 0.5 * torch.randn(m.kappa.shape, generator=gen))
            if hasattr(m, "gamma"):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=gen))
    return model


def _direct_rate(w: torch.Tensor, eps: float) -> float:
    """R(W) straight from the definition, I_p always (no Sylvester), torch.logdet on one matrix."""
    w = w.double()
    n, p = w.shape
    return 0.5 * torch.logdet(torch.eye(p, dtype=torch.float64) + p / (n * eps ** 2) * w.T @ w).item()


# --------------------------------------------------------------------------- coding rate


@pytest.mark.parametrize("n,p", [(9, 4), (3, 8)])  # p <= N (p x p Gram) and N < p (N x N Gram)
def test_coding_rate_matches_direct_logdet(n, p):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, n, p, generator=gen)
    for eps in (0.5, 0.1):
        got = coding_rate(w, eps)
        assert got.shape == (2, 3) and got.dtype == torch.float64
        want = torch.tensor([[_direct_rate(w[b, h], eps) for h in range(3)] for b in range(2)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    unit = w.double() / w.double().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(coding_rate(w, 0.5, normalize=True), coding_rate(unit, 0.5), rtol=1e-12, atol=1e-12)
    # scaling the tokens does not change the normalised rate, and does change the raw one
    torch.testing.assert_close(coding_rate(7 * w, 0.5, normalize=True), coding_rate(w, 0.5, normalize=True))
    assert (coding_rate(7 * w, 0.5) > coding_rate(w, 0.5)).all()


def test_coding_rate_is_stable_in_float32_extremes():
    gen = torch.Generator().manual_seed(1)
    low_rank = torch.randn(200, 2, generator=gen) @ torch.randn(2, 16, generator=gen)  # rank 2 in 16 dims
    big = (1e4 * low_rank).float()
    got = coding_rate(big, 0.5).item()  # Gram condition number ~1e10: Cholesky in float64 still holds
    svals = torch.linalg.svdvals(big.double())  # independent and Gram-free: sum log(1 + c s^2)
    assert got == pytest.approx(0.5 * torch.log1p(16 / (200 * 0.25) * svals ** 2).sum().item(), rel=1e-6)
    zeros = torch.zeros(5, 4)
    assert coding_rate(zeros, 0.5).item() == 0.0 and coding_rate(zeros, 0.5, normalize=True).item() == 0.0


def test_logdet_spd_cholesky_and_fallback():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    spd = a @ a.transpose(-2, -1) + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(logdet_spd(spd), torch.logdet(spd))
    mixed = torch.stack([spd[0], torch.diag(torch.tensor([-1.0, 1, 1, 1, 1, 1], dtype=torch.float64)), torch.diag(torch.tensor([-1.0, -1, 1, 1, 1, 1], dtype=torch.float64))])
    out = logdet_spd(mixed)  # Cholesky rejects the last two; slogdet: sign -1 -> nan, sign +1 -> 0
    assert out[0].item() == pytest.approx(torch.logdet(spd[0]).item())
    assert math.isnan(out[1].item()) and out[2].item() == pytest.approx(0.0, abs=1e-12)


def test_head_bases_and_compression_term_timm_and_hf():
    import transformers

    model = _tiny_timm()
    attn = model.blocks[0].attn
    bases = head_bases(attn)  # value columns, orthonormalised
    assert bases.shape == (2, 32, 16)
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(bases.transpose(1, 2) @ bases, eye.expand(2, 16, 16))
    w_v = attn.qkv.weight.detach().double()[64:96]  # value rows of the fused qkv
    for h in range(2):
        rows = w_v[16 * h:16 * (h + 1)]  # the head's value columns span the same space as U_h
        torch.testing.assert_close(rows @ bases[h] @ bases[h].T, rows)
    raw = head_bases(attn, which="query", orthonormalize=False)
    torch.testing.assert_close(raw[1], attn.qkv.weight.detach().double()[16:32].T)

    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(3))
    got = compression_term(x, bases, eps=0.5)
    want = torch.tensor([sum(_direct_rate(x[b].double() @ bases[h], 0.5) for h in range(2)) for b in range(3)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want)
    got_n = compression_term(x, bases, eps=0.5, normalize=True, per_head=True)
    w = x.double() @ bases[1]
    torch.testing.assert_close(got_n[:, 1], torch.tensor([_direct_rate(wi / wi.norm(dim=-1, keepdim=True), 0.5) for wi in w], dtype=torch.float64))

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    hf_attn = vit2cbsa.analysis.attention_layers(transformers.ViTModel(cfg))[0][1]
    hb = head_bases(hf_attn, which="value", orthonormalize=False)
    torch.testing.assert_close(hb[1], hf_attn.v_proj.weight.detach().double()[16:].T)


def test_representative_rate_matches_direct():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 13, 12, generator=gen)
    bases = torch.linalg.qr(torch.randn(3, 12, 4, generator=gen, dtype=torch.float64)).Q
    a = torch.softmax(torch.randn(2, 3, 5, 13, generator=gen), dim=-1)
    got = representative_rate(a, x, bases, per_head=True)
    want = torch.tensor([[_direct_rate(a[b, h].double() @ x[b].double() @ bases[h], 0.5) for h in range(3)]
                         for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- capture and maps


@pytest.mark.parametrize("variant", REPRESENTATIVE_VARIANTS)
@pytest.mark.parametrize("broadcast", ["key", "query", "transpose"])
def test_cbsa_maps_reproduce_mixer_output(variant, broadcast):
    # distilled DeiT: 2 prefix tokens; 40x24 input -> 10x6 patch grid; 4x8 representatives clamp to 4x6, and the
    # 2 prefix tokens are representatives too (26 in all), which they read back alone (prefix_broadcast="own")
    model = _randomise_mixers(vit2cbsa.convert(_tiny_timm(distilled=True), variant, (4, 8), broadcast=broadcast))
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(5))
    with AttentionCapture(model) as cap:
        cap.run(x)
    for rec in cap.records:
        assert rec.grid == (10, 6) and rec.prefix == 2
        maps = cbsa_maps(rec.module.mixer, rec.q, rec.k, rec.v, rec.grid)
        assert maps.A.shape == (2, 2, 26, 62) and maps.B.shape == (2, 2, 62, 26) and maps.rep_grid == (4, 6)
        assert maps.lead == 2 and torch.equal(maps.B[:, :, :2], torch.eye(2, 26).expand(2, 2, 2, 26))
        torch.testing.assert_close(maps.P[:, :, :2], rec.q[:, :, :2])  # the prefix queries themselves
        torch.testing.assert_close(maps.A.sum(-1), torch.ones(2, 2, 26))
        torch.testing.assert_close(maps.B.sum(-1), torch.ones(2, 2, 62))
        torch.testing.assert_close(maps.out, rec.mixer_out, rtol=1e-5, atol=1e-6)  # B @ C == the mixer's output
        e = attention_operator(rec)  # out = kappa E V
        torch.testing.assert_close(e @ rec.v * maps.kappa.view(1, -1, 1, 1), rec.mixer_out, rtol=1e-5, atol=1e-6)
        if maps.S is None:
            torch.testing.assert_close(e.sum(-1), torch.ones(2, 2, 62))  # row-stochastic without contraction
    # float64 end to end: agreement to rounding
    rec = cap.records[1]
    q, k, v = (t.double() for t in rec.qkv())
    layout = vit2cbsa.layout.TokenLayout(rec.grid)
    mixer = rec.module.mixer.double()
    torch.testing.assert_close(cbsa_maps(mixer, q, k, v, rec.grid).out, mixer(q, k, v, layout), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_analysed_through_its_mixer(variant):
    """Capture, the operator E, the per-layer maps and the coding rates of any registered variant, from what its
    mixer says of itself (its name, whether it uses representatives, its operator and maps)."""
    uses = VARIANTS[variant].uses_representatives
    model = _randomise_mixers(vit2cbsa.convert(_tiny_timm(), variant, 16, inplace=False))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    with AttentionCapture(model) as cap:
        cap.run(x)
    for rec in cap.records:
        assert rec.kind == rec.mixer.name == variant
        e = attention_operator(rec)
        assert e.shape == (2, 2, 65, 65)
        kappa = getattr(rec.mixer, "kappa", torch.ones(2)).detach().view(1, -1, 1, 1)
        torch.testing.assert_close(kappa * (e @ rec.v), rec.mixer_out, rtol=1e-5, atol=1e-6)
    maps, _ = explain(model, x, None)
    assert [(lm.kind, lm.converted, lm.has_representatives) for lm in maps] == [(variant, True, uses)] * 2
    assert all(lm.description == VARIANTS[variant].description for lm in maps)
    rates = layer_coding_rates(model, x)
    assert [r["kind"] for r in rates] == [variant] * 2
    assert [r["representatives"] is not None for r in rates] == [uses] * 2


def test_extraction_equals_pretrained_attention_when_every_patch_is_a_representative():
    """Independent check of A: with one representative per patch and unit temperature, the pooled queries
    are the patch queries, and the class token's query is representative 0 (extra_representatives="prefix"),
    so A is exactly the pretrained softmax attention of all tokens; and its class token, which reads back only
    its own representative, gets exactly the pretrained layer's output."""
    teacher = _tiny_timm()
    model = vit2cbsa.convert(teacher, "cbsa", 64, inplace=False)  # 8x8 representatives on the 8x8 grid
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with AttentionCapture(teacher, [0]) as ref, AttentionCapture(model, [0]) as cap:
        ref.run(x)
        cap.run(x)
    original = attention_operator(ref.records[0])  # softmax(s q k^T) of the original layer
    rec = cap.records[0]
    maps = cbsa_maps(rec.module.mixer, rec.q, rec.k, rec.v, (8, 8))
    torch.testing.assert_close(maps.A, original, rtol=1e-5, atol=1e-6)
    v = ref.records[0].qkv()[2]
    torch.testing.assert_close(maps.out[:, :, 0], (original @ v)[:, :, 0], rtol=1e-5, atol=1e-6)


def test_softmax_operator_reproduces_original_modules():
    import transformers

    timm_model = _tiny_timm()
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    torch.manual_seed(0)
    hf_model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for model, out_name in ((timm_model, "proj"), (hf_model, "o_proj")):
        outputs = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
                 for i, (_, m) in enumerate(vit2cbsa.analysis.attention_layers(model))]
        with AttentionCapture(model) as cap:
            cap.run(x)
        for h in hooks:
            h.remove()
        for rec in cap.records:
            e = attention_operator(rec)
            ctx = (e @ rec.v).transpose(1, 2).reshape(2, rec.x.shape[1], -1)
            torch.testing.assert_close(getattr(rec.module, out_name)(ctx), outputs[rec.index], rtol=1e-5, atol=1e-6)


def test_capture_leaves_no_trace_and_rejects_missing_layers():
    model = vit2cbsa.convert(_tiny_timm(), "cbsa", 16, inplace=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    with AttentionCapture(model, [-1]) as cap:
        during = cap.run(x)
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert [r.index for r in cap.records] == [1]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
               if m is not model.patch_embed.proj)
    assert len(model.patch_embed.proj._forward_hooks) == 1  # only convert's own grid recorder
    with pytest.raises(vit2cbsa.analysis.LayerError, match="layer 5 does not exist"):
        AttentionCapture(model, [5])


def test_layer_coding_rates_on_converted_and_original():
    teacher = _tiny_timm()
    model = vit2cbsa.convert(teacher, "cbsa", 16, inplace=False)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    orig = layer_coding_rates(teacher, x, batch_size=2)
    conv = layer_coding_rates(model, x, batch_size=2)
    assert [r["kind"] for r in orig] == ["softmax", "softmax"] and [r["kind"] for r in conv] == ["cbsa", "cbsa"]
    assert conv[0]["tokens"] == pytest.approx(orig[0]["tokens"], rel=1e-9)  # layer 0 sees the same tokens
    assert orig[0]["representatives"] is None and conv[0]["num_representatives"] == 17  # 4x4 + the class token
    # independent recomputation of layer 1's terms from a capture on the whole batch
    with AttentionCapture(model, [1]) as cap:
        cap.run(x)
    rec = cap.records[0]
    bases = head_bases(rec.module)
    a = cbsa_maps(rec.module.mixer, rec.q, rec.k, None, rec.grid).A
    xd = rec.x.double()
    want_tok = np.mean([sum(_direct_rate(xd[b] @ bases[h], 0.5) for h in range(2)) for b in range(5)])
    want_rep = np.mean([sum(_direct_rate(a[b, h].double() @ xd[b] @ bases[h], 0.5) for h in range(2)) for b in range(5)])
    assert conv[1]["tokens"] == pytest.approx(want_tok, rel=1e-9)
    assert conv[1]["representatives"] == pytest.approx(want_rep, rel=1e-9)
    assert 0 < conv[1]["representatives_normalized"] and 0 < conv[1]["tokens_normalized"]


def test_explain_maps_and_figure(tmp_path):
    teacher = _tiny_timm()
    model = vit2cbsa.convert(teacher, "cbsa", 16, inplace=False)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    maps, _ = explain(model, x, [0, 1])
    ref, _ = explain(teacher, x, [0, 1])
    lm = maps[1]
    assert lm.cls.shape == (2, 8, 8) and lm.gather.shape == (2, 17, 8, 8) and lm.broadcast.shape == (2, 8, 8, 17)
    assert [lm.rep_name(i) for i in (0, 1, 6, 16)] == ["cls", "r0,0", "r1,1", "r3,3"]
    assert (lm.cls_broadcast == np.eye(1, 17)).all()  # the class token reads only its own representative
    assert ref[1].gather is None and ref[1].cls.shape == (2, 8, 8)
    # class-token maps are probability mass over patches (class row minus its prefix part)
    assert (ref[1].cls.sum(axis=(1, 2)) <= 1 + 1e-6).all() and (lm.gather.sum(axis=(2, 3)) <= 1 + 1e-6).all()
    assert rep_window(5, (4, 4), (8, 8)) == (2, 4, 2, 4) and rep_window(0, (3, 3), (8, 8)) == (0, 3, 0, 3)
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    out = plot_explanation(image, maps, tmp_path / "maps.png", reference=ref, heads=[1], num_reps=2, title="t")
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 200


def test_preprocess_any_aspect_ratio():
    from PIL import Image

    img = Image.fromarray((np.arange(50 * 120 * 3) % 251).astype(np.uint8).reshape(50, 120, 3))
    x, pixels = preprocess(img, InputConfig((32, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert x.shape == (1, 3, 32, 48) and pixels.shape == (32, 48, 3)
    torch.testing.assert_close(x[0, :, 3, 5], (torch.from_numpy(pixels[3, 5]).float() / 255 - 0.5) / 0.25)


# --------------------------------------------------------------------------- robustness


def test_perturbation_is_relative_identical_across_conversion_and_restored():
    teacher = _tiny_timm(dim=64)
    model = vit2cbsa.convert(teacher, "cbsa", 16, inplace=False)
    names = [n for n, _ in attention_projection_weights(teacher)]
    assert names == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.1.attn.qkv.weight",
                     "blocks.1.attn.proj.weight"]
    assert names == [n for n, _ in attention_projection_weights(model)]
    clean = {n: p.detach().clone() for n, p in attention_projection_weights(teacher)}
    with perturbed(teacher, 0.3, seed=4):
        noise_t = {n: p.detach() - clean[n] for n, p in attention_projection_weights(teacher)}
        with perturbed(model, 0.3, seed=4):
            noise_m = {n: p.detach() - clean[n] for n, p in attention_projection_weights(model)}
    for n in names:
        torch.testing.assert_close(noise_t[n], noise_m[n], rtol=0, atol=0)  # same noise for both models
        blocks = 3 if n.endswith("qkv.weight") else 1
        for w, e in zip(clean[n].chunk(blocks), noise_t[n].chunk(blocks)):
            assert (e.norm() / w.norm()).item() == pytest.approx(0.3, rel=0.06)
    for n, p in attention_projection_weights(teacher):
        assert torch.equal(p, clean[n])  # restored exactly
    with perturbed(teacher, 0.3, seed=5):
        other = {n: p.detach() - clean[n] for n, p in attention_projection_weights(teacher)}
    assert not torch.equal(other[names[0]], noise_t[names[0]])
    with pytest.raises(RuntimeError), perturbed(teacher, 1.0):
        raise RuntimeError("boom")
    assert all(torch.equal(p, clean[n]) for n, p in attention_projection_weights(teacher))


def test_robustness_curve(tmp_path):
    model = _tiny_timm()
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        labels = model(x).argmax(-1)  # the clean model is right by construction
    res = robustness_curve(model, x, labels, scales=(0.0, 0.02, 3.0), seeds=(0, 1), batch_size=16)
    assert res["accuracy"][0] == [1.0, 1.0] and res["mean"][0] == 1.0
    assert res["mean"][2] < 0.9  # weights swamped by noise: predictions change
    assert res["mean"][1] >= res["mean"][2]
    out = plot_robustness({"original": res}, tmp_path / "rob.png", title="t")
    assert out.stat().st_size > 1000


# --------------------------------------------------------------------------- synthetic compression


def test_linear_cbsa_update_is_a_gradient_step_on_the_coding_rate():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    eps, step = 0.5, 0.3
    n, d = x.shape
    c = d / (n * eps ** 2)
    rate = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + c * x.T @ x)
    (grad,) = torch.autograd.grad(rate, x)
    torch.testing.assert_close(linear_cbsa_update(x.detach(), eps, step), -(step / c) * grad)


def test_synthetic_compression_lowers_the_coding_rate(tmp_path):
    x, labels, bases = union_of_subspaces(num_classes=3, dim=6, subspace_dim=2, per_class=60, noise=0.5, seed=0)
    x2, _, _ = union_of_subspaces(num_classes=3, dim=6, subspace_dim=2, per_class=60, noise=0.5, seed=0)
    assert torch.equal(x, x2)  # reproducible
    rec = compress_synthetic(x, labels, bases, steps=8, snapshots=(0, 8))
    rates, energy = rec["class_rate"], rec["off_subspace_energy"]
    assert all(b < a for a, b in zip(rates, rates[1:]))  # falls at every step
    assert rates[-1] < rates[0] - 1.0
    assert energy[-1] < 0.1 * energy[0]  # each class is compressed toward its own subspace
    # the classes stay apart (no collapse onto one subspace): the MCR^2 rate reduction grows
    delta = rec["rate_reduction"]
    assert delta[-1] > 1.5 * delta[0] > 0
    torch.testing.assert_close(torch.tensor(delta), torch.tensor(rec["total_rate"]) - torch.tensor(rates) / 3)
    final = rec["final"]
    torch.testing.assert_close(final.norm(dim=-1), torch.ones(len(final), dtype=torch.float64))
    assert off_subspace_energy(final, labels, bases) == pytest.approx(energy[-1])
    one = linear_cbsa_step(x, labels=None)  # one global group also runs (no labels)
    assert one.shape == x.shape
    x3, l3, b3 = union_of_subspaces(num_classes=2, dim=3, subspace_dim=1, per_class=20, seed=1)
    out = plot_synthetic(compress_synthetic(x3, l3, b3, steps=2, snapshots=(0, 2)), l3, tmp_path / "syn.png")
    assert out.stat().st_size > 1000


# --------------------------------------------------------------------------- the explain CLI


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    if not IMAGENET_TAR.is_file():
        pytest.skip(f"{IMAGENET_TAR} is absent")
    out = tmp_path_factory.mktemp("photos")
    with tarfile.open(IMAGENET_TAR) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".JPEG")), key=lambda m: m.name)[:2]
        for m in members:
            tar.extract(m, out, filter="data")
    paths = sorted(out.rglob("*.JPEG"))
    assert len(paths) == 2
    return paths


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=8, num_labels=4)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_vit")
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def test_cli_explains_real_photos_with_hf_model(photos, hf_dir, tmp_path, capsys):
    from PIL import Image

    for photo in photos:
        with Image.open(photo) as im:
            assert im.size[0] != im.size[1]  # real photos, not square
    out = tmp_path / "maps.png"
    assert explain_main([str(hf_dir) + ":cbsa", str(photos[0]), "--layer", "0,-1", "--representatives", "16",
                         "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[1] > 600  # 2 layers x 2 heads = 4 rows
    assert "0:cbsa, 2:cbsa" in capsys.readouterr().out
    assert explain_main([str(hf_dir), str(photos[1]), "--layer", "1:", "--heads", "1",
                         "--out", str(tmp_path / "orig.png")]) == 0
    printed = capsys.readouterr().out
    assert "saved" in printed and "1:softmax, 2:softmax" in printed
    assert (tmp_path / "orig.png").stat().st_size > 10_000


def test_cli_timm_name_falls_back_to_random_weights(photos, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "timm.png"
    assert explain_main(["test_vit:contraction_free", str(photos[1]), "--heads", "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "5:contraction_free" in captured.out
    assert out.stat().st_size > 10_000


def test_cli_errors(photos, hf_dir, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a JPEG")
    assert explain_main([str(hf_dir), str(bad), "--out", str(tmp_path / "x.png")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert explain_main([str(hf_dir), str(tmp_path / "missing.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert explain_main([str(hf_dir), str(photos[0]), "--layer", "7", "--out", str(tmp_path / "x.png")]) == 1
    assert "layer 7 does not exist: the model has 3 attention layers" in capsys.readouterr().err
    assert explain_main([str(hf_dir) + ":nonsense", str(photos[0])]) == 1
    assert "unknown variant" in capsys.readouterr().err
    assert explain_main([str(hf_dir), str(photos[0]), "--heads", "5", "--out", str(tmp_path / "x.png")]) == 1
    assert "head 5 does not exist" in capsys.readouterr().err
    assert explain_main([]) == 2  # usage error
    assert not (tmp_path / "x.png").exists()


def test_cli_cifar10_teacher(photos, tmp_path):
    from vit2cbsa.zoo import TEACHER_DIR

    if not (TEACHER_DIR / "model.safetensors").is_file():
        pytest.skip("the embedded CIFAR-10 teacher is not trained yet")
    out = tmp_path / "teacher.png"
    assert explain_main(["cifar10-teacher:cbsa", str(photos[0]), "--representatives", "16", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_cli_explains_a_saved_converted_folder(photos, tmp_path, capsys):
    hub = pytest.importorskip("vit2cbsa.hub")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=5)
    vit2cbsa.convert(model, "contraction_free", 16)
    folder = hub.save_pretrained(model, tmp_path / "converted")
    out = tmp_path / "saved.png"
    assert explain_main([str(folder), str(photos[0]), "--layer", "all", "--out", str(out)]) == 0
    assert "0:contraction_free, 1:contraction_free; grid 8x8" in capsys.readouterr().out
    assert out.stat().st_size > 10_000
    assert explain_main([str(folder) + ":cbsa", str(photos[0])]) == 1  # already converted
    assert "already converted" in capsys.readouterr().err
