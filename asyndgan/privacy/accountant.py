"""Privacy accounting for the site's DP-SGD discriminator (Rényi DP of the Poisson-subsampled Gaussian).

Model, stated once for every function here:

- Neighbour relation: **add/remove one subject** (a patient) from the site's data set. Each step samples
  subjects by **Poisson sampling** with rate ``q`` and uses exactly one example per sampled subject, so a
  subject's influence on one step is bounded by the per-example clip ``C``.
- Mechanism per step: the sampled Gaussian mechanism with noise multiplier ``sigma`` (noise std ``sigma * C``).
- Accountant: the **RDP accountant** (Mironov 2017, "Rényi Differential Privacy"; Mironov, Talwar, Zhang 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism"), as implemented by Opacus
  (``opacus.accountants.analysis.rdp``), with Opacus's default orders and its RDP -> (epsilon, delta) conversion
  (Balle et al. 2020, Thm. 21).

A run is a sequence of *segments* ``(q, sigma, steps)``; segments with different settings (e.g. across restarts)
compose by adding their RDP curves, exactly as ``opacus.accountants.RDPAccountant`` does with its history.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ORDERS", "Segment", "calibrate_sigma", "epsilon", "max_steps", "merge_step"]

Segment = tuple[float, float, int]
"""``(q, sigma, steps)``: ``steps`` steps with Poisson rate ``q`` and noise multiplier ``sigma``."""

# The orders of opacus.accountants.RDPAccountant.DEFAULT_ALPHAS (copied so the values are fixed here).
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

_MAX_STEPS_CAP = 10**12  # max_steps answers at most this (a mechanism that costs ~nothing per step)


def _check(q: float, sigma: float) -> None:
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q}")
    if not sigma > 0.0 or math.isnan(sigma):
        raise ValueError(f"noise multiplier sigma must be > 0, got {sigma}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@functools.lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian at every order of :data:`DEFAULT_ORDERS`."""
    out = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(DEFAULT_ORDERS)))
    out.setflags(write=False)
    return out


def _total_rdp(segments: Iterable[Segment]) -> np.ndarray:
    total = np.zeros(len(DEFAULT_ORDERS))
    for q, sigma, steps in segments:
        _check(q, sigma)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps:
            total = total + _rdp_per_step(float(q), float(sigma)) * steps
    return total


def _eps_from_rdp(rdp: np.ndarray, delta: float) -> float:
    if not np.any(rdp):
        return 0.0
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the edge of the list; that only loosens the bound (upper bound
        # stays valid), and it is routine while bisecting over sigma.
        warnings.simplefilter("ignore", UserWarning)
        eps, _order = rdp_analysis.get_privacy_spent(orders=list(DEFAULT_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def epsilon(segments: Sequence[Segment], delta: float) -> float:
    """Epsilon at ``delta`` after all ``segments`` ``(q, sigma, steps)`` (add/remove one subject, Poisson
    sampling, RDP accountant of Mironov 2017 / Mironov, Talwar, Zhang 2019). No steps -> 0.0."""
    _check_delta(delta)
    return _eps_from_rdp(_total_rdp(segments), delta)


def merge_step(segments: Sequence[Segment], q: float, sigma: float, steps: int = 1) -> list[Segment]:
    """``segments`` plus ``steps`` more steps at ``(q, sigma)``; extends the last segment when its settings match."""
    out = [(float(a), float(b), int(c)) for a, b, c in segments]
    if out and out[-1][0] == q and out[-1][1] == sigma:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(q), float(sigma), int(steps)))
    return out


def calibrate_sigma(
    q: float, steps: int, epsilon: float, delta: float, tol: float = 1e-4, sigma_max: float = 1e4
) -> float:
    """Smallest noise multiplier (within ``tol``, absolute) such that ``steps`` steps at rate ``q`` spend at most
    ``epsilon`` at ``delta`` (add/remove one subject, Poisson sampling, RDP accountant). The returned sigma always
    meets the target; it exceeds the exact minimum by less than ``tol``."""
    _check_delta(delta)
    target = epsilon
    if target <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target}")
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")

    def eps_at(sigma: float) -> float:
        return _eps_from_rdp(_rdp_per_step(float(q), sigma) * steps, delta)

    _check(q, 1.0)
    lo, hi = 0.0, 1.0
    while eps_at(hi) > target:
        lo, hi = hi, hi * 2.0
        if hi > sigma_max:
            raise ValueError(f"no sigma <= {sigma_max} reaches epsilon {target} with q={q}, steps={steps}")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mid > 0 and eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    log.debug("calibrated sigma %.5f for q=%g steps=%d epsilon=%g delta=%g", hi, q, steps, target, delta)
    return hi


def max_steps(q: float, sigma: float, epsilon: float, delta: float, spent_segments: Sequence[Segment] = ()) -> int:
    """Most further steps at ``(q, sigma)`` such that ``spent_segments`` plus them stay within ``epsilon`` at
    ``delta`` (add/remove one subject, Poisson sampling, RDP accountant). 0 when even one step would exceed it;
    capped at 10**12."""
    _check_delta(delta)
    _check(q, sigma)
    spent = list(spent_segments)

    def ok(t: int) -> bool:  # the same arithmetic as epsilon() on the merged history, so the ledger agrees
        return _eps_from_rdp(_total_rdp(merge_step(spent, q, sigma, t)), delta) <= epsilon

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while ok(hi):  # exponential search for a failing bound
        lo, hi = hi, hi * 2
        if hi > _MAX_STEPS_CAP:
            return _MAX_STEPS_CAP
    while hi - lo > 1:  # invariant: ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
