"""Every supported family converts, runs forward/backward at two resolutions, and sees the right layout."""

from __future__ import annotations

import pytest
import torch

import vit2cbsa
from conftest import variant_options
from vit2cbsa.adapters import ConvertedAttention

VARIANTS = ["cbsa", "contraction_free", "linear", "multiscale", "window"]


def _record_layouts(model):
    seen = []

    def hook(module, args):
        q, _, _, layout = args
        seen.append((q.shape[-2],) + layout.split(q.shape[-2]))

    for m in model.modules():
        if isinstance(m, ConvertedAttention):
            m.mixer.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_two_resolutions(family, variant):
    torch.manual_seed(0)
    model = family.build()
    n_attn = sum(1 for _ in model.modules() if type(_).__name__.endswith("Attention") and hasattr(_, "head_dim"))
    vit2cbsa.convert(model, variant, num_representatives=4, **variant_options(variant))
    info = model.vit2cbsa_info
    assert len(info.converted) == info.num_attention_layers == 2
    assert n_attn >= 2
    seen = _record_layouts(model)
    for h, w in family.sizes:
        model.zero_grad()
        seen.clear()
        x = torch.randn(2, 3, h, w)
        out = family(model, x)
        assert torch.isfinite(out).all()
        out.float().pow(2).mean().backward()
        gh, gw = h // family.patch, w // family.patch
        # every converted layer saw N = prefix + gh*gw tokens, with the prefix tokens counted right
        assert seen and all(s == (family.num_prefix + gh * gw, family.num_prefix, gh, gw) for s in seen), seen
        new = vit2cbsa.new_parameters(model)
        assert new and all(p.grad is not None and torch.isfinite(p.grad).all() for p in new)
        assert any(p.grad.abs().sum() > 0 for p in new)


def test_pretrained_projections_are_shared_not_copied(family):
    model = family.build()
    linears_before = {id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    vit2cbsa.convert(model, "cbsa", 4)
    linears_after = {id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert linears_before == linears_after  # q/k/v/o kept as the very same nn.Linear layers


def _attention_outputs(model, names, store):
    """Forward hooks storing each named attention module's output (the first element of a tuple)."""
    handles = []
    for name in names:
        def hook(module, args, out, name=name):
            store[name] = out[0] if isinstance(out, tuple) else out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("variant", ["cbsa", "contraction_free"])
def test_prefix_tokens_keep_their_pretrained_attention_at_conversion(family, variant):
    """Default conversion: each prefix token (class, distillation, registers) is its own representative and reads
    back only that one, so in the first converted layer (same input as the original's) the prefix tokens' outputs
    equal the pretrained attention's, for any representative grid; a model without prefix tokens is unchanged by
    the option. Compared with the original model's own attention module, run by its own code."""
    torch.manual_seed(0)
    original = family.build().eval()
    with torch.no_grad():  # random weights attend almost uniformly, which any design approximates: sharpen them
        for name, m in original.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "query", "key", "q_proj", "k_proj"):
                m.weight.mul_(6.0)
    converted = vit2cbsa.convert(original, variant, 4, inplace=False).eval()
    plain = vit2cbsa.convert(original, variant, 4, extra_representatives="none", inplace=False).eval()
    first = converted.vit2cbsa_info.converted[0].name
    h, w = family.sizes[1]
    x = torch.randn(2, 3, h, w)
    ref, got, base = {}, {}, {}
    handles = (_attention_outputs(original, [first], ref) + _attention_outputs(converted, [first], got)
               + _attention_outputs(plain, [first], base))
    with torch.no_grad():
        family(original, x), family(converted, x), family(plain, x)
    for hd in handles:
        hd.remove()
    t = family.num_prefix
    assert got[first].shape == ref[first].shape and got[first].shape[1] == t + (h // family.patch) * (w // family.patch)
    if t:
        torch.testing.assert_close(got[first][:, :t], ref[first][:, :t], rtol=1e-4, atol=1e-5)
        # the patches are approximated, and the prefix tokens were not exact without the option
        assert not torch.allclose(got[first][:, t:], ref[first][:, t:], atol=1e-3)
        assert not torch.allclose(base[first][:, :t], ref[first][:, :t], atol=1e-3)
    else:
        torch.testing.assert_close(got[first], base[first], rtol=0, atol=0)


@pytest.mark.parametrize("extra, prefix_broadcast", [("global", "all"), ("prefix", "all"), ("none", "all")])
def test_other_representative_designs_train(family, extra, prefix_broadcast):
    torch.manual_seed(0)
    model = vit2cbsa.convert(family.build(), "cbsa", 4, extra_representatives=extra, prefix_broadcast=prefix_broadcast)
    h, w = family.sizes[1]
    out = family(model, torch.randn(2, 3, h, w))
    out.float().pow(2).mean().backward()
    new = vit2cbsa.new_parameters(model)
    assert torch.isfinite(out).all() and all(p.grad is not None and torch.isfinite(p.grad).all() for p in new)


# --------------------------------------------------------------------------- the adapters own their families

def test_every_registered_adapter_has_a_family_case():
    """Each adapter in the registry converts at least one of the tiny families of tests/conftest.py (a new adapter
    needs a case there), and every family is claimed by a registered adapter."""
    from conftest import FAMILIES
    from vit2cbsa.adapters import ADAPTERS, find_adapter

    seen = set()
    for f in FAMILIES:
        used = {find_adapter(m).name for m in f.build().modules() if find_adapter(m) is not None}
        assert used, f"no adapter claims the family {f.name}"
        seen |= used
    missing = sorted({a.name for a in ADAPTERS} - seen)
    assert not missing, f"adapters without a family case in tests/conftest.py: {missing}"


def _tiny_hf(config_cls, model_cls, **kw):
    import transformers

    cfg = getattr(transformers, config_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8, **kw)
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.mark.parametrize("config_cls,model_cls", [("ViTMSNConfig", "ViTMSNModel"), ("IJepaConfig", "IJepaModel")])
def test_hf_vit_copies_convert_by_structure(config_cls, model_cls):
    """transformers families not in any adapter's class list, whose attention is a plain q/k/v/o self-attention,
    are matched by structure, convert (named as the hf_vit family) and train: finite outputs, gradients on the
    added parameters."""
    from vit2cbsa.adapters import HF_VIT

    torch.manual_seed(0)
    original = _tiny_hf(config_cls, model_cls)
    attn = [m for m in original.modules() if HF_VIT.matches(m)]
    assert len(attn) == 2 and all(type(m) not in HF_VIT.classes and HF_VIT.matches_structure(m) for m in attn)
    converted = vit2cbsa.convert(original, "cbsa", num_representatives=4, inplace=False)
    assert converted.vit2cbsa_info.converted[0].family == "hf_vit" and len(converted.vit2cbsa_info.converted) == 2
    x = torch.randn(2, 3, 32, 32)
    out = converted(pixel_values=x).last_hidden_state
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in vit2cbsa.new_parameters(converted))


def test_attention_with_more_than_qkv_is_not_matched_by_structure():
    """Swin's attention carries a relative-position table: no adapter claims it, and convert says so (nothing
    changed)."""
    import transformers

    from vit2cbsa.adapters import find_adapter

    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2], window_size=4)
    model = transformers.SwinModel(cfg)
    assert not any(find_adapter(m) for m in model.modules())
    with pytest.raises(vit2cbsa.errors.UnsupportedModelError, match="no supported self-attention"):
        vit2cbsa.convert(model)


def test_lora_targets_come_from_the_adapters(family):
    """The default LoRA target regex selects exactly each layer's q/k/v/output projection Linears, before and after
    conversion, and PEFT accepts it."""
    import re

    from vit2cbsa.adapters import lora_target_modules, projection_modules

    model = family.build()
    expected = {"timm": {"qkv", "proj"}, "hf": {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj"}}
    for m in (model, vit2cbsa.convert(model, "cbsa", 4, inplace=False)):
        names = [n for n, _ in projection_modules(m)]
        per_layer = 2 if not family.hf else 4
        assert len(names) == 2 * per_layer  # two attention layers
        assert {n.rsplit(".", 1)[-1] for n in names} <= expected["hf" if family.hf else "timm"]
        pattern = lora_target_modules(m)
        picked = [n for n, _ in m.named_modules() if re.fullmatch(pattern, n)]
        assert sorted(picked) == sorted(names)
