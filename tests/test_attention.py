"""Variant modules against straightforward per-head references written independently here; the variant
registry (every registered variant builds, and its ``operator`` / ``maps`` reproduce its forward pass), and a
toy variant registered here that converts a model and is analysed through its own ``operator``."""

from __future__ import annotations

import pytest
import torch

from vit2cbsa.attention import (
    CBSA,
    VARIANTS,
    CBSAMixer,
    ContractionFreeMixer,
    LinearMixer,
    Mixer,
    build_mixer,
    register_variant,
    unregister_variant,
    variant_uses_representatives,
)
from vit2cbsa.attention.cbsa_explicit import ExplicitCBSA, Geometry
from vit2cbsa.errors import UnsupportedModelError, UsageError
from vit2cbsa.layout import TokenLayout

torch.manual_seed(0)
B, H, D, PREFIX, GH, GW = 2, 3, 8, 2, 6, 4


def _qkv(n):
    """Strided views of one fused projection, as the adapters pass them."""
    return list(torch.randn(B, n, 3, H, D, dtype=torch.float64).permute(2, 0, 3, 1, 4).unbind(0))


def _pool_by_hand(t, prefix, h, w, rh, rw):
    """Mean over (h/rh x w/rw) blocks of the patch tokens, row-major; ``t``: (N, d)."""
    grid = t[prefix:].reshape(h, w, -1)
    reps = [grid[i * h // rh:(i + 1) * h // rh, j * w // rw:(j + 1) * w // rw].reshape(-1, t.shape[-1]).mean(0)
            for i in range(rh) for j in range(rw)]
    return torch.stack(reps)


# (extra_representatives, prefix_broadcast) pairs the mixers are checked with
EXTRAS = [("none", "all"), ("prefix", "all"), ("prefix", "own"), ("global", "all")]


def _reference_mixer(q, k, v, kappa, gamma, ta, tb, broadcast, rh, rw, extra="none", prefix_broadcast="all"):
    s = D ** -0.5
    out = torch.empty_like(q)
    for b in range(B):
        for hd in range(H):
            Q, K, V = q[b, hd], k[b, hd], v[b, hd]
            P = _pool_by_hand(Q, PREFIX, GH, GW, rh, rw)
            if extra == "prefix":  # each prefix token's query first
                P = torch.cat([Q[:PREFIX], P])
            elif extra == "global":  # the mean of all patch queries last
                P = torch.cat([P, Q[PREFIX:].mean(0, keepdim=True)])
            A = torch.softmax(s * ta[hd] * P @ K.T, dim=1)
            Kr, Vr = A @ K, A @ V
            C = Vr + gamma[hd] * torch.softmax(s * ta[hd] * P @ Kr.T, dim=1) @ Vr
            if broadcast == "key":
                Bm = torch.softmax(s * tb[hd] * Q @ Kr.T, dim=1)
            elif broadcast == "query":
                Bm = torch.softmax(s * tb[hd] * Q @ P.T, dim=1)
            else:
                Bm = A.T / A.T.sum(dim=1, keepdim=True)
            if extra == "prefix" and prefix_broadcast == "own":
                Bm = Bm.clone()
                for i in range(PREFIX):  # prefix token i reads only representative i (itself)
                    Bm[i] = 0
                    Bm[i, i] = 1
            out[b, hd] = kappa[hd] * Bm @ C
    return out


@pytest.mark.parametrize("extra", EXTRAS, ids=["-".join(e) for e in EXTRAS])
@pytest.mark.parametrize("broadcast", ["key", "query", "transpose"])
@pytest.mark.parametrize("cls", [CBSAMixer, ContractionFreeMixer])
def test_cbsa_mixer_matches_reference(cls, broadcast, extra):
    n = PREFIX + GH * GW
    q, k, v = _qkv(n)
    mixer = cls(H, D, (3, 2), broadcast=broadcast, extra_representatives=extra[0], prefix_broadcast=extra[1]).double()
    with torch.no_grad():
        mixer.kappa.copy_(torch.tensor([1.0, -0.5, 2.0]))
        mixer.log_temperature.copy_(torch.tensor([[0.2, -0.3, 0.5], [-0.4, 0.1, 0.3]]))
        if mixer.contraction:
            mixer.gamma.copy_(torch.tensor([0.3, -1.2, 0.7]))
    gamma = mixer.gamma if mixer.contraction else torch.zeros(H)
    ta, tb = mixer.log_temperature.detach().exp()
    ref = _reference_mixer(q, k, v, mixer.kappa.detach(), gamma.detach(), ta, tb, broadcast, 3, 2, *extra)
    out = mixer(q, k, v, TokenLayout((GH, GW)))  # with a graph: hand-written backward (or autograd)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():  # inference
        torch.testing.assert_close(mixer(q, k, v, TokenLayout((GH, GW))), ref)


def test_zero_contraction_gate_equals_contraction_free():
    n = PREFIX + GH * GW
    q, k, v = _qkv(n)
    layout = TokenLayout((GH, GW))
    full, free = CBSAMixer(H, D, (2, 2)).double(), ContractionFreeMixer(H, D, (2, 2)).double()
    torch.testing.assert_close(full(q, k, v, layout), free(q, k, v, layout))
    with torch.no_grad():
        full.gamma.fill_(0.5)
    assert (full(q, k, v, layout) - free(q, k, v, layout)).abs().max() > 1e-3


def test_linear_mixer_matches_quadratic_kernel_form():
    n = 17
    q, k, v = _qkv(n)
    mixer = LinearMixer(H, D).double()
    with torch.no_grad():
        mixer.feature_map.add_(0.1 * torch.randn_like(mixer.feature_map))
        mixer.kappa.copy_(torch.tensor([1.0, 2.0, -1.0]))
    out = mixer(q, k, v)
    ref = torch.empty_like(q)
    for b in range(B):
        for hd in range(H):
            F_ = mixer.feature_map[hd].detach()
            phi = lambda x: torch.nn.functional.elu(x @ F_) + 1
            kern = phi(q[b, hd]) @ phi(k[b, hd]).T  # N x N, materialised on purpose
            ref[b, hd] = mixer.kappa[hd].detach() * (kern / kern.sum(1, keepdim=True)) @ v[b, hd]
    torch.testing.assert_close(out, ref)


def test_pure_cbsa_with_tokens_as_representatives_is_mssa():
    torch.manual_seed(1)
    dim, heads, n = 12, 3, 10
    layer = CBSA(dim, heads, num_representatives=4).double()
    with torch.no_grad():
        layer.kappa.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(2, n, dim, dtype=torch.float64)
    out = layer(x, coefficients=torch.eye(n, dtype=torch.float64))
    # MSSA, written out: dX_k = kappa_k softmax(W_k W_k^T / sqrt(p)) W_k, W_k = X U_k
    p = dim // heads
    U = layer.subspaces.weight.detach().T  # D x D, columns [U_1 | U_2 | U_3]
    parts = []
    for kh in range(heads):
        W = x @ U[:, kh * p:(kh + 1) * p]
        parts.append(layer.kappa[kh].detach() * torch.softmax(W @ W.transpose(1, 2) / p ** 0.5, dim=-1) @ W)
    ref = torch.cat(parts, dim=-1) @ layer.out.weight.detach().T + layer.out.bias.detach()
    torch.testing.assert_close(out, ref)


def test_pure_cbsa_full_step_matches_equations():
    torch.manual_seed(2)
    dim, heads, h, w, prefix = 8, 2, 4, 4, 1
    layer = CBSA(dim, heads, num_representatives=(2, 2), eta=0.7, kappa=1.3).double()
    x = torch.randn(1, prefix + h * w, dim, dtype=torch.float64, requires_grad=True)
    out = layer(x, grid=(h, w))
    p = dim // heads
    U = layer.subspaces.weight.detach().T
    parts = []
    for kh in range(heads):
        W = x[0] @ U[:, kh * p:(kh + 1) * p]
        P = _pool_by_hand(W, prefix, h, w, 2, 2)
        A = torch.softmax(P @ W.T / p ** 0.5, dim=1)
        R = P + 0.7 * A @ W
        C = torch.softmax(R @ R.T / p ** 0.5, dim=1) @ R
        parts.append(1.3 * A.T @ C)
    ref = torch.cat(parts, dim=-1) @ layer.out.weight.detach().T + layer.out.bias.detach()
    torch.testing.assert_close(out[0], ref)
    out.sum().backward()  # stop-gradient on P: gradient still flows through extraction
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pure_cbsa_needs_grid():
    layer = CBSA(8, 2)
    with pytest.raises(ValueError, match="grid"):
        layer(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="divisible"):
        CBSA(10, 3)


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while running ``fn`` (each storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("extra", EXTRAS, ids=["-".join(e) for e in EXTRAS])
@pytest.mark.parametrize("broadcast", ["key", "query"])
@pytest.mark.parametrize("cls", [CBSAMixer, ContractionFreeMixer])
def test_training_gradients_match_reference_with_and_without_recompute(cls, broadcast, extra):
    n = PREFIX + GH * GW
    q0, k0, v0 = _qkv(n)
    for rep in ((3, 2), (6, 4)):
        grads = []
        for recompute in (True, False, "reference"):
            torch.manual_seed(5)
            mixer = cls(H, D, rep, broadcast=broadcast, extra_representatives=extra[0],
                        prefix_broadcast=extra[1]).double()
            with torch.no_grad():
                mixer.kappa.copy_(torch.tensor([1.0, -0.5, 2.0]))
                mixer.log_temperature.copy_(torch.tensor([[0.2, -0.3, 0.5], [-0.4, 0.1, 0.3]]))
                if mixer.contraction:
                    mixer.gamma.copy_(torch.tensor([0.3, -1.2, 0.7]))
            q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
            if recompute == "reference":
                ta, tb = mixer.log_temperature.exp()
                gamma = mixer.gamma if mixer.contraction else torch.zeros(H, dtype=torch.float64)
                out = _reference_mixer(q, k, v, mixer.kappa, gamma, ta, tb, broadcast, *rep, *extra)
            else:
                mixer.recompute = recompute
                out = mixer(q, k, v, TokenLayout((GH, GW)))
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            grads.append([q.grad, k.grad, v.grad] + [p.grad for p in mixer.parameters()])
        for got in grads[:2]:
            for g, r in zip(got, grads[2]):
                torch.testing.assert_close(g, r)


@pytest.mark.parametrize("extra", EXTRAS, ids=["-".join(e) for e in EXTRAS])
@pytest.mark.parametrize("grid", [(4, 4), (5, 3)])  # equal and unequal pooling windows
@pytest.mark.parametrize("broadcast", ["key", "query"])
@pytest.mark.parametrize("contraction", [True, False])
def test_hand_written_backward_passes_gradcheck(grid, broadcast, contraction, extra):
    """Finite differences, independent of the derivation, for every input and both memory modes."""
    b, nh, d, prefix = 2, 2, 3, 2
    n = prefix + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(b, n, 3, nh, d, dtype=torch.float64, generator=gen, requires_grad=True)
    t0, t1, gamma, kappa = (torch.randn(nh, dtype=torch.float64, generator=gen, requires_grad=True)
                            for _ in range(4))
    for recompute in (True, False):
        def fn(fused, t0, t1, gamma, kappa):
            q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)  # strided heads, as the adapters pass them
            geo = Geometry(prefix, *grid, (2, 2), broadcast, extra[0], extra[1] == "own")
            return ExplicitCBSA.apply(q, k, v, t0, t1, gamma if contraction else None, kappa, geo, recompute)
        assert torch.autograd.gradcheck(fn, (fused, t0, t1, gamma, kappa))


def test_recompute_keeps_only_q_k_v():
    n = PREFIX + GH * GW
    q, k, v = (t.requires_grad_(True) for t in _qkv(n))
    layout = TokenLayout((GH, GW))
    mixer = CBSAMixer(H, D, (3, 2)).double()
    m, per_matrix = 6, B * H * 6 * D * 8  # bytes of one B x H x m x d tensor
    _, kept = _saved_bytes(lambda: mixer(q, k, v, layout))
    mixer.recompute = False
    _, kept_without = _saved_bytes(lambda: mixer(q, k, v, layout))
    assert 3 * q.nbytes <= kept <= 3 * q.nbytes + 8 * B * H * 8  # q, k, v and a few numbers per head
    assert kept_without >= kept + 2 * B * H * m * n * 8 + 5 * per_matrix  # + A, B and m x d tensors


@pytest.mark.parametrize("recompute", [True, False])
def test_training_under_bf16_autocast_matches_float32(recompute):
    """Mixed precision: the qkv projection runs in bf16 under autocast; the mixer follows q's dtype."""
    torch.manual_seed(7)
    proj = torch.nn.Linear(16, 3 * 16)
    mixer = CBSAMixer(2, 8, (2, 2))
    mixer.recompute = recompute
    x = torch.randn(2, 1 + 4 * 4, 16)
    layout = TokenLayout((4, 4))
    grads = []
    for autocast in (False, True):
        proj.zero_grad()
        mixer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            q, k, v = proj(x).view(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            out = mixer(q, k, v, layout)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(torch.cat([proj.weight.grad.flatten(), mixer.kappa.grad, mixer.gamma.grad,
                                mixer.log_temperature.grad.flatten()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert torch.isfinite(grads[1]).all() and cos > 0.99


# --------------------------------------------------------------------------- the registry


def _built(variant, broadcast="key"):
    """``variant``'s mixer as convert builds it (default design), in float64, parameters away from their init."""
    torch.manual_seed(4)
    mixer = build_mixer(variant, H, D, (3, 2), broadcast, extra_representatives="prefix", prefix_broadcast="own")
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mixer.double()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_registered_variant_builds_and_describes_itself(variant):
    mixer = build_mixer(variant, H, D, (3, 2), "query", scale=0.3, extra_representatives="global")
    cls = VARIANTS[variant]
    assert type(mixer) is cls and isinstance(mixer, Mixer) and mixer.name == variant
    assert variant_uses_representatives(variant) is cls.uses_representatives
    assert mixer.description and mixer.formula
    if cls.uses_representatives:  # every option reaches a representative mixer
        assert (mixer.rep_grid, mixer.broadcast, mixer.scale, mixer.extra_representatives) == ((3, 2), "query", 0.3,
                                                                                                "global")


@pytest.mark.parametrize("broadcast", ["key", "transpose"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_operator_and_maps_are_the_mixers_own_forward_steps(variant, broadcast):
    """``forward == kappa E V`` with ``E = operator(q, k)``; representative variants' maps give the same ``E``
    and output, with stochastic ``A`` and ``B``; the others have no maps (a one-line TypeError)."""
    n = PREFIX + GH * GW
    q, k, v = _qkv(n)
    layout = TokenLayout((GH, GW))
    mixer = _built(variant, broadcast)
    with torch.no_grad():
        out = mixer(q, k, v, layout)
    e = mixer.operator(q, k, layout)
    assert e.shape == (B, H, n, n) and not e.requires_grad
    kappa = getattr(mixer, "kappa", None)  # the per-head step, 1 for a mixer without one
    torch.testing.assert_close((1.0 if kappa is None else kappa.detach().view(1, -1, 1, 1)) * (e @ v), out)
    if mixer.uses_representatives:
        maps = mixer.maps(q, k, v, layout)
        m = PREFIX + 3 * 2
        assert maps.A.shape == (B, H, m, n) and maps.B.shape == (B, H, n, m) and maps.lead == PREFIX
        torch.testing.assert_close(maps.out, out)
        torch.testing.assert_close(maps.operator(), e)
        torch.testing.assert_close(maps.A.sum(-1), torch.ones(B, H, m, dtype=torch.float64))
        torch.testing.assert_close(maps.B.sum(-1), torch.ones(B, H, n, dtype=torch.float64))
        assert (maps.S is None) == (maps.gamma is None)
    else:
        with pytest.raises(UnsupportedModelError, match="no representatives") as err:
            mixer.maps(q, k, v, layout)
        assert isinstance(err.value, TypeError) and "\n" not in str(err.value)


def test_register_variant_refuses_nameless_duplicate_and_foreign_classes():
    class Nameless(Mixer):
        pass

    class SameName(CBSAMixer):  # inherits name "cbsa"
        pass

    class Spaced(Mixer):
        name = "two words"

    before = dict(VARIANTS)
    for cls, match in ((Nameless, "no variant name"), (Spaced, "no variant name"), (SameName, "already registered"),
                       (torch.nn.Linear, "Mixer subclass")):
        with pytest.raises(UsageError, match=match):
            register_variant(cls)
    for call in (lambda: build_mixer("nonsense", H, D, (2, 2), "key"), lambda: unregister_variant("nonsense"),
                 lambda: variant_uses_representatives("nonsense")):
        with pytest.raises(UsageError, match=r"unknown variant 'nonsense'; choose one of \['cbsa'"):
            call()
    assert VARIANTS == before


class MeanOfValues(Mixer):
    """A toy variant: every token receives the mean of the values, ``E = 1 1^T / N``."""

    name = "toy_mean"
    description = "mean of the values"
    formula = "E = 11^T/N"

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, q, k, v, layout):
        return v.mean(dim=-2, keepdim=True).expand_as(v)

    def operator(self, q, k, layout):
        n = q.shape[-2]
        return q.new_full((*q.shape[:-1], n), 1.0 / n)


def test_a_registered_toy_variant_converts_a_model_and_is_analysed_through_its_operator():
    import timm

    import vit2cbsa
    from vit2cbsa.analysis import AttentionCapture, attention_operator, explain

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert register_variant(MeanOfValues) is MeanOfValues
    try:
        assert not variant_uses_representatives("toy_mean")
        converted = vit2cbsa.convert(model, "toy_mean", layers=[-1], inplace=False)
        assert isinstance(converted.blocks[1].attn.mixer, MeanOfValues)
        assert type(converted.blocks[0].attn) is type(model.blocks[0].attn)  # layers=[-1]: only the last
        with AttentionCapture(converted, "all") as cap:
            logits = cap.run(x)
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()
        original, rec = cap.records
        assert (original.kind, rec.kind) == ("softmax", "toy_mean")
        e = attention_operator(rec)  # through MeanOfValues.operator
        torch.testing.assert_close(e @ rec.v, rec.mixer_out)
        maps, _ = explain(converted, x, [-1])
        assert (maps[0].kind, maps[0].description, maps[0].formula) == ("toy_mean", "mean of the values", "E = 11^T/N")
        assert maps[0].converted and not maps[0].has_representatives
        assert maps[0].cls.shape == (2, 4, 4) and maps[0].cls.sum(axis=(1, 2)) == pytest.approx([16 / 17] * 2)
    finally:
        assert unregister_variant("toy_mean") is MeanOfValues
    assert "toy_mean" not in VARIANTS
    with pytest.raises(ValueError, match="unknown variant 'toy_mean'"):
        vit2cbsa.convert(model, "toy_mean", inplace=False)
