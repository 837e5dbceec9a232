"""The site's privacy guard in-process: the class-mean release, write-ahead charging, refusal at the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from asyndgan.algorithm import SiteTrainer, TrainConfig
from asyndgan.errors import BudgetExhausted
from asyndgan.guard import PrivacyConfig, PrivacyGuard, class_means
from asyndgan.nets import NetConfig
from tests.conftest import make_site

NET = NetConfig(generator="unet_32", ngf=8, ndf=8)


def guarded(tmp_path: Path, n: int = 200, **cfg: object) -> tuple[SiteTrainer, PrivacyGuard]:
    data = make_site(n=n, modalities=("t1", "t2"))
    trainer = SiteTrainer(data, NET, TrainConfig(), batch_size=4, seed=0)
    guard = PrivacyGuard(PrivacyConfig(**cfg), data, "site-0", 4, tmp_path / "ledger.json", torch.device("cpu"))  # type: ignore[arg-type]
    trainer.guard = guard
    return trainer, guard


def test_class_means_are_the_per_subject_means_plus_the_stated_noise() -> None:
    data = make_site(n=400, modalities=("t1", "t2"))
    exact = np.asarray(class_means(data, 1e-9, torch.Generator().manual_seed(0))).reshape(4, 2)
    # make_site paints classes at fixed levels (+ small noise), so the exact means are those levels.
    np.testing.assert_allclose(exact[:, 0], [-1.0, -0.2, 0.3, 0.8], atol=0.02)
    noisy = np.stack(
        [np.asarray(class_means(data, 10.0, torch.Generator().manual_seed(s))) for s in range(400)]
    ).reshape(400, 4, 2)
    # Noise on the mean: 10 * sqrt(K*M) / n per entry; 400 draws pin its std within ~10 % (chi-square, 4 sigma).
    # Background (class 0) sits at -1, where the released value is clipped to [-1, 1]: left out of the check.
    std = (noisy - exact).std(0)[1:]
    assert np.all(np.abs(std / (10 * np.sqrt(8) / 400) - 1) < 0.15), std


def test_release_is_charged_once_and_reused_after_a_restart(tmp_path: Path) -> None:
    _, first = guarded(tmp_path)
    means, segments = first.class_means.clone(), first.ledger.segments
    assert segments == [(1.0, first.cfg.stats_noise, 1)]
    first.ledger.close()
    _, again = guarded(tmp_path)
    assert torch.equal(again.class_means, means) and again.ledger.segments == segments


def test_step_is_charged_before_it_runs_and_refused_at_the_budget(tmp_path: Path) -> None:
    trainer, guard = guarded(tmp_path, epsilon=0.6, noise_multiplier=1.5)
    allowed = guard.ledger.remaining_steps(guard.q, guard.sigma) // 2  # two modalities: two mechanisms a step
    assert 1 <= allowed < 50
    fakes = torch.zeros(4, 2, 32, 32)
    for _ in range(allowed):
        trainer.step(trainer.next_batch(), fakes, ["t1", "t2"])
    assert guard.ledger.steps == 2 * allowed + 1  # + the class-mean release
    before = [p.clone() for p in trainer.discriminators.parameters()]
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        trainer.step(trainer.next_batch(), fakes, ["t1", "t2"])
    assert guard.state().exhausted and guard.ledger.spent() <= 0.6
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.discriminators.parameters(), strict=True))


def test_guarded_losses_are_not_computed_on_real_images(tmp_path: Path) -> None:
    trainer, _ = guarded(tmp_path)
    trainer.step(trainer.next_batch(), torch.zeros(4, 2, 32, 32), ["t1", "t2"])
    assert {t.term for t in trainer.last_losses} == {"fake", "gan", "anchor", "total"}


def test_delta_must_be_below_one_over_n(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="below 1/n"):
        guarded(tmp_path, n=20, delta=0.1)
