"""The multiscale (dense-features) and window variants against an independent float64 computation.

The reference below forms, for every patch token, the groups the module docstring of vit2cbsa.attention.multiscale
states (prefix keys alone, f x f cells in the 3 x 3 windows around the token's window, each far cell counted by its
keys outside them) by looping over the keys one by one, then averages keys and values per group (a far cell over all
its keys) and takes one softmax with the log-size bias: no code of the mixer is used.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vit2cbsa
from vit2cbsa.attention import MultiscaleMixer, WindowMixer, build_mixer
from vit2cbsa.config import PRESETS, ConversionConfig
from vit2cbsa.errors import UsageError
from vit2cbsa.layout import TokenLayout
from vit2cbsa.measure import count_flops

from conftest import FAMILIES

FAMILY = {f.name: f for f in FAMILIES}


def reference(q, k, v, t, h, w, window, fine, far_grid, kappa, beta, halo=1, far=True, scale=None):
    """``out`` of the module docstring, key by key (float64)."""
    B, H, N, d = q.shape
    s = scale if scale is not None else d ** -0.5
    gh, gw = min(far_grid[0], h), min(far_grid[1], w)

    def far_cell(y, x):  # cells [floor(r h / gh), floor((r+1) h / gh))
        return (max(r for r in range(gh) if (r * h) // gh <= y), max(c for c in range(gw) if (c * w) // gw <= x))

    out = torch.zeros_like(v)
    for bi in range(B):
        for hh in range(H):
            for i in range(N):
                if i < t:
                    out[bi, hh, i] = torch.softmax(s * q[bi, hh, i] @ k[bi, hh].T, -1) @ v[bi, hh]
                    continue
                y, x = divmod(i - t, w)
                groups = {}
                for j in range(N):
                    if j < t:
                        groups[("prefix", j)] = [j]
                        continue
                    yy, xx = divmod(j - t, w)
                    if abs(yy // window - y // window) <= halo and abs(xx // window - x // window) <= halo:
                        groups.setdefault(("near", yy // fine, xx // fine), []).append(j)
                    elif far:  # counted here, represented by the whole cell's means
                        groups.setdefault(("far",) + far_cell(yy, xx), []).append(j)
                logits, values = [], []
                for (kind, *where), idx in groups.items():
                    members = idx
                    if kind == "far":
                        members = [t + yy * w + xx for yy in range(h) for xx in range(w)
                                   if far_cell(yy, xx) == tuple(where)]
                    bias = 0.0 if kind == "prefix" else beta[hh] * math.log(len(idx))
                    logits.append(s * q[bi, hh, i] @ k[bi, hh, members].mean(0) + bias)
                    values.append(v[bi, hh, members].mean(0))
                out[bi, hh, i] = torch.softmax(torch.stack(logits), 0) @ torch.stack(values)
            out[bi, hh] *= kappa[hh]
    return out


def qkv(t, h, w, heads=2, d=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(batch, heads, t + h * w, d, generator=g, dtype=torch.float64) for _ in range(3)]


def perturbed(mixer):
    with torch.no_grad():
        mixer.kappa.copy_(torch.tensor([0.7, 1.3])[: mixer.num_heads])
        mixer.size_bias.copy_(torch.tensor([0.8, 1.2])[: mixer.num_heads])
    return mixer


GEOMETRIES = [  # t, h, w, window, fine_pool, far grid: padding, odd grids, clamped far grids, no prefix, 2 prefix
    (1, 7, 9, 2, 1, (3, 2)),
    (2, 9, 7, 4, 2, (3, 3)),
    (0, 8, 8, 2, 2, (2, 4)),
    (1, 5, 13, 2, 2, (16, 16)),
    (5, 6, 10, 3, 3, (4, 5)),
]


@pytest.mark.parametrize("t, h, w, window, fine, far_grid", GEOMETRIES)
def test_multiscale_equals_the_key_by_key_partition(t, h, w, window, fine, far_grid):
    q, k, v = qkv(t, h, w)
    mixer = perturbed(MultiscaleMixer(2, 3, far_grid, window, fine).double())
    got = mixer(q, k, v, TokenLayout((h, w)))
    want = reference(q, k, v, t, h, w, window, fine, far_grid, mixer.kappa.detach(), mixer.size_bias.detach())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t, h, w, window", [(1, 7, 9, 2), (2, 9, 7, 4), (0, 8, 8, 3)])
def test_window_equals_attention_inside_each_window(t, h, w, window):
    q, k, v = qkv(t, h, w)
    mixer = perturbed(WindowMixer(2, 3, window).double())
    got = mixer(q, k, v, TokenLayout((h, w)))
    want = reference(q, k, v, t, h, w, window, 1, (1, 1), mixer.kappa.detach(), mixer.size_bias.detach(),
                     halo=0, far=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_exact_keys_over_the_whole_grid_are_the_pretrained_attention():
    t, h, w = 1, 6, 5
    q, k, v = qkv(t, h, w, d=4)
    for mixer in (MultiscaleMixer(2, 4, (3, 3), window=8, fine_pool=1), WindowMixer(2, 4, window=6)):
        got = mixer.double()(q, k, v, TokenLayout((h, w)))
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_class_token_is_exact_whatever_the_options():
    t, h, w = 2, 9, 11
    q, k, v = qkv(t, h, w, d=4)
    want = F.scaled_dot_product_attention(q, k, v)[:, :, :t]
    for mixer in (MultiscaleMixer(2, 4, (2, 2), 2, 2), MultiscaleMixer(2, 4, (4, 4), 4, 1), WindowMixer(2, 4, 2)):
        got = mixer.double()(q, k, v, TokenLayout((h, w)))[:, :, :t]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_identical_keys_in_a_group_weigh_as_many_keys():
    """The log-size bias: with every key and value equal inside each group, the pooled softmax is the full one."""
    t, h, w, window, fine = 1, 8, 8, 2, 2
    q, k, v = qkv(t, h, w, d=4)
    # constant over 2x2 cells (near groups) -- and with a 1x1 far grid everything far is one group: make the far
    # field's keys all equal to each other by building keys that are constant on every 2x2 cell and using far cells
    # of the same 2x2 size (a 4x4 far grid over the 8x8 patches: far groups are 2x2 cells less the near field).
    for x in (k, v):
        patches = x[:, :, t:].reshape(2, 2, h // 2, 2, w // 2, 2, 4)
        patches[:] = patches[:, :, :, :1, :, :1]
    mixer = MultiscaleMixer(2, 4, (4, 4), window, fine).double()
    got = mixer(q, k, v, TokenLayout((h, w)))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_operator_is_the_layer_and_rows_sum_to_one():
    t, h, w = 1, 7, 6
    q, k, v = qkv(t, h, w)
    for mixer in (perturbed(MultiscaleMixer(2, 3, (2, 3), 2, 2).double()), perturbed(WindowMixer(2, 3, 3).double())):
        layout = TokenLayout((h, w))
        E = mixer.operator(q, k, layout)
        assert E.shape == (2, 2, t + h * w, t + h * w) and (E >= 0).all()
        torch.testing.assert_close(E.sum(-1), torch.ones(E.shape[:-1], dtype=E.dtype))
        kappa = mixer.kappa.detach().view(1, -1, 1, 1)
        torch.testing.assert_close(kappa * (E @ v), mixer(q, k, v, layout))


def test_gradients_match_finite_differences():
    t, h, w = 1, 5, 4
    q, k, v = (x.requires_grad_() for x in qkv(t, h, w, heads=2, d=2, batch=1))
    mixer = perturbed(MultiscaleMixer(2, 2, (2, 2), 2, 2).double())
    layout = TokenLayout((h, w))
    assert torch.autograd.gradcheck(lambda a, b, c: mixer(a, b, c, layout), (q, k, v))
    params = [mixer.kappa, mixer.size_bias]
    assert torch.autograd.gradcheck(lambda kappa, beta: _with(mixer, kappa, beta)(q.detach(), k.detach(),
                                                                                   v.detach(), layout),
                                    [p.detach().clone().requires_grad_() for p in params])


def _with(mixer, kappa, beta):
    def run(q, k, v, layout):
        old = mixer.kappa, mixer.size_bias
        del mixer.kappa, mixer.size_bias
        mixer.kappa, mixer.size_bias = kappa, beta  # plain tensors, so gradcheck sees them as inputs
        try:
            return mixer(q, k, v, layout)
        finally:
            del mixer.kappa, mixer.size_bias
            mixer.kappa, mixer.size_bias = old
    return run


def test_half_inputs_compute_in_float32():
    t, h, w = 1, 16, 16
    q, k, v = qkv(t, h, w, d=8)
    mixer = MultiscaleMixer(2, 8, (4, 4), 4, 2)
    want = mixer.double()(q, k, v, TokenLayout((h, w))).float()
    got = mixer.float()(*(x.bfloat16() for x in (q, k, v)), TokenLayout((h, w)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_cost_is_linear_in_the_number_of_tokens():
    """FLOPs exponent of the dense preset's mixer alone (ViT-S heads) from 1,025 tokens (where its 24x24 far grid
    is no longer clamped to the patch grid) to 16,385, below 1.1 (softmax attention's is 2); the whole model's, from
    257 tokens, is in benchmarks/dense.py."""
    mixer = build_mixer("multiscale", 6, 64, **ConversionConfig.preset("dense").mixer_options())
    sides, flops = (32, 128), []
    for side in sides:
        x = torch.empty(1, 6, 1 + side * side, 64)
        flops.append(count_flops(lambda a: mixer(a, a, a, TokenLayout((side, side))), x))
    exponent = math.log(flops[1] / flops[0]) / math.log((1 + sides[1] ** 2) / (1 + sides[0] ** 2))
    assert exponent < 1.1, exponent
    window = build_mixer("window", 6, 64, (1, 1), "query", window=16)
    x = torch.empty(1, 6, 1 + 128 * 128, 64)
    softmax = 4 * 6 * (1 + 128 * 128) ** 2 * 64
    assert count_flops(lambda a: mixer(a, a, a, TokenLayout((128, 128))), x) < softmax / 10
    assert count_flops(lambda a: window(a, a, a, TokenLayout((128, 128))), x) < softmax / 10


# --------------------------------------------------------------------------- config, preset, saving


def test_dense_preset_is_a_plain_config_that_round_trips():
    config = ConversionConfig.preset("dense")
    assert config.variant == "multiscale" and config.num_representatives == (24, 24)
    assert (config.window, config.fine_pool) == (8, 2)
    assert ConversionConfig.from_dict(config.to_dict()) == config
    assert ConversionConfig.preset("dense", window=4).window == 4
    assert ConversionConfig.preset("default") == ConversionConfig()
    assert set(PRESETS) >= {"dense", "dense-fast", "default"}
    assert ConversionConfig.preset("dense-fast") == config.replace(num_representatives=(16, 16))
    with pytest.raises(UsageError, match="unknown preset 'fast'; choose one of"):
        ConversionConfig.preset("fast")


def test_impossible_options_are_refused_when_the_config_is_made():
    with pytest.raises(UsageError, match="fine_pool=3 must divide window=8"):
        ConversionConfig(variant="multiscale", fine_pool=3)
    with pytest.raises(UsageError, match="window must be a positive int, got 0"):
        ConversionConfig(variant="window", window=0)
    ConversionConfig(variant="window", fine_pool=3)  # window ignores fine_pool
    for variant in ("multiscale", "window"):  # a window is padded to window^2 tokens: a huge one is refused
        with pytest.raises(UsageError, match="window=100000 is larger than 256 patch tokens"):
            ConversionConfig(variant=variant, window=100000, fine_pool=1)
    assert ConversionConfig(variant="multiscale", window=256).window == 256


def test_preset_on_the_command_line_and_options_over_it():
    import argparse

    parser = argparse.ArgumentParser()
    ConversionConfig.add_arguments(parser)
    args = parser.parse_args(["--preset", "dense", "--window", "4"])
    assert ConversionConfig.from_arguments(args) == ConversionConfig.preset("dense", window=4)
    assert ConversionConfig.from_arguments(parser.parse_args([])) == ConversionConfig()
    # examples/finetune.py's command line: the run's conversion is the preset's
    from vit2cbsa.train.config import FinetuneConfig, add_arguments

    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "cifar10-teacher", "--data", "d", "--out", "o", "--preset", "dense"])
    assert FinetuneConfig.from_arguments(args).conversion == ConversionConfig.preset("dense")


def test_dense_conversion_saves_reloads_and_binds_its_options(tmp_path):
    family = FAMILY["timm_vit"]
    torch.manual_seed(0)
    model = vit2cbsa.convert(family.build().eval(), ConversionConfig.preset("dense", window=2, num_representatives=9))
    info = model.vit2cbsa_info
    assert info.config == ConversionConfig.preset("dense", window=2, num_representatives=9, layers=(0, 1))
    assert "multiscale" in str(info) and "window=2" in str(info)
    x = torch.randn(2, 3, 48, 40)
    folder = vit2cbsa.save_pretrained(model, tmp_path / "dense")
    saved = json.loads((folder / "vit2cbsa_config.json").read_text())["conversion"]
    assert (saved["variant"], saved["window"], saved["fine_pool"]) == ("multiscale", 2, 2)
    loaded = vit2cbsa.from_pretrained(folder).eval()
    assert vit2cbsa.conversion_info(loaded).config == info.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # the options are bound to the weights: an edited window is refused
    path = folder / "vit2cbsa_config.json"
    config = json.loads(path.read_text())
    config["conversion"]["window"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(vit2cbsa.errors.CheckpointError):
        vit2cbsa.from_pretrained(folder)
