"""torch.compile traces converted attention without graph breaks; the speed benchmark's quick mode runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import vit2cbsa

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["cbsa", "contraction_free", "linear"])
@pytest.mark.parametrize("broadcast", ["key", "query"])
def test_no_graph_breaks_inside_converted_attention(variant, broadcast):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, num_classes=0)
    vit2cbsa.convert(model, variant, 4, broadcast=broadcast)
    vit2cbsa.layout_of(model).use_grid((4, 4))
    torch._dynamo.reset()
    x = torch.randn(2, 17, 32)
    explanation = torch._dynamo.explain(model.blocks[0].attn)(x)  # training graph
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    with torch.no_grad():  # inference
        explanation = torch._dynamo.explain(model.blocks[0].attn)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("resolution", [32, 48])  # unequal and equal pooling windows
def test_compiled_training_step_matches_eager(resolution):
    """The hand-written backward is traced by torch.compile: same outputs and gradients as eager."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=resolution, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=3).double()
    vit2cbsa.convert(model, "cbsa", 9)  # 3 x 3 representatives on a 4 x 4 / 6 x 6 patch grid
    x = torch.randn(2, 3, resolution, resolution, dtype=torch.float64)
    grads = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        for mixer in (mod for mod in model.modules() if hasattr(mod, "recompute")):
            mixer.recompute = fn is model  # eager keeps only q, k, v; compiled keeps A and B
        model.zero_grad()
        out = fn(x)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_speed_benchmark_quick_mode_runs(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    variants = {r["variant"] for r in record["rows"]}
    assert variants == {"original", "cbsa", "contraction_free", "linear"}
    for row in record["rows"]:
        assert row["infer_s"] > 0 and row["train_s"] > 0 and row["peak_train_mem_mib"] > 0
        for key in ("infer_ratio_rounds", "train_ratio_rounds"):  # quartiles of the per-round ratios
            q1, median, q3 = row[key]
            assert 0 < q1 <= median <= q3
        if row["variant"] == "original":
            assert row["flop_ratio"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    scaling = record["attention_scaling"][0]
    assert set(scaling["exponent"]) == variants and len(scaling["tokens"]) == 3


def test_time_repeats_alternates_and_paired_ratio_quartiles():
    from vit2cbsa.measure import paired_ratio_quartiles, time_repeats

    calls = []
    times = time_repeats({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    # ratios 2, 1, 4, 0.5, 3 -> sorted 0.5 1 2 3 4; exclusive quartiles at positions 1.5 and 4.5 of 5
    q1, median, q3 = paired_ratio_quartiles([2.0, 1.0, 4.0, 1.0, 3.0], [1.0, 1.0, 1.0, 2.0, 1.0])
    assert (q1, median, q3) == (0.75, 2.0, 3.5)
    assert paired_ratio_quartiles([3.0], [2.0]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        paired_ratio_quartiles([1.0, 2.0], [1.0])
