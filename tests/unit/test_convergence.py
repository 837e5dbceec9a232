"""G's stop rule: the sites' L1 signal, plateau, budget, and the loop that obeys it."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from asyndgan.algorithm import Dropped, StepOutcome, TrainConfig
from asyndgan.experiments import eval_progress
from asyndgan.experiments.convergence import GStopRule, site_l1
from asyndgan.experiments.evaluate import add_eval_flags, settings_from_args
from asyndgan.experiments.generators import train_generator
from asyndgan.experiments.settings import default_settings
from asyndgan.local import LocalRun
from asyndgan.messages import LossTerm, StepAnswer
from asyndgan.nets import NetConfig
from tests.conftest import make_site


def answer(*l1: float) -> StepAnswer:
    losses = [LossTerm("G", f"m{i}", "l1", v) for i, v in enumerate(l1)] + [LossTerm("G", "m0", "gan", 9.0)]
    return StepAnswer(0, torch.zeros(1), losses, 0, torch.zeros(0, dtype=torch.uint8))


def outcome(l1: float) -> StepOutcome:
    return StepOutcome(0, [answer(l1)], [1.0])


def test_site_l1_is_weighted_as_g_weighted_the_sites() -> None:
    out = StepOutcome(0, [answer(0.2, 0.4), answer(0.6), Dropped("deadline")], [0.25, 0.75, 0.0])
    assert site_l1(out) == pytest.approx(0.25 * 0.3 + 0.75 * 0.6)
    assert math.isnan(site_l1(StepOutcome(0, [Dropped("deadline")], [0.0])))


def test_stops_on_a_plateau_not_while_improving() -> None:
    rule = GStopRule(window=10, patience=3, rel_tol=0.01)
    steps = 0
    for step in range(1, 1001):
        value = 1.0 / step if step <= 200 else 0.005  # improving, then flat from step 200
        steps = step
        if rule.observe(step, 0.0, outcome(value)):
            break
    assert rule.reason == "plateau"
    assert 230 <= steps <= 240  # three flat windows after the last improving one
    s = rule.summary(steps)
    assert s["stopped_by"] == "plateau" and s["converged"] and s["site_l1_windows"][-1][0] == steps


def test_budget_or_cap_is_not_converged() -> None:
    rule = GStopRule(window=10, budget_s=5.0)
    assert not rule.observe(1, 4.9, outcome(1.0)) and rule.observe(2, 5.0, outcome(0.5))
    assert rule.summary(2)["stopped_by"] == "budget" and not rule.summary(2)["converged"]
    capped = GStopRule(window=10)
    for step in range(1, 31):
        capped.observe(step, 0.0, outcome(1.0 / step))
    assert capped.summary(30)["stopped_by"] == "max_steps" and not capped.summary(30)["converged"]


def test_training_ends_where_the_rule_fires_with_a_last_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    sites = [make_site("a", n=8, size=32), make_site("b", n=8, size=32, seed=1)]
    snaps: list[int] = []
    rule = GStopRule(window=2, budget_s=0.0)  # fires at the first step: the budget is spent
    units: list[float] = []
    monkeypatch.setattr(eval_progress, "_sink", units.append)
    gen = train_generator(
        sites, NetConfig(generator="unet_32", ngf=8, ndf=8), TrainConfig(), LocalRun(10, 2, 0), [5, 10],
        lambda step, _s, _g: snaps.append(step), stop=rule,
    )  # fmt: skip
    assert gen.steps == 1 and snaps == [1] and rule.reason == "budget"
    assert sum(units) == 10 * eval_progress.GEN_STEP_UNITS  # the eval's progress counts the cap as done


def test_g_patience_flag_reaches_the_setting() -> None:
    p = argparse.ArgumentParser()
    add_eval_flags(p)
    (hard,) = settings_from_args(p.parse_args(["--setting", "hard", "--g-patience", "4"]))
    assert hard.gen_patience == 4 and default_settings()["hard"].gen_patience == 6
    (easy,) = settings_from_args(p.parse_args(["--setting", "easy", "--stale", "--g-ema", "0.99"]))
    assert easy.gen_stale and easy.gen_ema == 0.99 and not default_settings()["easy"].gen_stale
    with pytest.raises(ValueError, match="decay"):
        settings_from_args(p.parse_args(["--setting", "easy", "--g-ema", "1"]))
    with pytest.raises(ValueError, match="gen_patience"):
        settings_from_args(p.parse_args(["--setting", "hard", "--g-patience", "0"]))
