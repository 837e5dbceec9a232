"""The privacy evaluation (``make eval-privacy``): the quick run end to end, and the passive attack's indexed
slice book against the audit's plain one. Structure and ranges only: no expected values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asyndgan.clients.attacks import SliceBook
from asyndgan.data import load_site
from asyndgan.experiments import privacy_eval
from asyndgan.experiments.privacy_passive import IndexedSliceBook
from asyndgan.sampling import BatchSampler

MODE_KEYS = {"training", "similarity_heldout", "passive", "active", "membership", "memorisation", "utility"}
TARGETS = {
    "unguarded_active_leaks",
    "guarded_active_at_baseline",
    "guarded_passive_at_baseline",
    "membership_auc",
    "nearest_own_source",
    "utility",
    "step_time",
}


def _numbers(x: Any) -> list[float]:
    """Every int/float in a JSON value (bools excluded)."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return []
    if isinstance(x, int | float):
        return [float(x)]
    items = x.values() if isinstance(x, dict) else x
    return [v for item in items for v in _numbers(item)]


def _share(x: Any) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def _check_attack(r: dict[str, Any], slices: int) -> None:
    assert r["slices"] == slices and 0 < r["slices_seen"] <= slices
    assert _share(r["share_ge_30db"]) and _share(r["baseline_share_ge_30db"])
    for k in ("median_psnr_db", "baseline_median_psnr_db"):
        assert 0.0 < r[k] <= 150.0, (k, r[k])
    assert isinstance(r["leaks"], bool)


def _check_mode(key: str, m: dict[str, Any], steps: int) -> None:
    assert set(m) >= MODE_KEYS, key
    t = m["training"]
    assert t["steps"] == steps and all(a == steps for a in t["answers_per_site"])
    assert t["step_seconds_median"] > 0
    if key == "none":
        assert m["epsilon"] is None and t["noise_multiplier"] is None and t["epsilon_spent"] is None
    else:
        assert m["epsilon"] > 0 and t["noise_multiplier"] > 0
        assert all(0 < e <= m["epsilon"] + 1e-6 for e in t["epsilon_spent"])  # the budget holds
    sim = m["similarity_heldout"]
    assert sim["l1"] >= 0 and -1 <= sim["ssim"] <= 1 and sim["psnr"] > 0
    p = m["passive"]
    _check_attack(p, p["slices"])
    assert p["steps"] == steps and sum(p["visits_histogram"]) == p["slices"]
    assert 0 <= p["seen_ge_2"]["slices"] <= p["slices_seen"]
    _check_attack(m["active"], 75)
    assert m["active"]["site_privacy"] == ("none" if key == "none" else "dp")
    mem = m["membership"]
    assert _share(mem["auc"]) and _share(mem["auc_vs_heldout_block"]) and mem["members"] > mem["nonmembers"] > 0
    own = m["memorisation"]["nearest_is_own_source"]
    assert set(own) == {"training_l2", "training_ssim", "nonmember_l2", "nonmember_ssim"}
    assert all(_share(v) for v in own.values())
    u = m["utility"]
    assert 0.0 <= u["c"]["mean"] <= 1.0 and u["c_over_a"] >= 0.0


@pytest.mark.slow
def test_quick_privacy_evaluation_writes_report(tmp_path: Path) -> None:
    assert privacy_eval.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["quick"] is True
    assert all(math.isfinite(v) for v in _numbers(report))
    steps = report["config"]["steps"]
    assert set(report["modes"]) == {"none", "eps8"}
    for key, m in report["modes"].items():
        _check_mode(key, m, steps)
    a = report["utility"]["a"]
    assert 0.0 < a["mean"] <= 1.0 and len(a["per_seed"]) == len(report["config"]["seeds"])
    bench = report["step_time"]
    assert bench["unguarded_median_s"] > 0 and bench["guarded_median_s"] > 0 and bench["ratio"] > 0
    assert set(report["targets"]) == TARGETS
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    md = (tmp_path / "privacy.md").read_text()
    assert "## Targets" in md and ("MET" in md or "MISSED" in md) and "ε = 8" in md


def test_indexed_slice_book_places_views_as_the_plain_one() -> None:
    """Population views (flipped, shifted) land on the same slices at the same placements in both books."""
    data = load_site("embedded:icbm152?site=0&of=3&size=32&subjects=12")
    sampler = BatchSampler(data, 8, seed=3)
    views = [v for _ in range(30) for v in sampler.next().labels.numpy()]
    plain, indexed = SliceBook(32, 32, 1, max_shift=2), IndexedSliceBook(32, 32, 1, max_shift=2)
    assert [indexed.locate(v) for v in views] == [plain.locate(v) for v in views]
    assert len(indexed.slices) == len(plain.slices) <= len(data)
    for a, b in zip(plain.slices, indexed.slices, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)


def test_options_reject_bad_modes() -> None:
    parse = privacy_eval._parser().parse_args
    with pytest.raises(ValueError, match="mode"):
        privacy_eval.options_from_args(parse(["--quick", "--modes", "none,zero"]))
    with pytest.raises(ValueError, match="epsilon"):
        privacy_eval.options_from_args(parse(["--quick", "--modes", "-1"]))
    o = privacy_eval.options_from_args(parse(["--quick", "--modes", "none,3", "--steps", "5"]))
    assert o.modes == ("none", "3") and o.steps == 5 and o.quick
