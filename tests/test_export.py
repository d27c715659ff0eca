"""Converted models leave Python: ``torch.export`` and ``torch.fx`` equal eager, at sizes other than the traced one.

Every family with CBSA and every variant on two families (conftest.family_variant_cases), with the unconverted
model run through the same check as the control: where the original exports with a dynamic batch and dynamic
H, W (or traces with fx), the converted model must too, and its program must equal eager on every probe input the
original's program accepts. The tiny random models are sharpened (LayerScale 1, larger q/k weights) so that
attention, and with it the patch grid, visibly moves the outputs.
"""

from __future__ import annotations

import copy
import functools
import pickle
import warnings
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn

import vit2cbsa
from vit2cbsa.adapters.base import MASK_MESSAGE, TORCHSCRIPT_MESSAGE
from vit2cbsa.layout import GridConv2d, TokenLayout
from vit2cbsa.pooling import _pool_separable, effective_grid, pool_patches

from conftest import FAMILIES, Family, family_variant_cases, variant_options

VARIANTS = ["cbsa", "contraction_free", "linear", "multiscale", "window"]
REPS = 9  # a 3x3 representative grid: unequal windows on most grids, clamped on a 2-patch axis
FAMILY = {f.name: f for f in FAMILIES}
TOL = dict(rtol=1e-4, atol=1e-5)


def sharpen(model: nn.Module) -> nn.Module:
    """LayerScale to 1 and q/k weights x3: random tiny models otherwise barely use their attention."""
    with torch.no_grad():
        for name, m in model.named_modules():
            for attr in ("gamma", "lambda1"):  # timm LayerScale, HF Dinov2LayerScale
                p = getattr(m, attr, None)
                if isinstance(p, nn.Parameter) and p.dim() == 1 and "LayerScale" in type(m).__name__:
                    p.fill_(1.0)
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(m, nn.Linear) and leaf in ("q_proj", "k_proj"):
                m.weight.mul_(3.0)
            if isinstance(m, nn.Linear) and leaf == "qkv":
                m.weight[: 2 * m.out_features // 3].mul_(3.0)
    return model


def build(family: Family, variant: Optional[str]) -> nn.Module:
    """The family's sharpened model in eval mode: the original (``variant=None``) or converted to ``variant``."""
    torch.manual_seed(0)
    model = sharpen(family.build()).eval()
    if variant is not None:
        vit2cbsa.convert(model, variant, REPS, **variant_options(variant))
    return model


class Pixels(nn.Module):
    """``pixels -> (tokens, output)`` as the family calls its model: the last hidden states (timm
    ``forward_features``, transformers ``last_hidden_state``: every token, so the patch grid shows) and the output
    (HF: logits where there are)."""

    def __init__(self, family: Family, model: nn.Module) -> None:
        super().__init__()
        self.family, self.model = family, model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.family.hf:
            return self.model.forward_features(x), self.model(x)
        kwargs = {} if "Dinov2" in type(self.model).__name__ else {"interpolate_pos_encoding": True}
        tokens = self.model.base_model(pixel_values=x, **kwargs).last_hidden_state
        return tokens, self.family(self.model, x)


def dynamic_shapes(family: Family, image: bool) -> Dict[str, Dict[int, object]]:
    """Dynamic batch, and H, W as multiples of the patch (at least 2 patches: exports specialise sizes 0 and 1)."""
    from torch.export import Dim

    spec: Dict[int, object] = {0: Dim("batch", min=1, max=64)}
    if image:
        spec[2] = family.patch * Dim("h_patches", min=2, max=64)
        spec[3] = family.patch * Dim("w_patches", min=2, max=64)
    return {"x": spec}


def traced_input(family: Family) -> torch.Tensor:
    """Traced at the family's second (non-square) size: not the native grid, whose patch count transformers'
    position interpolation would bake into the program."""
    return torch.randn(2, 3, *family.sizes[1], generator=torch.Generator().manual_seed(2))


def probes(family: Family) -> List[torch.Tensor]:
    """Inputs other than the traced one: other batch sizes, the native size, non-square grids, a clamped axis."""
    p = family.patch
    torch.manual_seed(1)
    return [torch.randn(3, 3, *family.sizes[1]), torch.randn(2, 3, *family.sizes[0]),
            torch.randn(2, 3, 2 * p, 5 * p), torch.randn(2, 3, 7 * p, 3 * p), torch.randn(1, 3, 4 * p, 6 * p)]


def _runs_like_eager(program: nn.Module, eager: nn.Module, x: torch.Tensor) -> bool:
    try:
        out = program(x)
    except Exception:  # noqa: BLE001 - a guard of the original's program
        return False
    with torch.no_grad():
        return all(torch.allclose(a, b, **TOL) for a, b in zip(out, eager(x)))


@functools.lru_cache(maxsize=None)
def control_export(name: str) -> Tuple[bool, Tuple[int, ...]]:
    """The original's export: ``(dynamic H and W, indices of the probes its program runs equal to eager)``.

    Dynamic H, W where the original exports with them and its program runs at a size other than the traced one;
    else a dynamic batch only."""
    family = FAMILY[name]
    wrapped = Pixels(family, build(family, None))
    for image in (True, False):
        try:
            program = torch.export.export(wrapped, (traced_input(family),), dynamic_shapes=dynamic_shapes(family, image))
        except Exception:
            continue
        module = program.module()
        ok = tuple(i for i, x in enumerate(probes(family)) if _runs_like_eager(module, wrapped, x))
        other_size = any(tuple(probes(family)[i].shape[-2:]) != family.sizes[1] for i in ok)
        if ok and (other_size or not image):
            return image, ok
    pytest.fail(f"the original {name} does not export even with a dynamic batch size")


@pytest.mark.parametrize("family, variant", family_variant_cases(VARIANTS))
def test_torch_export_equals_eager_at_other_sizes(family, variant):
    image, ok = control_export(family.name)
    wrapped = Pixels(family, build(family, variant))
    program = torch.export.export(wrapped, (traced_input(family),), dynamic_shapes=dynamic_shapes(family, image))
    # the layout held the tracer's sizes; copies of the model do not keep them
    assert not all(isinstance(v, int) for v in vit2cbsa.layout_of(wrapped.model).grid) or not image
    assert vit2cbsa.layout_of(copy.deepcopy(wrapped.model)).grid is None or not image
    assert vit2cbsa.layout_of(pickle.loads(pickle.dumps(wrapped.model))).grid is None or not image
    module = program.module()
    xs = probes(family)
    with torch.no_grad():
        torch.testing.assert_close(module(traced_input(family)), wrapped(traced_input(family)), **TOL)
        for i in ok:
            torch.testing.assert_close(module(xs[i]), wrapped(xs[i]), **TOL, msg=lambda m: f"probe {i}: {m}")
        # the comparison is sensitive: the conversion moves the tokens far more than the tolerance
        original = Pixels(family, build(family, None))
        assert not torch.allclose(wrapped(xs[ok[0]])[0], original(xs[ok[0]])[0], rtol=1e-2, atol=1e-3)
    if family.name.startswith("timm") and family.name != "timm_vit_static_nonsquare":
        assert image and len({tuple(xs[i].shape[-2:]) for i in ok}) >= 3  # timm dynamic_img_size: any H, W


# --- torch.fx --------------------------------------------------------------------------------------------------


def _tracer_kwargs() -> dict:
    from timm.layers import get_notrace_functions, get_notrace_modules

    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def feature_nodes(model: nn.Module) -> Dict[str, str]:
    """Module outputs asked of ``create_feature_extractor``: the patch embedding, a block, a converted layer."""
    from vit2cbsa.modeling import find_patch_embedding

    names = [find_patch_embedding(model)[0]]
    names += [n for n, m in model.named_modules() if n.endswith(("blocks.0", "layer.0"))]
    names += [layer.name for layer in vit2cbsa.conversion_info(model).converted[-1:]] if vit2cbsa.is_converted(model) \
        else [n for n, m in model.named_modules() if n.endswith(("blocks.1.attn", "layer.1.attention"))]
    return {n: n for n in names}


def eager_features(model: nn.Module, family: Family, x: torch.Tensor, names) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: out.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in names]
    try:
        with torch.no_grad():
            out["output"] = family(model, x)
    finally:
        for h in handles:
            h.remove()
    return out


def fx_extractor(model: nn.Module, nodes: Dict[str, str]):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    return create_feature_extractor(model, return_nodes={**nodes, eval_nodes[-1]: "output"},
                                    tracer_kwargs=_tracer_kwargs())


@functools.lru_cache(maxsize=None)
def control_fx(name: str) -> Optional[str]:
    """Why the original does not fx-trace (``None`` when it does, equal to eager)."""
    family = FAMILY[name]
    model = build(family, None)
    try:
        extractor = fx_extractor(model, feature_nodes(model))
        x = torch.randn(2, 3, *family.sizes[0])
        with torch.no_grad():
            got = extractor(x)["output"]
        torch.testing.assert_close(got if torch.is_tensor(got) else got[0], family(model, x), **TOL)
    except Exception as e:  # noqa: BLE001 - whatever stops the original stops the test
        return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return None


def eager_sizes(family: Family) -> List[Tuple[int, int]]:
    """The family's sizes and other grids (non-square, a clamped axis) where the original runs in eager mode."""
    p = family.patch
    sizes = list(dict.fromkeys([*family.sizes, (2 * p, 5 * p), (6 * p, 3 * p)]))
    original = build(family, None)

    def runs(size) -> bool:
        try:
            with torch.no_grad():
                family(original, torch.randn(1, 3, *size))
        except Exception:  # noqa: BLE001 - e.g. a model built for one input size
            return False
        return True

    return [size for size in sizes if runs(size)]


@pytest.mark.parametrize("family, variant", family_variant_cases(VARIANTS))
def test_fx_feature_extraction_equals_eager(family, variant):
    why = control_fx(family.name)
    if why is not None:
        pytest.skip(f"the original {family.name} does not fx-trace either ({why})")
    model = build(family, variant)
    nodes = feature_nodes(model)
    extractor = fx_extractor(model, nodes)
    for size in eager_sizes(family):  # a traced graph holds for every grid
        x = torch.randn(2, 3, *size)
        ref = eager_features(model, family, x, nodes)
        with torch.no_grad():
            got = extractor(x)
        for key, value in ref.items():
            torch.testing.assert_close(got[key], value, **TOL, msg=lambda m: f"{key} at {size}: {m}")
    patch_name = next(iter(nodes))
    assert type(model.get_submodule(patch_name)) is GridConv2d
    # the conversion's parameters are graph parameters, not constants
    assert any(n.endswith("kappa") for n, _ in extractor.named_parameters())


def test_fx_graph_checks_masks_when_run():
    """timm's attn_mask=None, is_causal=False defaults are graph inputs under fx: the converted layers check them
    when the graph runs, not while tracing."""
    family = FAMILY["timm_vit"]
    model = build(family, "cbsa")
    gm = fx_extractor(model, {})
    x = torch.randn(1, 3, 32, 32)
    gm(x)
    with pytest.raises(ValueError, match="does not support attention masks"):
        gm(x, attn_mask=torch.zeros(17, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        gm(x, is_causal=True)
    gm(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))  # a mask that masks nothing is no mask
    assert MASK_MESSAGE.startswith("vit2cbsa: converted attention does not support attention masks")


def test_exported_hf_program_refuses_a_mask_that_masks_tokens():
    """Exported, transformers passes an all-visible mask instead of None; the program asserts it masks nothing."""
    family = FAMILY["hf_vit"]
    model = build(family, "linear")

    class WithMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x, mask):
            return self.model(pixel_values=x, attention_mask=mask, interpolate_pos_encoding=True).logits

    x = torch.randn(2, 3, *family.sizes[1])
    program = torch.export.export(WithMask(), (x, torch.ones(2, 25, dtype=torch.long))).module()
    torch.testing.assert_close(program(x, torch.ones(2, 25, dtype=torch.long)), family(model, x), **TOL)
    masked = torch.ones(2, 25, dtype=torch.long)
    masked[:, -3:] = 0
    with pytest.raises(RuntimeError, match="does not support attention masks"):
        program(x, masked)
    with pytest.raises(ValueError, match="does not support attention masks"):  # eager: refused as before
        model(pixel_values=x, attention_mask=masked, interpolate_pos_encoding=True)


# --- TorchScript -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_torchscript_fails_with_one_clear_line(variant):
    model = build(FAMILY["timm_vit"], variant)
    with pytest.raises(RuntimeError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(model)
    assert str(err.value) == TORCHSCRIPT_MESSAGE and "\n" not in TORCHSCRIPT_MESSAGE
    assert "torch.export" in TORCHSCRIPT_MESSAGE


# --- the symbolic path, piece by piece --------------------------------------------------------------------------


@pytest.mark.parametrize("grid, reps", [((8, 12), (4, 3)), ((7, 5), (3, 2)), ((2, 9), (3, 3)), ((1, 1), (8, 8)),
                                        ((5, 5), (5, 5))])
def test_separable_pooling_equals_the_eager_pooling(grid, reps):
    """The branch-free pooling of traced programs (row windows, then column windows) is the eager pooling."""
    h, w = grid
    x = torch.randn(2, 2 + h * w, 3, 4, dtype=torch.float64).transpose(1, 2)  # strided heads, as in a model
    gh, gw = effective_grid(reps, h, w)
    torch.testing.assert_close(_pool_separable(x[:, :, 2:], h, w, gh, gw), pool_patches(x, 2, h, w, reps))


def test_layout_under_export_keeps_symbolic_sizes_and_copies_drop_them():
    class Probe(nn.Module):
        def forward(self, x):
            layout = TokenLayout()
            layout.record(x)
            prefix, h, w = layout.split(1 + x.shape[-2] * x.shape[-1])
            assert prefix == 1 and isinstance(h, torch.SymInt)
            assert copy.deepcopy(layout).grid is None
            return x.new_zeros(h, w)

    from torch.export import Dim

    program = torch.export.export(Probe(), (torch.randn(1, 1, 3, 5),),
                                  dynamic_shapes={"x": {2: Dim("h", min=2), 3: Dim("w", min=2)}})
    assert program.module()(torch.randn(1, 1, 6, 4)).shape == (6, 4)
    layout = TokenLayout().use_grid((3, 4))
    assert copy.deepcopy(layout).grid == (3, 4) and pickle.loads(pickle.dumps(layout)).grid == (3, 4)
