"""Property-based tests (hypothesis): drawn patch grids, prefix-token counts, representative grids and variants.

* every mixer's output (and, in training, every gradient) is finite, for any patch grid ``h, w`` in
  1..8, 0..5 prefix tokens, any representative grid (also larger than the patch grid), variant,
  broadcast, extra representatives, prefix read-back, learnable parameters away from their init and
  query/key magnitudes from tiny to large;
* every registered variant's output is ``kappa E V`` with ``E`` its own ``operator(q, k)`` (the operator
  analysis shows is the one the mixer computes);
* the representatives ``P`` the mixer computes are, independently of the prefix tokens, the adaptive
  average pooling of the patch queries (computed here with ``adaptive_avg_pool2d``), and each prefix
  representative is that token's own query: perturbing the prefix queries changes only their rows;
* with the default design at conversion, each prefix token's output is its softmax attention output;
* a converted tiny timm model round-trips through ``save_pretrained`` / ``from_pretrained`` exactly:
  same state dict (names, dtypes, bits), same conversion, bit-identical outputs.

Sizes are tiny and ``max_examples`` small so the file runs in well under a minute on one core.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vit2cbsa  # noqa: E402
from vit2cbsa.attention import BROADCASTS, PREFIX_BROADCASTS, VARIANTS, build_mixer  # noqa: E402
from vit2cbsa.layout import EXTRA_REPRESENTATIVES, TokenLayout  # noqa: E402
from vit2cbsa.pooling import effective_grid, extra_parts

#: the registered variants that mix through representatives
REPRESENTATIVE_VARIANTS = tuple(sorted(name for name, cls in VARIANTS.items() if cls.uses_representatives))
# no example database: it would be written into the working tree (.hypothesis/); failures print the example
FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

grids = st.tuples(st.integers(1, 8), st.integers(1, 8))
rep_grids = st.tuples(st.integers(1, 9), st.integers(1, 9))  # 9 > 8: clamped to the patch grid


@st.composite
def mixer_cases(draw, variants=tuple(sorted(VARIANTS))):
    return dict(
        grid=draw(grids),
        prefix=draw(st.integers(0, 5)),
        rep_grid=draw(rep_grids),
        variant=draw(st.sampled_from(variants)),
        broadcast=draw(st.sampled_from(BROADCASTS)),
        extra=draw(st.sampled_from(EXTRA_REPRESENTATIVES)),
        prefix_broadcast=draw(st.sampled_from(PREFIX_BROADCASTS)),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([1, 2, 8])),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _mixer(case):
    return build_mixer(case["variant"], case["heads"], case["head_dim"], case["rep_grid"], case["broadcast"],
                       extra_representatives=case["extra"], prefix_broadcast=case["prefix_broadcast"])


def _qkv(case, gen, dtype=torch.float32, magnitude=1.0):
    h, w = case["grid"]
    n = case["prefix"] + h * w
    shape = (case["batch"], case["heads"], n, case["head_dim"])
    return [magnitude * torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3)]


def _randomise(mixer, gen):
    """Move every learnable parameter away from its init (temperatures within e^-2..e^2)."""
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name == "log_temperature":
                p.copy_(noise.clamp(-2, 2))
            else:
                p.add_(0.5 * noise)


@FAST
@given(case=mixer_cases(), magnitude=st.sampled_from([1e-3, 1.0, 10.0, 30.0]), train=st.booleans())
def test_mixer_output_and_gradients_are_finite(case, magnitude, train):
    gen = torch.Generator().manual_seed(case["seed"])
    mixer = _mixer(case)
    _randomise(mixer, gen)
    q, k, v = _qkv(case, gen, magnitude=magnitude)
    layout = TokenLayout(case["grid"])
    if train:
        for t in (q, k, v):
            t.requires_grad_(True)
        out = mixer(q, k, v, layout)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        grads = {"q": q.grad, "k": k.grad, "v": v.grad, **{n: p.grad for n, p in mixer.named_parameters()}}
        bad = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
        assert not bad, f"non-finite or missing gradients: {bad}"
    else:
        with torch.no_grad():
            out = mixer(q, k, v, layout)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()


@FAST
@given(case=mixer_cases())
def test_every_mixer_is_kappa_times_its_operator_on_the_values(case):
    gen = torch.Generator().manual_seed(case["seed"])
    mixer = _mixer(case).double()
    _randomise(mixer, gen)
    q, k, v = _qkv(case, gen, dtype=torch.float64)
    layout = TokenLayout(case["grid"])
    with torch.no_grad():
        out = mixer(q, k, v, layout)
    e = mixer.operator(q, k, layout)
    n = q.shape[-2]
    assert e.shape == (case["batch"], case["heads"], n, n)
    kappa = getattr(mixer, "kappa", None)  # the per-head step, 1 for a mixer without one
    kappa = 1.0 if kappa is None else kappa.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(kappa * (e @ v), out, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", REPRESENTATIVE_VARIANTS)
def test_transpose_broadcast_gradient_of_a_token_no_representative_reads(variant):
    """Found by the property above: one prefix token, one patch; the only representative (the patch's
    query) gives the prefix token weight exp(-200), which float32 rounds to 0. A^T / (A^T 1) is then
    exactly 1 for that token (its only representative), and its gradients must be finite; dividing the
    rounded A^T by its row sum clamped to `tiny` gave the token 0 and NaN gradients (0 * inf)."""
    mixer = build_mixer(variant, 1, 1, (1, 1), "transpose", extra_representatives="none")
    q = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).requires_grad_(True)
    k = torch.tensor([-100.0, 100.0]).view(1, 1, 2, 1).requires_grad_(True)
    v = torch.tensor([300.0, -200.0]).view(1, 1, 2, 1).requires_grad_(True)
    out = mixer(q, k, v, TokenLayout((1, 1)))
    # one representative: every token's broadcast row is [1], so both tokens receive the same C
    assert torch.isfinite(out).all() and out[0, 0, 0, 0] == out[0, 0, 1, 0] != 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _pool_reference(patches: torch.Tensor, h: int, w: int, rep_grid) -> torch.Tensor:
    """``B x H x hw x d`` patches -> ``B x H x (gh gw) x d`` by ``adaptive_avg_pool2d`` on the grid."""
    b, nh, _, d = patches.shape
    img = patches.reshape(b * nh, h, w, d).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(img, effective_grid(rep_grid, h, w))
    return pooled.flatten(2).transpose(1, 2).reshape(b, nh, -1, d)


@FAST
@given(case=mixer_cases(variants=REPRESENTATIVE_VARIANTS), perturbation=st.sampled_from([1e-3, 1.0, 1e3, 1e6]))
def test_representatives_ignore_prefix_tokens_and_prefix_representatives_are_their_queries(case, perturbation):
    gen = torch.Generator().manual_seed(case["seed"])
    mixer = _mixer(case).double()
    _randomise(mixer, gen)
    q, k, v = _qkv(case, gen, dtype=torch.float64)
    t, (h, w) = case["prefix"], case["grid"]
    q2 = q.clone()
    q2[:, :, :t] = perturbation * torch.randn(q2[:, :, :t].shape, generator=gen, dtype=q.dtype)
    layout = TokenLayout(case["grid"])
    p1 = mixer.maps(q, k, v, layout).P  # the representatives of the mixer's own forward steps
    p2 = mixer.maps(q2, k, v, layout).P
    lead, glob = extra_parts(case["extra"], t)
    gh, gw = effective_grid(case["rep_grid"], h, w)
    pooled = slice(lead, lead + gh * gw)
    assert p1.shape == (case["batch"], case["heads"], lead + gh * gw + int(glob), case["head_dim"])
    # the pooled grid (and the global representative) are functions of the patch queries alone ...
    assert torch.equal(p1[:, :, lead:], p2[:, :, lead:])
    # ... namely their adaptive average pooling (and their mean)
    torch.testing.assert_close(p1[:, :, pooled], _pool_reference(q[:, :, t:], h, w, case["rep_grid"]),
                               rtol=1e-12, atol=1e-12)
    if glob:
        torch.testing.assert_close(p1[:, :, -1], q[:, :, t:].mean(dim=2), rtol=1e-12, atol=1e-12)
    # each prefix representative is its own token's query, exactly
    assert torch.equal(p1[:, :, :lead], q[:, :, :lead])
    assert torch.equal(p2[:, :, :lead], q2[:, :, :lead])


@FAST
@given(case=mixer_cases(variants=REPRESENTATIVE_VARIANTS))
def test_prefix_tokens_keep_their_softmax_attention_at_conversion(case):
    """Default design (prefix representatives, own read-back), parameters at init: prefix token ``i``
    gets ``softmax(s q_i K^T) V`` exactly as the pretrained layer would, for any grid and broadcast."""
    case = {**case, "extra": "prefix", "prefix_broadcast": "own"}
    gen = torch.Generator().manual_seed(case["seed"])
    mixer = _mixer(case).double()
    q, k, v = _qkv(case, gen, dtype=torch.float64)
    t = case["prefix"]
    with torch.no_grad():
        out = mixer(q, k, v, TokenLayout(case["grid"]))
    scale = case["head_dim"] ** -0.5
    want = torch.softmax(scale * q[:, :, :t] @ k.transpose(-2, -1), dim=-1) @ v
    torch.testing.assert_close(out[:, :, :t], want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- save / load round trip


@st.composite
def timm_cases(draw):
    class_token = draw(st.booleans())
    return dict(
        grid=draw(grids),
        class_token=class_token,
        reg_tokens=draw(st.integers(0, 5 - int(class_token))),  # 0..5 prefix tokens in all
        no_embed_class=draw(st.booleans()),
        dynamic=draw(st.booleans()),
        variant=draw(st.sampled_from(sorted(VARIANTS))),
        rep_grid=draw(rep_grids),
        broadcast=draw(st.sampled_from(BROADCASTS)),
        extra=draw(st.sampled_from(EXTRA_REPRESENTATIVES)),
        prefix_broadcast=draw(st.sampled_from(PREFIX_BROADCASTS)),
        layers=draw(st.sampled_from([None, 0, [-1], slice(1, None)])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


PATCH = 4


def _tiny_timm(case):
    import timm

    h, w = case["grid"]
    torch.manual_seed(case["seed"])
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=(h * PATCH, w * PATCH), patch_size=PATCH, embed_dim=16,
        depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3, class_token=case["class_token"],
        reg_tokens=case["reg_tokens"], no_embed_class=case["no_embed_class"],
        global_pool="token" if case["class_token"] else "avg", dynamic_img_size=case["dynamic"],
    )


@pytest.mark.filterwarnings("ignore:.*representatives are not fewer than")  # grids above the patch grid: on purpose
@SLOW
@given(case=timm_cases())
def test_save_and_load_round_trip_is_exact(case):
    model = _tiny_timm(case)
    vit2cbsa.convert(model, case["variant"], case["rep_grid"], case["layers"], broadcast=case["broadcast"],
                     extra_representatives=case["extra"], prefix_broadcast=case["prefix_broadcast"])
    gen = torch.Generator().manual_seed(case["seed"])
    for p in vit2cbsa.new_parameters(model):  # saved values, not the init, must come back
        with torch.no_grad():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model = model.to(case["dtype"]).eval()
    h, w = case["grid"]
    assert model.num_prefix_tokens == int(case["class_token"]) + case["reg_tokens"]
    with tempfile.TemporaryDirectory(prefix="vit2cbsa-prop-") as tmp:
        folder = vit2cbsa.save_pretrained(model, Path(tmp) / "saved")
        loaded = vit2cbsa.from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.vit2cbsa_info.config == model.vit2cbsa_info.config
    assert loaded.vit2cbsa_info.converted_indices == model.vit2cbsa_info.converted_indices
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert list(theirs) == list(mine)
    for name, tensor in mine.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    sizes = [(h * PATCH, w * PATCH)] + ([((h % 8 + 1) * PATCH, ((w + 3) % 8 + 1) * PATCH)] if case["dynamic"] else [])
    for size in sizes:
        x = torch.randn(2, 3, *size, generator=gen).to(case["dtype"])
        with torch.no_grad():
            a, b = model(x), loaded(x)
        assert a.shape == (2, 3) and torch.isfinite(a.float()).all()
        assert torch.equal(a, b), f"outputs differ at {size}: max |diff| {(a.float() - b.float()).abs().max()}"
