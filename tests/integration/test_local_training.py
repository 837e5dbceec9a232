"""The in-process reference trainer learns: held-out L1 falls clearly in ~50 steps at 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyndgan.algorithm import TrainConfig
from asyndgan.data import load_site
from asyndgan.local import LocalRun, train_local
from asyndgan.nets import NetConfig


@pytest.mark.slow
def test_heldout_l1_falls(tmp_path: Path) -> None:
    sites = [load_site(f"embedded:icbm152?site={j}&of=3&size=32") for j in range(3)]
    heldout = load_site("embedded:icbm152?split=heldout&of=3&size=32")
    result = train_local(
        sites,
        heldout,
        NetConfig(generator="unet_32", ngf=16, ndf=16),
        TrainConfig(),
        LocalRun(iterations=50, batch_size=8, seed=0),
        tmp_path,
    )
    s = result.summary
    assert s["l1_heldout"] < 0.6 * s["l1_heldout_start"], s
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 50
