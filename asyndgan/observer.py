"""The one observer protocol of a training run (metrics, tests and benchmarks implement it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from asyndgan.algorithm import StepOutcome
from asyndgan.messages import LossTerm

__all__ = ["FanoutObserver", "NullObserver", "StepObserver"]


class StepObserver(Protocol):
    """Hooks the generator calls as it trains; directions are the generator's (``sent`` = to the site)."""

    def on_rpc(self, site: str, method: str, seconds: float, code: str) -> None: ...
    def on_bytes(self, site: str, direction: str, wire: int, payload: int) -> None: ...
    def on_drop(self, site: str, reason: str) -> None: ...
    def on_step(
        self, seconds: float, outcome: StepOutcome | None, active: int, site_losses: Mapping[str, Sequence[LossTerm]]
    ) -> None:
        """After each step attempt: its duration, outcome (None: no site could take part), sites that counted,
        and each site's last loss terms."""


class NullObserver:
    def on_rpc(self, site: str, method: str, seconds: float, code: str) -> None:
        pass

    def on_bytes(self, site: str, direction: str, wire: int, payload: int) -> None:
        pass

    def on_drop(self, site: str, reason: str) -> None:
        pass

    def on_step(
        self, seconds: float, outcome: StepOutcome | None, active: int, site_losses: Mapping[str, Sequence[LossTerm]]
    ) -> None:
        pass


class FanoutObserver:
    """Calls every observer's hook in turn (e.g. metrics plus a test's own observer)."""

    def __init__(self, *observers: StepObserver) -> None:
        self.observers = observers

    def on_rpc(self, site: str, method: str, seconds: float, code: str) -> None:
        for o in self.observers:
            o.on_rpc(site, method, seconds, code)

    def on_bytes(self, site: str, direction: str, wire: int, payload: int) -> None:
        for o in self.observers:
            o.on_bytes(site, direction, wire, payload)

    def on_drop(self, site: str, reason: str) -> None:
        for o in self.observers:
            o.on_drop(site, reason)

    def on_step(
        self, seconds: float, outcome: StepOutcome | None, active: int, site_losses: Mapping[str, Sequence[LossTerm]]
    ) -> None:
        for o in self.observers:
            o.on_step(seconds, outcome, active, site_losses)
