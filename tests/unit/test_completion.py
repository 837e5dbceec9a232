from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from asyndgan.data import SiteData
from asyndgan.experiments.completion import CONDITIONS, _conditions, _test_set, main


def site(n: int = 5) -> SiteData:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (n, 2, 8, 8)).astype(np.float32)
    return SiteData("s", rng.integers(0, 3, (n, 8, 8)).astype(np.uint8), images, ("t1", "t2"), 3)


def test_conditions_keep_t1_and_swap_only_t2() -> None:
    s = site()
    synth = np.full((5, 1, 8, 8), 0.5, np.float32)
    train = _conditions(s, synth)
    assert list(train) == list(CONDITIONS)
    for d in train.values():
        assert d.modalities == ("t1", "t2") and np.array_equal(d.images[:, 0], s.images[:, 0])
        assert np.array_equal(d.labels, s.labels)
    assert not train["t1 only"].images[:, 1].any()
    assert np.array_equal(train["t1 + synthetic t2"].images[:, 1:], synth)
    assert np.array_equal(train["t1 + real t2"].images[:, 1], s.images[:, 1])
    # the t1-only segmenter is tested without t2 too; the others on the real held-out pair
    assert not _test_set(s, "t1 only").images[:, 1].any()
    assert _test_set(s, "t1 + synthetic t2") is s


def test_quick_run_writes_a_report(tmp_path: Path) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "completion.json").read_text())
    assert res["generator"]["modalities"] == ["t1", "t2"]  # G makes t2 though the first site has none
    assert set(res["dice"]) == set(CONDITIONS)
    recipes = {c: (d["random_contrast_t2"], d["t2_dropout"]) for c, d in res["dice"].items()}
    assert recipes == {"t1 only": (False, 0), "t1 + synthetic t2": (True, 0.5), "t1 + real t2": (False, 0)}
    assert res["gap"] == res["dice"]["t1 + real t2"]["mean"] - res["dice"]["t1 only"]["mean"]
    # the oracle: site 0's slices through the other two hospitals' scanners, trained like the synthetic arm
    assert set(res["oracle"]) == {"t1 + t2 by scanner 1", "t1 + t2 by scanner 2"}
    for d in res["oracle"].values():
        assert (d["random_contrast_t2"], d["t2_dropout"]) == (True, 0.5) and d["g_t2_vs_this_t2"]["n"] > 0
        if res["gap"] > 0:
            assert d["gap_closed"] == pytest.approx((d["mean"] - res["dice"]["t1 only"]["mean"]) / res["gap"])
    md = (tmp_path / "completion.md").read_text()
    assert "share of the Dice gap" in md and "t1 + synthetic t2" in md and "t1 + t2 by scanner 2" in md


def test_a_bad_orientation_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--orient", "axial,sideways"])
    assert e.value.code == 2 and "unknown orientation 'sideways'" in capsys.readouterr().err
