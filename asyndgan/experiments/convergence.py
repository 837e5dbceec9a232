"""G's stop rule for the evaluation: train until the sites' own L1 stops improving, or a wall-time budget ends.

The signal is what a deployed generator sees too: the L1 term each site reports with its gradient (site-weighted,
averaged over ``window`` steps). No held-out image is looked at, so the test set stays a test set. G stops once
``patience`` windows in a row have gained less than ``rel_tol`` (relative) over the best window before them
("plateau", converged), once its training time passes ``budget_s`` ("budget"), or at the steps cap
("max_steps"); the last two are marked not converged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from asyndgan.algorithm import StepOutcome
from asyndgan.messages import StepAnswer

__all__ = ["GStopRule", "site_l1"]


def site_l1(outcome: StepOutcome) -> float:
    """The sites' L1 terms of one step, each site's mean over its modalities, weighted as G weighted them."""
    total = weight = 0.0
    for r, w in zip(outcome.results, outcome.weights, strict=True):
        terms = [t.value for t in r.losses if t.network == "G" and t.term == "l1"] if isinstance(r, StepAnswer) else []
        if terms and w > 0:
            total += w * statistics.fmean(terms)
            weight += w
    return total / weight if weight else math.nan


@dataclass
class GStopRule:
    """Feed it every step (:meth:`observe`); it says when to stop and why (:attr:`reason`)."""

    window: int = 50
    patience: int = 3
    rel_tol: float = 0.01
    budget_s: float = math.inf
    reason: str = ""  # "plateau" or "budget" once it fired
    windows: list[tuple[int, float]] = field(default_factory=list)  # (last step, mean site L1) per window
    _values: list[float] = field(default_factory=list)
    _best: float = math.inf
    _flat: int = 0

    def observe(self, step: int, seconds: float, outcome: StepOutcome) -> bool:
        """Take step ``step`` (``seconds`` of G training so far); True once G should stop."""
        value = site_l1(outcome)
        if math.isfinite(value):
            self._values.append(value)
        if step % self.window == 0 and self._values:
            mean = statistics.fmean(self._values)
            self._values.clear()
            self.windows.append((step, mean))
            if mean < self._best * (1 - self.rel_tol):
                self._best, self._flat = mean, 0
            else:
                self._flat += 1
            if self._flat >= self.patience:
                self.reason = "plateau"
        if not self.reason and seconds >= self.budget_s:
            self.reason = "budget"
        return bool(self.reason)

    def summary(self, steps: int) -> dict[str, Any]:
        """For eval.json: how training ended after ``steps`` steps, and the L1 windows."""
        return {
            "steps": steps,
            "stopped_by": self.reason or "max_steps",
            "converged": self.reason == "plateau",
            "rule": {"window": self.window, "patience": self.patience, "rel_tol": self.rel_tol},
            "budget_s": None if math.isinf(self.budget_s) else self.budget_s,
            "site_l1_windows": [[s, round(v, 5)] for s, v in self.windows],
        }
