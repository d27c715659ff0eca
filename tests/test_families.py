"""Every supported family converts, runs forward/backward at two resolutions, and sees the right layout."""

from __future__ import annotations

import pytest
import torch

import vit2cbsa
from vit2cbsa.adapters import ConvertedAttention

VARIANTS = ["cbsa", "contraction_free", "linear"]


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
    vit2cbsa.convert(model, variant, num_representatives=4)
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
