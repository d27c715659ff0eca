"""convert(): layer selection, summary, all-or-nothing errors, inplace, PEFT LoRA on the kept projections."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vit2cbsa
from vit2cbsa.adapters import ConvertedAttention
from vit2cbsa.errors import RepresentativesWarning


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=4, num_heads=2, num_classes=5, **kw)


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    mods, sd = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    assert not hasattr(model, "vit2cbsa_info")


def converted_indices(model):
    return [i for i, b in enumerate(model.blocks) if isinstance(b.attn, ConvertedAttention)]


@pytest.mark.parametrize("layers,expected", [
    (None, [0, 1, 2, 3]), (2, [2]), ([0, -1], [0, 3]), (slice(2, None), [2, 3]),
    (lambda i, name, m: i % 2 == 1, [1, 3]),
])
def test_layer_selection(layers, expected):
    model = vit2cbsa.convert(tiny_vit(), "cbsa", 4, layers=layers)
    assert converted_indices(model) == expected == model.vit2cbsa_info.converted_indices
    assert "blocks.%d.attn" % expected[0] in str(model.vit2cbsa_info)


def test_hybrid_keeps_first_half_exact():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: feats.setdefault("orig", o))
    ref = model(x)
    hybrid = vit2cbsa.convert(model, "cbsa", 4, layers=slice(2, None), inplace=False)
    hybrid.blocks[1].register_forward_hook(lambda m, i, o: feats.setdefault("hyb", o))
    out = hybrid(x)
    torch.testing.assert_close(feats["hyb"], feats["orig"])  # unconverted half is untouched
    assert not torch.allclose(out, ref)


def test_inplace_false_leaves_original_untouched():
    model = tiny_vit()
    snap = snapshot(model)
    new = vit2cbsa.convert(model, "linear", inplace=False)
    assert new is not model and vit2cbsa.is_converted(new)
    assert_unchanged(model, snap)
    new(torch.randn(1, 3, 32, 32))  # the copy has its own working grid hook


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(variant="softmax"), ValueError, "unknown variant 'softmax'"),
    (dict(num_representatives=0), ValueError, "positive"),
    (dict(num_representatives=-64), ValueError, "positive"),
    (dict(num_representatives=50), ValueError, "not a square"),
    (dict(broadcast="nope"), ValueError, "unknown broadcast"),
    (dict(extra_representatives="cls"), ValueError, r"unknown extra_representatives 'cls'; choose one of \['prefix', 'global', 'none'\]"),
    (dict(prefix_broadcast="self"), ValueError, r"unknown prefix_broadcast 'self'; choose one of \['own', 'all'\]"),
    (dict(layers=[7]), ValueError, "does not exist"),
    (dict(layers=["0"]), TypeError, "integer block indices"),
    (dict(layers=lambda i, n, m: False), ValueError, "selects none"),
])
def test_bad_options_leave_model_unchanged(kwargs, exc, match):
    model = tiny_vit()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        vit2cbsa.convert(model, **kwargs)
    assert_unchanged(model, snap)


def test_already_converted_and_unsupported_models():
    model = vit2cbsa.convert(tiny_vit(), "cbsa", 4)
    with pytest.raises(ValueError, match="already converted"):
        vit2cbsa.convert(model)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU())
    with pytest.raises(TypeError, match="no supported self-attention"):
        vit2cbsa.convert(cnn)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="found: MultiheadAttention"):
        vit2cbsa.convert(mha)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vit2cbsa.convert("vit_base_patch16_224")


def test_sub_module_without_patch_embedding_is_rejected_untouched():
    blocks = tiny_vit().blocks
    snap = snapshot(blocks)
    with pytest.raises(ValueError, match="no patch embedding"):
        vit2cbsa.convert(blocks)
    assert_unchanged(blocks, snap)


def test_block_called_alone_needs_grid():
    model = vit2cbsa.convert(tiny_vit(), "cbsa", 4)
    tokens = torch.randn(1, 17, 32)
    with pytest.raises(ValueError, match="patch grid of this input is unknown"):
        model.blocks[0](tokens)
    vit2cbsa.layout_of(model).use_grid((4, 4))
    assert model.blocks[0](tokens).shape == tokens.shape


def test_representative_grid_larger_than_patch_grid_degrades_to_patches():
    model = tiny_vit(dynamic_img_size=True).eval()
    with pytest.warns(RepresentativesWarning, match="not fewer than the 4x4=16 patches"):
        big = vit2cbsa.convert(model, "cbsa", (16, 16), inplace=False)
    exact = vit2cbsa.convert(model, "cbsa", (2, 4), inplace=False)
    x = torch.randn(1, 3, 16, 32)  # a 2x4 patch grid
    torch.testing.assert_close(big(x), exact(x))


def test_converted_model_follows_dtype_and_train_mode():
    model = tiny_vit().to(torch.float64).eval()
    vit2cbsa.convert(model, "cbsa", 4)
    attn = model.blocks[0].attn
    assert not attn.training and attn.mixer.kappa.dtype == torch.float64
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_peft_lora_targets_pretrained_projections():
    from peft import LoraConfig, get_peft_model

    model = vit2cbsa.convert(tiny_vit(), "cbsa", 4)
    frozen = model.blocks[0].attn.qkv.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv", "proj"], modules_to_save=["mixer"]))
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert any("blocks.0.attn.qkv.lora_A" in n for n in lora_names)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        peft_model(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(model.blocks[0].attn.qkv.base_layer.weight, frozen)


# --------------------------------------------------------------------------- layer specs as strings, bad selectors


@pytest.mark.parametrize("layers,expected", [("6:", []), ("2:", [2, 3]), ("all", [0, 1, 2, 3]), ("-1", [3]),
                                             ("0,2", [0, 2]), ("::2", [0, 2])])
def test_layers_accepts_the_command_line_syntax(layers, expected):
    if not expected:  # 4 layers: "6:" selects none, said as for a slice, the way it was written
        for spec in (layers, slice(6, None)):
            with pytest.raises(ValueError, match=r"^layers='6:' selects none of the 4 attention layers \(indices 0..3\)$"):
                vit2cbsa.convert(tiny_vit(), "cbsa", 4, layers=spec)
        return
    model = vit2cbsa.convert(tiny_vit(), "cbsa", 4, layers=layers)
    assert converted_indices(model) == expected


@pytest.mark.parametrize("layers,exc,match", [
    (1.5, TypeError, r"layers=1.5 \(float\) is not a layer selector; layers accepts None \(all\), an index, .*"
                     r"a string as on the command line \('all', '3', '0,1,2', '6:'\)"),
    ("six:", ValueError, r"layers='six:' is not a layer spec; layers accepts None \(all\)"),
    ([0, 1.0], TypeError, r"layers must hold integer block indices, got 1.0; layers accepts"),
    ({"a": 1}, TypeError, r"is not a layer selector"),
])
def test_bad_layer_selectors_say_what_is_accepted(layers, exc, match):
    model = tiny_vit()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        vit2cbsa.convert(model, "cbsa", 4, layers=layers)
    assert_unchanged(model, snap)


def test_numpy_and_torch_integer_indices():
    np = pytest.importorskip("numpy")
    assert converted_indices(vit2cbsa.convert(tiny_vit(), "cbsa", 4, layers=np.int64(2))) == [2]
    assert converted_indices(vit2cbsa.convert(tiny_vit(), "cbsa", 4, layers=[torch.tensor(0), np.int32(-1)])) == [0, 3]


# --------------------------------------------------------------------------- hybrid CNN stems


@pytest.mark.parametrize("name, kw", [
    ("vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2)),     # CNN stem, then a patchify conv (8x8, stride 8)
    ("vit_small_r26_s32_224", dict(img_size=64, depth=1)),     # CNN stem, then a 1x1 conv
])
def test_hybrid_cnn_stem_is_a_type_error_naming_it(name, kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"^vit2cbsa: VisionTransformer is a hybrid ViT with a CNN stem "
                                        r"\(patch_embed is a HybridEmbed\), which is not supported"):
        vit2cbsa.convert(model)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------- the grid actually used


def test_info_says_which_grid_is_used_and_warns_when_nothing_is_saved():
    with pytest.warns(RepresentativesWarning) as caught:
        model = vit2cbsa.convert(tiny_vit(), "cbsa", 10000)  # a 100x100 grid on a 4x4 patch grid
    message = str(caught[0].message)
    assert message == ("vit2cbsa: 100x100 representatives are not fewer than the 4x4=16 patches of the model's own "
                       "input size: every patch is its own representative (4x4 used), so the converted layers save "
                       "nothing there and cost more than softmax; use fewer than 4x4, e.g. 2x2")
    info = vit2cbsa.conversion_info(model)
    assert info.patch_grid == (4, 4) and info.grid_used() == (4, 4) and info.grid_used((200, 3)) == (100, 3)
    assert info.saves_nothing() and not info.saves_nothing((200, 200))
    assert "4x4=16 pooled (100x100 asked, clamped to the 4x4 patch grid) + one per prefix token" in str(info)
    assert info.representatives_text(1, (2, 8)) .startswith("2x8=16 pooled (100x100 asked, clamped to the 2x8 patch")
    assert info.to_dict()["patch_grid"] == [4, 4]
    # fewer representatives than patches: no warning, the asked grid is the one used
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepresentativesWarning)
        small = vit2cbsa.convert(tiny_vit(), "cbsa", (2, 4))
        vit2cbsa.convert(tiny_vit(), "linear", 10000)  # linear has no representatives
    assert "2x4=8 pooled + one per prefix token" in str(vit2cbsa.conversion_info(small))
