"""benchmarks/device_check.sh on the CPU (``--device cpu --quick``): everything the GPU check does that a CPU can run,
so that the day it runs on a GPU only GPU problems are left. Plus its benchmark-only SDPA mixer against the library's
mixer, and its float64 reference comparison (it passes the library in float64 and catches a wrong mixer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check as dc  # noqa: E402

from vit2cbsa.attention import CBSAMixer, ContractionFreeMixer  # noqa: E402
from vit2cbsa.layout import TokenLayout  # noqa: E402


def test_the_script_runs_on_cpu_quick(tmp_path):
    out = tmp_path / "dc"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--device", "cpu", "--quick",
                           "--compile-backend", "aot_eager", "--threads", "1", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "device_check.sh: python" in proc.stdout and "correctness PASSED" in proc.stdout
    record = json.loads((out / "device_check_cpu_quick.json").read_text())
    assert record["correct"] and record["environment"]["dtype"] == "bfloat16"
    checked = {(r["check"], r["name"], r["dtype"]) for r in record["correctness"]}
    for name in dc.MIXERS:
        assert {("mixer", name, "float32"), ("mixer", name, "bfloat16")} <= checked
    assert {n for c, n, _ in checked if c == "sdpa_alternative"} == {"cbsa/query", "cbsa/key", "contraction_free/query"}
    assert sum(c == "model" for c, _, _ in checked) == 6 and sum(c == "compile" for c, _, _ in checked) == 1
    # every timed model, both configurations, eager inference + training + CPU peak memory
    timed = {(r["resolution"], r["batch"], r["variant"]) for r in record["speed"]}
    assert timed == {(res, b, v) for res, b in ((32, 4), (64, 1)) for v in dc.TIMED}
    assert all(r["infer_ms"] > 0 and r["train_ms"] > 0 and r["peak_train_mib"] is not None for r in record["speed"])
    # compiled (aot_eager here, inductor on the GPU): one configuration, the original, cbsa and the SDPA alternative
    (compiled,) = record["compiled"]
    assert set(compiled["compiled"]) == {"original", "cbsa", "cbsa+sdpa"}
    for entry in compiled["compiled"].values():
        assert entry["infer"]["ms"] > 0 and entry["train"]["ms"] > 0, entry
    md = (out / "device_check_cpu_quick.md").read_text()
    assert "correctness PASSED" in md and "| tiny/8 | 32 | 4 | cbsa+sdpa |" in md
    assert "## Explicit matmuls or SDPA" in md
    assert record["seconds"] < 120


DESIGNS = [("prefix", "own", "query"), ("prefix", "own", "key"), ("prefix", "all", "query"), ("none", "all", "key"),
           ("global", "all", "query")]


@pytest.mark.parametrize("cls", [CBSAMixer, ContractionFreeMixer])
@pytest.mark.parametrize("extra,prefix_broadcast,broadcast", DESIGNS)
def test_sdpa_mixer_matches_the_library_mixer(cls, extra, prefix_broadcast, broadcast):
    """The benchmark-only SDPA form of CBSA computes the library's function: outputs and every gradient, float64,
    unequal pooling windows (a 5 x 7 grid into 2 x 3), two prefix tokens."""
    torch.manual_seed(0)
    mixer = cls(3, 8, (2, 3), broadcast=broadcast, extra_representatives=extra, prefix_broadcast=prefix_broadcast)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    mixer = mixer.double()
    layout = TokenLayout((5, 7))
    qkv = [torch.randn(2, 3, 2 + 35, 8, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(2, 3, 37, 8, dtype=torch.float64)
    results = []
    for m in (mixer, dc.SDPAMixer(mixer)):
        q, k, v = (t.clone().requires_grad_(True) for t in qkv)
        mixer.zero_grad()
        out = m(q, k, v, layout)
        (out * w).sum().backward()
        results.append([out, q.grad, k.grad, v.grad] + [p.grad.clone() for p in mixer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_sdpa_mixer_refuses_the_transpose_broadcast():
    with pytest.raises(ValueError, match="transpose"):
        dc.SDPAMixer(CBSAMixer(2, 8, (2, 2), broadcast="transpose"))


def test_float64_reference_comparison_passes_the_library_and_catches_a_wrong_mixer():
    cpu = torch.device("cpu")
    rows = dc.check_mixers(cpu, [torch.float64, torch.float16], quick=True)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert max(r["out"] for r in rows if r["dtype"] == "float64") < 1e-13

    def wrong(name, d, heads):  # the right mixer with its step size kappa 5% off
        m = dc._mixer(name, d, heads)
        with torch.no_grad():
            m.kappa.mul_(1.05)
        return m

    caught = dc.check_mixers(cpu, [torch.float32], quick=True, make=wrong)
    assert not any(r["ok"] for r in caught), caught
    assert all("out" in r["over"] for r in caught)
    # the tiny models on the device (here the CPU, float32) against float64, and the budget guard
    assert all(r["ok"] for r in dc.check_models(cpu, None))
    assert dc.Budget(10).allows(5) and not dc.Budget(10).allows(20)
