"""PEFT LoRA with converted models, in either order: convert -> LoRA -> merge -> save, and LoRA -> convert -> merge.

Tiny random-weight timm and transformers ViTs; outputs compared numerically at every step (no network).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import vit2cbsa
from vit2cbsa.adapters import ConvertedAttention

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5, dynamic_img_size=True, **kw).eval()


def nudge_lora(model, std=0.2):
    """LoRA's B starts at zero (the adapter is a no-op): give every adapter a visible effect."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    model.eval()


def out(model, x):
    with torch.no_grad():
        return model(x)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X_OTHER = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(1))  # another patch grid (3x5)


def test_convert_then_lora_then_merge_then_save(tmp_path):
    model = vit2cbsa.convert(tiny_vit(), "cbsa", 4)
    info = vit2cbsa.conversion_info(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv", "proj"], modules_to_save=["mixer"]))
    assert vit2cbsa.conversion_info(peft_model) is info  # found through the wrapper
    kappa = peft_model.base_model.model.blocks[0].attn.mixer.modules_to_save["default"].kappa
    before = kappa.detach().clone()
    nudge_lora(peft_model)
    train_step(peft_model, X)
    assert not torch.equal(kappa.detach(), before)  # the conversion's parameters were trained too (modules_to_save)
    expected, expected_other = out(peft_model, X), out(peft_model, X_OTHER)

    merged = peft_model.merge_and_unload()
    assert vit2cbsa.conversion_info(merged) is info and vit2cbsa.is_converted(merged)
    assert type(merged.blocks[0].attn.qkv) is torch.nn.Linear
    torch.testing.assert_close(out(merged, X), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(merged, X_OTHER), expected_other, rtol=1e-5, atol=1e-5)  # the grid hook survived
    assert vit2cbsa.layout_of(merged).grid == (3, 5)

    folder = vit2cbsa.save_pretrained(merged, tmp_path / "merged")
    loaded = vit2cbsa.from_pretrained(folder)
    torch.testing.assert_close(out(loaded, X), expected, rtol=1e-5, atol=1e-5)


def test_save_pretrained_of_the_peft_wrapper_says_to_merge_first(tmp_path):
    # For the lead: this is hub.save_pretrained's part of the PEFT item (owned by the hub engineer); it checks
    # that saving the unmerged wrapper is refused with a message naming merge_and_unload(), and writes nothing.
    peft_model = get_peft_model(vit2cbsa.convert(tiny_vit(), "cbsa", 4), LoraConfig(r=4, target_modules=["qkv"]))
    with pytest.raises((TypeError, ValueError), match=r"merge_and_unload\(\)"):
        vit2cbsa.save_pretrained(peft_model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_lora_then_convert_uses_the_effective_weights_and_merges():
    peft_model = get_peft_model(tiny_vit(), LoraConfig(r=4, target_modules=["qkv", "proj"]))  # proj: patch_embed too
    nudge_lora(peft_model)
    # the reference: merge first, then convert (the order the message used to ask for)
    reference = vit2cbsa.convert(copy.deepcopy(peft_model).merge_and_unload(), "cbsa", 4)

    returned = vit2cbsa.convert(peft_model, "cbsa", 4)
    assert returned is peft_model
    base = peft_model.get_base_model()
    info = vit2cbsa.conversion_info(peft_model)
    assert info is not None and vars(base)["vit2cbsa_info"] is info  # kept on the wrapped model ...
    assert "vit2cbsa_info" not in vars(peft_model)  # ... not on the wrapper
    assert [layer.name for layer in info.converted] == ["blocks.0.attn", "blocks.1.attn"]  # names of the merged model
    assert info.patch_embedding == "patch_embed.proj"
    attn = base.blocks[0].attn
    assert isinstance(attn, ConvertedAttention) and type(attn.qkv).__module__.startswith("peft.")  # LoRA kept
    torch.testing.assert_close(out(peft_model, X), out(reference, X), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(peft_model, X_OTHER), out(reference, X_OTHER), rtol=1e-5, atol=1e-5)

    # training: LoRA only; the conversion's parameters are frozen like the rest of the wrapped model
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for p in vit2cbsa.new_parameters(peft_model))
    lora_a = next(p for n, p in peft_model.named_parameters() if "blocks.0.attn.qkv.lora_A" in n)
    a_before, kappa_before = lora_a.detach().clone(), attn.mixer.kappa.detach().clone()
    train_step(peft_model, X)
    assert not torch.equal(lora_a.detach(), a_before) and torch.equal(attn.mixer.kappa.detach(), kappa_before)

    expected, expected_other = out(peft_model, X), out(peft_model, X_OTHER)
    merged = peft_model.merge_and_unload()
    assert merged is base and vit2cbsa.conversion_info(merged) is info
    assert not any(type(m).__module__.startswith("peft.") for m in merged.modules())
    torch.testing.assert_close(out(merged, X), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(merged, X_OTHER), expected_other, rtol=1e-5, atol=1e-5)


def test_lora_then_convert_round_trips_through_save(tmp_path):
    peft_model = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["qkv"]))
    nudge_lora(peft_model)
    vit2cbsa.convert(peft_model, "contraction_free", (2, 2), layers="1:")
    merged = peft_model.merge_and_unload()
    folder = vit2cbsa.save_pretrained(merged, tmp_path / "m")
    loaded = vit2cbsa.from_pretrained(folder)
    assert vit2cbsa.conversion_info(loaded).converted_indices == [1]
    torch.testing.assert_close(out(loaded, X), out(merged, X), rtol=1e-5, atol=1e-5)


def test_peft_wrapper_inplace_false_and_bad_options_leave_it_untouched():
    peft_model = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["qkv"]))
    nudge_lora(peft_model)
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    copy_ = vit2cbsa.convert(peft_model, "linear", inplace=False)
    assert copy_ is not peft_model and vit2cbsa.conversion_info(copy_) is not None
    assert type(copy_).__name__ == type(peft_model).__name__
    assert not vit2cbsa.is_converted(peft_model) and vit2cbsa.conversion_info(peft_model) is None
    torch.testing.assert_close(out(copy_, X), out(vit2cbsa.convert(copy.deepcopy(peft_model).merge_and_unload(),
                                                                   "linear"), X), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown variant"):
        vit2cbsa.convert(peft_model, "softmax")
    assert not vit2cbsa.is_converted(peft_model)
    now = peft_model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_transformers_vit_lora_then_convert():
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    nudge_lora(peft_model)
    reference = vit2cbsa.convert(copy.deepcopy(peft_model).merge_and_unload(), "cbsa", 4)
    vit2cbsa.convert(peft_model, "cbsa", 4)
    x = X[:1]
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        torch.testing.assert_close(got, reference(pixel_values=x).logits, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload()
        assert vit2cbsa.conversion_info(merged).converted[0].name == "vit.layers.0.attention"
        torch.testing.assert_close(merged(pixel_values=x).logits, got, rtol=1e-5, atol=1e-5)
