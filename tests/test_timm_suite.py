"""The checks of timm's model test suite that apply to a converted ViT, over our family table.

Each check runs on the unconverted model first, as the control: a check the original fails (or an API it lacks)
is skipped, naming why; one it passes, the converted model must pass too. Mirrored from timm's
``tests/test_models.py``: forward, backward (every parameter gets a gradient), ``forward_intermediates``,
``features_only`` (``FeatureGetterNet``), fx forward / backward / fx + TorchScript, TorchScript (refused in one
line: :data:`vit2cbsa.adapters.base.TORCHSCRIPT_MESSAGE`), ``torch.export``, ``set_input_size``,
``dynamic_img_size`` and gradient checkpointing. (``test_export.py`` exports with dynamic shapes.)
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import vit2cbsa
from vit2cbsa.adapters.base import TORCHSCRIPT_MESSAGE

from conftest import FAMILIES, Family

VARIANTS = ["cbsa", "contraction_free", "linear"]
FAMILY = {f.name: f for f in FAMILIES}
TOL = dict(rtol=1e-4, atol=1e-5)
CONTROL = None  # the "variant" of the unconverted model


def build(family: Family, variant: Optional[str], train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = family.build().train(train)
    if variant is not None:
        vit2cbsa.convert(model, variant, 4)
    return model


def output(family: Family, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = family(model, x)
    return torch.cat(out) if isinstance(out, tuple) else out  # timm's distilled training output is a tuple


@functools.lru_cache(maxsize=None)
def control(check: str, name: str) -> Optional[str]:
    """Why the original fails ``check`` (``None`` when it passes)."""
    try:
        CHECKS[check](FAMILY[name], CONTROL)
    except pytest.skip.Exception as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - whatever stops the original stops the check
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


def run_check(check: str, family: Family, variant: str) -> None:
    why = control(check, family.name)
    if why is not None:
        pytest.skip(f"the original {family.name} fails {check} too: {why}")
    CHECKS[check](family, variant)


def needs(model: nn.Module, *attrs: str) -> None:
    missing = [a for a in attrs if not hasattr(model, a)]
    if missing:
        pytest.skip(f"{type(model).__name__} has no {', '.join(missing)}")


# --- the checks: each takes (family, variant or CONTROL) ----------------------------------------------------------


def check_forward(family: Family, variant):
    """test_model_forward: batch 1, eval; the shape's batch and no NaN."""
    model = build(family, variant)
    with torch.no_grad():
        out = output(family, model, torch.randn(1, 3, *family.sizes[0]))
    assert out.shape[0] == 1 and not torch.isnan(out).any()


def _params_without_grad(family: Family, variant):
    model = build(family, variant, train=True)
    out = output(family, model, torch.randn(2, 3, *family.sizes[0]))
    out.mean().backward()
    assert not torch.isnan(out).any()
    return {n for n, p in model.named_parameters() if p.grad is None}, model


def check_backward(family: Family, variant):
    """test_model_backward: train mode, batch 2: every parameter gets a gradient. (Some originals leave unused
    parameters, such as a mask token, without one: the converted model leaves exactly those.)"""
    missing, model = _params_without_grad(family, variant)
    if variant is not CONTROL:
        assert missing == control_missing_grads(family.name)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit2cbsa.new_parameters(model))


@functools.lru_cache(maxsize=None)
def control_missing_grads(name: str):
    return frozenset(_params_without_grad(FAMILY[name], CONTROL)[0])


def check_forward_intermediates(family: Family, variant):
    """test_model_forward_intermediates: one NCHW map per block with the model's channels and the patch grid, and
    the final output equal to forward_features; NLC with prefix tokens too."""
    model = build(family, variant)
    needs(model, "forward_intermediates", "feature_info")
    x = torch.randn(2, 3, *family.sizes[1])
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), **TOL)
        assert len(maps) == len(model.feature_info)
        gh, gw = family.sizes[1][0] // family.patch, family.sizes[1][1] // family.patch
        for info, m in zip(model.feature_info, maps):
            assert m.shape == (2, info["num_chs"], gh, gw)
            assert m.shape[-1] <= math.ceil(x.shape[-1] / info["reduction"])
        with_prefix = family.num_prefix > 0  # (timm returns plain tokens for a model without prefix tokens)
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", return_prefix_tokens=with_prefix,
                                          intermediates_only=True)
        tokens, prefix = nlc[0] if with_prefix else (nlc[0], x.new_zeros(2, 0))
        assert tokens.shape == (2, gh * gw, maps[0].shape[1]) and prefix.shape[1] == family.num_prefix
        torch.testing.assert_close(tokens.transpose(1, 2).reshape(maps[0].shape), maps[0], **TOL)


def check_features_only(family: Family, variant):
    """test_model_forward_features: timm's features_only for ViTs (FeatureGetterNet), converted before or after
    wrapping, equal to forward_intermediates of the whole model."""
    from timm.models._features import FeatureGetterNet

    model = build(family, variant)
    needs(model, "forward_intermediates", "feature_info")
    x = torch.randn(1, 3, *family.sizes[0])
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        after = FeatureGetterNet(model, out_indices=[0, 1])  # converted, then wrapped
        before = FeatureGetterNet(build(family, None), out_indices=[0, 1]).eval()  # wrapped, then converted
        if variant is not CONTROL:
            vit2cbsa.convert(before, variant, 4)
        for net in (after, before):
            feats = net(x)
            assert [f.shape[1] for f in feats] == net.feature_info.channels()
            for f, r in zip(feats, ref):
                torch.testing.assert_close(f, r, **TOL)


def _fx_model(model: nn.Module, train: bool):
    """timm's ``_create_fx_model``: return the output node(s) of the traced graph (train: the nodes that feed the
    output, which is a tuple for distilled models)."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(n)] for n in output_names]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


def _fx_output(fx_model, x):
    outs = tuple(fx_model(x).values())
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def check_forward_fx(family: Family, variant):
    """test_model_forward_fx: the traced graph's output equals eager's, at the traced and another resolution."""
    model = build(family, variant)
    fx_model = _fx_model(model, train=False)
    for size in dict.fromkeys(family.sizes):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(_fx_output(fx_model, x), output(family, model, x), **TOL)


def check_backward_fx(family: Family, variant):
    """test_model_backward_fx: train-mode graph, every parameter of the graph gets a gradient, equal to eager's."""
    model = build(family, variant, train=True)
    fx_model = _fx_model(model, train=True)
    x = torch.randn(2, 3, *family.sizes[0])
    _fx_output(fx_model, x).mean().backward()
    fx_grads = {n: p.grad for n, p in fx_model.named_parameters()}
    assert all(g is not None for g in fx_grads.values()), [n for n, g in fx_grads.items() if g is None]
    model.zero_grad()
    output(family, model, x).mean().backward()
    eager = dict(model.named_parameters())
    for n, g in fx_grads.items():
        torch.testing.assert_close(g, eager[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(module)


def check_forward_fx_torchscript(family: Family, variant):
    """test_model_forward_fx_torchscript: the traced graph scripts, and equals eager."""
    model = build(family, variant)
    scripted = _script(_fx_model(model, train=False))
    x = torch.randn(1, 3, *family.sizes[1])
    with torch.no_grad():
        torch.testing.assert_close(_fx_output(scripted, x), output(family, model, x), **TOL)


def check_forward_torchscript(family: Family, variant):
    """test_model_forward_torchscript: the original scripts; a converted model refuses in one clear line."""
    model = build(family, variant)
    if variant is CONTROL:
        _script(model)
        return
    with pytest.raises(RuntimeError) as err:
        _script(model)
    assert str(err.value) == TORCHSCRIPT_MESSAGE


def check_export(family: Family, variant):
    """torch.export.export with static shapes: the program equals eager."""
    model = build(family, variant)

    class Pixels(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return output(family, self.model, x)

    x = torch.randn(1, 3, *family.sizes[0])
    program = torch.export.export(Pixels(), (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x), output(family, model, x), **TOL)


def check_set_input_size(family: Family, variant):
    """set_input_size(img_size=...): the model then runs at the new size (a static model too)."""
    model = build(family, variant)
    needs(model, "set_input_size")
    p = family.patch
    new = (3 * p, 5 * p)
    model.set_input_size(img_size=new)
    with torch.no_grad():
        out = output(family, model, torch.randn(2, 3, *new))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def check_set_input_size_patch(family: Family, variant):
    """set_input_size(patch_size=...): the original resamples its patch embedding; a converted model, whose
    layers read the patch grid from that convolution, refuses in one line instead of using a stale grid."""
    model = build(family, variant)
    needs(model, "set_input_size")
    if not getattr(model, "dynamic_img_size", False):
        pytest.skip("a static-size model")
    x = torch.randn(1, 3, *family.sizes[0])
    with torch.no_grad():
        output(family, model, x)
        model.set_input_size(patch_size=4)  # 32 and 28 pixels: 8 and 7 patches
        if variant in (CONTROL, "linear"):  # linear attention has no grid to go stale
            output(family, model, x)
            return
        with pytest.raises(ValueError, match="patch embedding replaced after conversion"):
            output(family, model, x)


def check_dynamic_img_size(family: Family, variant):
    """dynamic_img_size: any multiple of the patch, square or not, down to 2 patches on an axis."""
    model = build(family, variant)
    if not family.hf and not getattr(model, "dynamic_img_size", False):
        pytest.skip("built with a fixed input size")
    p = family.patch
    with torch.no_grad():
        for size in (*family.sizes, (2 * p, 7 * p), (9 * p, 3 * p)):
            out = output(family, model, torch.randn(1, 3, *size))
            assert torch.isfinite(out).all()


def check_gradient_checkpointing(family: Family, variant):
    """set_grad_checkpointing (timm) / gradient_checkpointing_enable (transformers): same loss and gradients."""
    model = build(family, variant, train=True)
    x = torch.randn(2, 3, *family.sizes[1])

    def step():
        model.zero_grad()
        loss = output(family, model, x).float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        pytest.skip("no gradient checkpointing switch")
    loss2, grads2 = step()
    torch.testing.assert_close(loss2, loss)
    assert grads2.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


CHECKS: dict[str, Callable] = {
    "forward": check_forward,
    "backward": check_backward,
    "forward_intermediates": check_forward_intermediates,
    "features_only": check_features_only,
    "forward_fx": check_forward_fx,
    "backward_fx": check_backward_fx,
    "forward_fx_torchscript": check_forward_fx_torchscript,
    "forward_torchscript": check_forward_torchscript,
    "export": check_export,
    "set_input_size": check_set_input_size,
    "set_input_size_patch": check_set_input_size_patch,
    "dynamic_img_size": check_dynamic_img_size,
    "gradient_checkpointing": check_gradient_checkpointing,
}
#: checks run for every variant; the others (slower, and independent of the variant's mixer) for the default one
EVERY_VARIANT = ("forward", "backward", "forward_intermediates", "forward_fx", "backward_fx", "set_input_size_patch",
                 "dynamic_img_size", "gradient_checkpointing")


CASES = [(check, variant) for check in CHECKS for variant in (VARIANTS if check in EVERY_VARIANT else ["cbsa"])]


@pytest.mark.parametrize("check, variant", CASES, ids=[f"{c}-{v}" for c, v in CASES])
def test_timm_suite(check, variant, family):
    run_check(check, family, variant)
