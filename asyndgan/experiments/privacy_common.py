"""The privacy evaluation's setting (:class:`PrivacyOptions`), its data specs, a cached loader and a progress
clock that logs elapsed time and an ETA per phase. See :mod:`.privacy_eval` and docs/evaluation.md."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from asyndgan.data import SiteData, load_site
from asyndgan.experiments.datasets import pool_sites
from asyndgan.experiments.segmenter import SegConfig
from asyndgan.experiments.settings import EMBEDDED

__all__ = [
    "NONMEMBER_SEED",
    "PhaseClock",
    "PrivacyOptions",
    "active_spec",
    "finite",
    "heldout_specs",
    "load_cached",
    "load_pooled",
    "mode_epsilon",
    "mode_key",
    "nonmember_specs",
    "quick_options",
    "site_specs",
]

log = logging.getLogger(__name__)

NONMEMBER_SEED = 1  # population seed of the non-members: other people, same slab and scanner as a site's members


@dataclass(frozen=True)
class PrivacyOptions:
    """The privacy evaluation's setting. ``modes``: "none" (the paper's unguarded exchange) or an epsilon."""

    size: int = 64
    sites: int = 3
    subjects: int = 400  # virtual subjects per site (x 5 slices = 2,000 examples)
    heldout_subjects: int = 40  # per scanner, from the held-out block (the segmenter's test set)
    nonmember_subjects: int = 40  # per site, same slab and scanner, other people (membership, memorisation)
    steps: int = 300  # G steps of every mode; the guard plans its budget for exactly these
    batch: int = 8  # per site per step
    ngf: int = 32
    ndf: int = 32
    modes: tuple[str, ...] = ("none", "8", "3", "1")
    delta: float = 1e-5
    seeds: tuple[int, ...] = (0, 1, 2)  # segmenter seeds
    seg: SegConfig = field(default_factory=SegConfig)
    memo_limit: int = 96  # synthetic (and real non-member) images per memorisation-audit group
    active_subjects: int = 15
    active_slices: int = 5
    active_steps: int = 150
    gen_seed: int = 0
    jobs: int = 2
    threads: int = 2
    bench_rounds: int = 4  # step-time benchmark: rounds of bench_steps unguarded then guarded steps
    bench_steps: int = 8
    quick: bool = False

    def validate(self) -> None:
        if not self.modes:
            raise ValueError("at least one mode (none or an epsilon)")
        if len({mode_key(m) for m in self.modes}) != len(self.modes):
            raise ValueError(f"modes {list(self.modes)} name one mode twice")
        if min(self.size, self.sites, self.subjects, self.steps, self.batch, self.ngf, self.ndf) < 1:
            raise ValueError("size, sites, subjects, steps, batch, ngf and ndf must be >= 1")
        if min(self.heldout_subjects, self.nonmember_subjects, self.active_subjects, self.active_steps) < 1:
            raise ValueError("held-out, non-member and active subjects and active steps must be >= 1")
        if self.batch >= self.subjects or self.batch >= self.active_subjects:
            raise ValueError("the DP sample (one batch of subjects) must be smaller than every site's subjects")
        if not self.seeds or self.memo_limit < 2 or self.bench_rounds < 1 or self.bench_steps < 2:
            raise ValueError("need >= 1 seed, memo_limit >= 2, bench_rounds >= 1 and bench_steps >= 2")
        self.seg.validate()

    @property
    def guarded_modes(self) -> list[str]:
        return [m for m in self.modes if m != "none"]


def quick_options(**over: Any) -> PrivacyOptions:
    """Smoke-test sizes: 32 px, 20 subjects per site, 4 G steps, modes none and 8, one seed, everything in this
    process on one torch thread (the tests)."""
    q = PrivacyOptions(
        size=32,
        subjects=20,
        heldout_subjects=4,
        nonmember_subjects=4,
        steps=4,
        batch=4,
        ngf=8,
        ndf=8,
        modes=("none", "8"),
        seeds=(0,),
        seg=SegConfig(base=8, depth=2, steps=30, batch_size=8, lr=3e-3),
        memo_limit=8,
        active_steps=8,
        jobs=1,
        threads=1,
        bench_rounds=2,
        bench_steps=3,
        quick=True,
    )
    return dataclasses.replace(q, **over)


def mode_epsilon(mode: str) -> float | None:
    """None for "none", else the mode's epsilon (> 0)."""
    if mode == "none":
        return None
    try:
        eps = float(mode)
    except ValueError:
        raise ValueError(f"mode {mode!r}: expected 'none' or an epsilon such as 8") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"mode {mode!r}: epsilon must be a finite number > 0")
    return eps


def mode_key(mode: str) -> str:
    """The JSON key of a mode: "none" or "eps8"."""
    eps = mode_epsilon(mode)
    return "none" if eps is None else f"eps{eps:g}"


def _population(o: PrivacyOptions) -> str:
    return f"{EMBEDDED}?size={o.size}&of={o.sites}"


def site_specs(o: PrivacyOptions) -> list[str]:
    """The training sites: ``subjects`` virtual people per site, each imaged by the site's scanner."""
    return [f"{_population(o)}&site={j}&subjects={o.subjects}" for j in range(o.sites)]


def heldout_specs(o: PrivacyOptions) -> list[str]:
    """Held-out subjects (the held-out block, other people) imaged by each site's scanner: the test set."""
    return [f"{_population(o)}&split=heldout&subjects={o.heldout_subjects}&scanner={j}" for j in range(o.sites)]


def nonmember_specs(o: PrivacyOptions) -> list[str]:
    """Per site: other people (population seed NONMEMBER_SEED) from the same slab, imaged by the same scanner:
    the same distribution as the site's members, never trained on."""
    return [f"{_population(o)}&site={j}&subjects={o.nonmember_subjects}&seed={NONMEMBER_SEED}" for j in range(o.sites)]


def active_spec(o: PrivacyOptions) -> str:
    """The small site the active attack runs against (a real discriminator process)."""
    return f"{_population(o)}&site=0&subjects={o.active_subjects}&slices={o.active_slices}"


@functools.lru_cache(maxsize=32)
def load_cached(spec: str) -> SiteData:
    """``load_site(spec)``, once per process (a worker runs several tasks on the same data)."""
    t = time.perf_counter()
    data = load_site(spec)
    log.info("loaded %s: %d slices, %d subjects (%.1f s)", spec, len(data), data.num_subjects, time.perf_counter() - t)
    return data


def load_pooled(specs: list[str], name: str) -> SiteData:
    return pool_sites([load_cached(s) for s in specs], name)


def finite(x: float, digits: int = 4) -> float | None:
    """``x`` rounded, or None where it is NaN or infinite (JSON has no NaN)."""
    return round(float(x), digits) if math.isfinite(float(x)) else None


class PhaseClock:
    """Logs ``phase: done/total, elapsed, ETA`` every ``every`` units and at the end."""

    def __init__(self, phase: str, total: int, every: int = 0) -> None:
        self.phase, self.total = phase, max(1, total)
        self.every = every or max(1, self.total // 10)
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, done: int, extra: str = "") -> None:
        if done % self.every and done != self.total:
            return
        el = self.elapsed
        eta = el / max(done, 1) * (self.total - done)
        log.info("%s: %d/%d, %.0f s elapsed, ETA %.0f s%s", self.phase, done, self.total, el, eta, extra)
