"""The evaluation (asyndgan.experiments): quick end-to-end run, custom data specs, metrics, G equivalence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asyndgan.algorithm import TrainConfig
from asyndgan.data import load_site
from asyndgan.experiments import evaluate as ev
from asyndgan.experiments.datasets import load_setting, split_contiguous
from asyndgan.experiments.generators import train_generator
from asyndgan.experiments.image_metrics import psnr, ssim
from asyndgan.experiments.memorisation import nearest_training
from asyndgan.experiments.settings import Setting, default_settings
from asyndgan.local import LocalRun, train_local
from asyndgan.nets import NetConfig
from tests.conftest import make_site


def _check_dice(entry: dict) -> None:
    for key, c in entry["conditions"].items():
        assert 0.0 <= c["mean"] <= 1.0, key
        for seed in c["per_seed"]:
            assert all(0.0 <= d <= 1.0 for d in seed["per_class"]), key
            assert len(seed["per_class"]) == entry["data"]["num_classes"] - 1


@pytest.mark.slow
def test_quick_evaluation_writes_report(tmp_path: Path) -> None:
    rc = ev.main(["--quick", "--jobs", "1", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["quick"] is True
    assert set(report["settings"]) == {"easy", "hard"}
    for s in report["settings"].values():
        assert {"a", "b0", "b1", "b2", "c", "d", "e0"} <= set(s["conditions"])
        _check_dice(s)
        # held-out = the held-out block imaged by each of the 3 sites' scanners; shifted = the reference scanner's
        assert s["data"]["heldout_slices"] == 3 * s["data"]["shifted_slices"] > 0
        assert all(0.0 <= c["shifted"]["mean"] <= 1.0 for c in s["conditions"].values())
        assert {"c_over_a", "c_gt_every_b", "e_ge_a", "a_converged"} <= set(s["targets"])
        for c in s["conditions"].values():  # every segmenter says how its training ended
            assert len(c["training"]["per_seed"]) == len(c["per_seed"])
            assert c["training"]["converged"] == all(p["converged"] for p in c["training"]["per_seed"])
        assert all(isinstance(t["met"], bool) for t in s["targets"].values())
        assert [p["step"] for p in s["curve"]] == [2, 4]
        assert s["curve"][-1]["c_mean"] == pytest.approx(s["conditions"]["c"]["mean"])
        for g in ("asyndgan", "centralised"):
            sim = s["similarity"][g]
            assert sim["l1"] >= 0 and -1 <= sim["ssim"] <= 1 and np.isfinite(sim["psnr"])
            groups = s["memorisation"][g]["groups"]
            assert {"real_heldout", "synthetic_heldout_labels", "synthetic_training_labels"} == set(groups)
            for name, grp in groups.items():
                assert grp["n"] > 0 and {"p0", "p50", "p100"} <= set(grp["l2"]) and "p50" in grp["ssim"]
                if name != "real_heldout":
                    for k in ("share_closer_than_every_real_heldout_l2", "share_closer_than_every_real_heldout_ssim"):
                        assert 0.0 <= grp[k] <= 1.0
            assert "share_nearest_is_own_source_l2" in groups["synthetic_training_labels"]
            assert 0.0 <= groups["synthetic_heldout_labels"]["share_nearer_a_training_image_than_own_l2"] <= 1.0
            assert "p50" in groups["synthetic_heldout_labels"]["own_ssim"]
            tr = groups["synthetic_training_labels"]
            assert tr["share_nearer_a_training_image_than_own_l2"] == pytest.approx(
                1 - tr["share_nearest_is_own_source_l2"]
            )
    md = (tmp_path / "eval.md").read_text()
    assert "(c) >= 0.98 x (a)" in md and "Memorisation" in md and "unseen scanner" in md
    assert "segmenter converged" in md and "(a) did not converge" in md  # quick: 30 steps, never flat
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_custom_specs_with_contiguous_holdout(tmp_path: Path) -> None:
    """Any data spec works: npz sites, held-out cut as a contiguous block with a gap."""
    specs = []
    for j in range(2):
        s = make_site(f"s{j}", n=20, size=32, seed=j)
        path = tmp_path / f"site{j}.npz"
        np.savez(path, labels=s.labels, images=s.images)
        specs += ["--site", f"npz:{path}?num_classes=4"]
    other = make_site("other", n=6, size=32, seed=9)
    np.savez(tmp_path / "other.npz", labels=other.labels, images=other.images)
    out = tmp_path / "out"
    shifted = ["--shifted", f"npz:{tmp_path / 'other.npz'}?num_classes=4"]
    argv = ["--quick", "--jobs", "1", "--threads", "1", *specs, *shifted, "--holdout-fraction", "0.2"]
    assert ev.main([*argv, "--site-styles", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    entry = report["settings"]["custom"]
    assert entry["config"]["site_styles"] is True and "site styles" in (out / "eval.md").read_text()
    assert entry["data"]["heldout_slices"] == 8  # 4 per site
    assert entry["data"]["shifted_slices"] == 6
    assert [x["slices"] for x in entry["data"]["sites"]] == [8, 8]  # 20 - 4 held out - 2 x 4 gap
    _check_dice(entry)
    assert 0.0 <= entry["conditions"]["a"]["shifted"]["mean"] <= 1.0


def test_heldout_rows_know_the_site_whose_scanner_imaged_them(tmp_path: Path) -> None:
    """Embedded: held-out spec j is site j's scanner; cut from the sites: each site's block; one held-out spec
    for several sites: unknown (a G with site styles then renders every style in turn)."""
    data = load_setting(default_settings(quick=True)["easy"])
    n = len(data.heldout) // 3
    assert data.heldout_sites is not None and data.heldout_sites.tolist() == [0] * n + [1] * n + [2] * n
    paths = []
    for j in range(2):
        s = make_site(f"s{j}", n=20, size=32, seed=j)
        paths.append(tmp_path / f"site{j}.npz")
        np.savez(paths[-1], labels=s.labels, images=s.images)
    specs = tuple(f"npz:{p}?num_classes=4" for p in paths)
    cut = load_setting(Setting("c", "", specs, (), holdout_fraction=0.2))
    assert cut.heldout_sites is not None and cut.heldout_sites.tolist() == [0] * 4 + [1] * 4
    assert load_setting(Setting("h", "", specs, specs[:1])).heldout_sites is None


def test_split_contiguous_is_a_block_with_gap() -> None:
    site = make_site(n=30, size=16)
    train, held = split_contiguous(site, 0.2, 3)
    assert len(held) == 6 and len(train) == 30 - 6 - 6
    start = (30 - 6) // 2
    np.testing.assert_array_equal(held.labels, site.labels[start : start + 6])
    np.testing.assert_array_equal(train.labels, np.concatenate([site.labels[: start - 3], site.labels[start + 9 :]]))


def test_ssim_and_psnr() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3))
    noisy = (x + 0.3 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    s = ssim(x, noisy)
    assert bool((s < 0.9).all() and (s > 0).all())
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x))  # symmetric
    # constant shift by c in [-1, 1] space: PSNR = 10 log10(4 / c^2)
    assert float(psnr(x, x + 0.1)[0]) == pytest.approx(10 * np.log10(4 / 0.01), rel=1e-4)
    # nearest_training finds an exact copy with L2 0 and SSIM 1
    train = x.numpy()
    l2, l2_i, ss, ss_i = nearest_training(train[[2, 0]], train)
    np.testing.assert_allclose(l2, 0, atol=1e-6)
    np.testing.assert_allclose(ss, 1, atol=1e-5)
    assert list(l2_i) == [2, 0] and list(ss_i) == [2, 0]


def test_train_generator_equals_train_local(one_thread: None) -> None:
    """The snapshotting loop is train_local's loop: G after k steps is identical bit for bit."""
    sites = [load_site(f"embedded:icbm152?site={j}&of=2&size=32&orient=axial") for j in range(2)]
    net, train = NetConfig(generator="unet_32", ngf=8, ndf=8), TrainConfig()
    run = LocalRun(iterations=3, batch_size=2, seed=5)
    ref = train_local(sites, None, net, train, run, None).generator.G.state_dict()
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def snap(step: int, _seconds: float, gen: object) -> None:
        seen[step] = {k: v.clone() for k, v in gen.G.state_dict().items()}  # type: ignore[attr-defined]

    train_generator(sites, net, train, run, [2, 3], snap)
    assert sorted(seen) == [2, 3]
    for k, v in ref.items():
        assert torch.equal(v, seen[3][k]), k
    assert any(not torch.equal(v, seen[2][k]) for k, v in ref.items())


def test_segmenter_pieces() -> None:
    from asyndgan.experiments.segmenter import SegUNet, class_weights, dice_per_class

    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2] = 1
    pred = truth.copy()
    pred[0, 0, :2] = 2  # 2 of 8 class-1 pixels predicted as class 2
    d = dice_per_class(pred, truth, 4)
    assert d[0] == pytest.approx(2 * 6 / (6 + 8)) and d[1] == 0.0 and d[2] == 1.0  # class 3 absent in both
    net = SegUNet(2, 4, base=4, depth=3)
    assert net(torch.zeros(2, 2, 30, 37)).shape == (2, 4, 30, 37)  # any size: padded and cropped back
    w = class_weights(np.array([[0, 0, 0, 1]], np.uint8), 3)
    assert float(w.mean()) == pytest.approx(1.0) and w[1] > w[0] and w[2] == w.max()
