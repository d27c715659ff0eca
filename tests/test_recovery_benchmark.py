"""The recovery benchmark's summary logic: alignment comparisons and reuse of earlier runs."""

import json

import pytest

from helpers import load_benchmark



@pytest.fixture(scope="module")
def recovery():
    return load_benchmark("recovery")


def curve(accs, every=50):
    return [dict(step=i * every, stage="x", accuracy=a, train_s=float(i)) for i, a in enumerate(accs)]


def test_compare_pair_thresholds_and_gaps(recovery):
    teacher = 0.80
    with_align = curve([0.30, 0.60, 0.75, 0.785, 0.79])
    without = curve([0.30, 0.50, 0.70, 0.76, 0.781])
    c = recovery.compare_pair(with_align, without, teacher)
    # teacher - 2 points = 0.78: reached at step 150 with alignment, at step 200 without
    assert c["threshold"] == pytest.approx(0.78)
    assert c["with_alignment"]["step"] == 150 and c["without_alignment"]["step"] == 200
    assert c["alignment_reaches_it_in_fewer_steps"] is True
    # gaps at steps 50..200: +10, +5, +2.5, +0.9 points
    assert [st for st, _ in c["gap_points_by_step"]] == [50, 100, 150, 200]
    assert [g for _, g in c["gap_points_by_step"]] == pytest.approx([10, 5, 2.5, 0.9])
    assert c["aligned_ahead_at_evals"] == "4/4"
    assert c["mean_gap_points"] == pytest.approx((10 + 5 + 2.5 + 0.9) / 4, abs=0.01)
    drops = {t["drop_points"]: (t["with_alignment_step"], t["without_alignment_step"]) for t in c["other_thresholds"]}
    assert drops[1] == (200, None) and drops[5] == (100, 150) and drops[20] == (50, 100)


def test_compare_pair_falls_back_to_the_highest_common_threshold(recovery):
    c = recovery.compare_pair(curve([0.5, 0.70, 0.737]), curve([0.5, 0.739, 0.72]), teacher_sub=0.80)
    assert c["threshold"] == pytest.approx(0.735)  # min(0.737, 0.739) down to the 0.5-point grid
    assert (c["with_alignment"]["step"], c["without_alignment"]["step"]) == (100, 50)
    assert c["alignment_reaches_it_in_fewer_steps"] is False


def test_reuse_rejects_other_teacher_or_settings(recovery, tmp_path):
    settings = dict(lr=5e-4, seed=0, eval_subset=1000, work_dir="/a", data="/d")
    old = dict(date_utc="then", command="cmd", teacher=dict(sha256="abc"), settings=dict(settings, work_dir="/b"),
               runs={"cbsa": {"curve": []}, "linear": {"curve": []}})
    path = tmp_path / "recovery.json"
    path.write_text(json.dumps(old))
    got = recovery.reused_runs(path, settings, "abc", skip=["linear"])
    assert list(got) == ["cbsa"] and got["cbsa"]["reused_from"]["date_utc"] == "then"
    with pytest.raises(SystemExit, match="another teacher"):
        recovery.reused_runs(path, settings, "xyz", skip=[])
    with pytest.raises(SystemExit, match="other settings.*'lr'"):
        recovery.reused_runs(path, dict(settings, lr=1e-4), "abc", skip=[])
