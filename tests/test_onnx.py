"""ONNX export (torch.onnx.export, dynamo=True) of converted models, run in ONNX Runtime against eager.

Every family of tests/conftest.py with CBSA, every variant on two families (conftest.family_variant_cases);
the unconverted model of every family goes through the same test as the control. Skipped (with the reason) only where onnx / onnxruntime are not installed; the test
extra installs them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import vit2cbsa
from vit2cbsa import export
from vit2cbsa.errors import ExportError
from conftest import FAMILIES, family_variant_cases, variant_options

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'vit2cbsa[export]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'vit2cbsa[export]')")

VARIANTS = ("cbsa", "contraction_free", "linear", "multiscale", "window")
CASES = [pytest.param(f, None, id=f"{f.name}-original") for f in FAMILIES] + family_variant_cases(VARIANTS)


def _build(family, variant):
    torch.manual_seed(0)
    model = family.build().eval()
    if variant is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny grids: "representatives not fewer than the patches"
            vit2cbsa.convert(model, variant, 4, **variant_options(variant))
        with torch.no_grad():  # step sizes off their initial values, so that they matter
            for p in vit2cbsa.new_parameters(model):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family, variant", CASES)
def test_onnx_runtime_equals_eager(family, variant, tmp_path):
    model = _build(family, variant)
    h, w = family.sizes[0]
    report = export.export_onnx(model, tmp_path / "model.onnx", export.example_input(model, 2, (h, w)))
    # export_onnx compared ONNX Runtime with eager itself; check that it did, and independently once more
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.dynamic_size == (not family.hf and family.sizes[0] != family.sizes[1])
    images = export.example_input(model, 3, (h, w), seed=7)
    with torch.no_grad():
        want = family(model, images)
    got = export.run_onnx(tmp_path / "model.onnx", images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if report.dynamic_size:  # another height and width than the one traced: the second size of the family
        images = export.example_input(model, 1, family.sizes[1], seed=8)
        with torch.no_grad():
            want = family(model, images)
        torch.testing.assert_close(export.run_onnx(tmp_path / "model.onnx", images), want, rtol=0, atol=1e-4)


def test_a_wrong_export_is_caught(tmp_path, monkeypatch):
    """The check is real: an ONNX file whose outputs differ from eager is refused."""
    model = _build(FAMILIES[0], "cbsa")
    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda path, images: real(path, images) + 1e-3)
    with pytest.raises(ExportError, match=r"ONNX Runtime differs from eager by 0\.001 \(> 0\.0001\) at 2x32x32"):
        export.export_onnx(model, tmp_path / "model.onnx")


def test_dynamic_size_on_a_fixed_size_model_says_what_to_do():
    model = _build(next(f for f in FAMILIES if f.name == "timm_vit_static_nonsquare"), "cbsa")
    with pytest.raises(ExportError, match="runs only at its own input size.*dynamic_img_size=True"):
        export.export_program(model, dynamic_size=True)


# --------------------------------------------------------------------------- the `vit2cbsa export` command


def _cli(capsys, *argv):
    from vit2cbsa.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def saved_folder(tmp_path):
    model = _build(next(f for f in FAMILIES if f.name == "timm_vit_static_nonsquare"), "contraction_free")
    return model, vit2cbsa.save_pretrained(model, tmp_path / "cf")


def test_cli_exports_a_saved_folder_to_onnx(saved_folder, tmp_path, capsys):
    model, folder = saved_folder
    code, out, err = _cli(capsys, "export", str(folder), "--out", str(tmp_path / "cf.onnx"))
    assert code == 0, err
    assert "ONNX; dynamic batch)" in out and "ONNX Runtime vs eager: max |diff|" in out and "at 2x24x40, 3x24x40" in out
    images = export.example_input(model, 2, (24, 40), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(export.run_onnx(tmp_path / "cf.onnx", images), model(images), rtol=0, atol=1e-4)


def test_cli_exports_a_program_that_reloads(saved_folder, tmp_path, capsys):
    model, folder = saved_folder
    code, out, err = _cli(capsys, "export", str(folder), "--out", str(tmp_path / "cf.pt2"))
    assert code == 0, err and "reloaded vs eager: max |diff|" in out
    program = torch.export.load(str(tmp_path / "cf.pt2")).module()
    images = export.example_input(model, 5, (24, 40), seed=4)
    with torch.no_grad():
        torch.testing.assert_close(program(images), model(images), rtol=0, atol=1e-5)


def test_cli_export_needs_a_known_suffix(saved_folder, tmp_path, capsys):
    _, folder = saved_folder
    code, _, err = _cli(capsys, "export", str(folder), "--out", str(tmp_path / "model.bin"))
    assert code == 1 and err.strip() == f"vit2cbsa: error: --out {tmp_path / 'model.bin'}: name the file .onnx or .pt2, or pass --format onnx|pt2"


def test_cli_export_refuses_to_change_a_saved_conversion(saved_folder, tmp_path, capsys):
    _, folder = saved_folder
    code, _, err = _cli(capsys, "export", str(folder), "--variant", "linear", "--out", str(tmp_path / "m.onnx"))
    assert code == 1 and "is already converted; cannot change variant='linear' (saved: 'contraction_free')" in err
