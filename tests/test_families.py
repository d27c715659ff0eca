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
