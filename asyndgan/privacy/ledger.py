"""Write-ahead privacy ledger: the site's spent budget, in a small JSON file kept apart from model checkpoints.

Every DP-SGD step is charged *before* it touches private data: :meth:`PrivacyLedger.charge` writes the
incremented history durably (temp file in the same folder, fsync, rename, fsync of the folder) and only then
returns. A crash between the charge and the step therefore over-counts by one step; the ledger never
under-counts. Restoring an older model checkpoint never restores budget.

File format (``version`` 1)::

    {"version": 1, "site_id": "...", "epsilon_budget": 3.0, "delta": 1e-05,
     "segments": [[q, sigma, steps], ...], "epsilon_spent": 1.23, "releases": {"name": [values], ...}}

``releases`` keeps one-off DP statistics (:meth:`PrivacyLedger.release`) so that a restarted site hands out the
same noisy values instead of drawing (and paying for) new ones.

``segments`` are the record; ``epsilon_spent`` is derived (recomputed on load, kept for people reading the file).
Accounting: add/remove one subject, Poisson sampling, RDP accountant (see :mod:`asyndgan.privacy.accountant`).

While open, a ledger holds an exclusive ``flock`` on a lock file beside it, so two processes cannot charge the
same budget independently (each would count only its own steps). Deleting the file resets the budget: protect it
like the data itself.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from asyndgan.errors import BudgetExhausted, FailedPrecondition
from asyndgan.io import remove_stale_temp, write_bytes_atomic
from asyndgan.privacy.accountant import Segment, epsilon, max_steps, merge_step

log = logging.getLogger(__name__)

__all__ = ["PrivacyLedger"]

_VERSION = 1


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_budget(epsilon_budget: float, delta: float) -> None:
    if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
        raise ValueError(f"epsilon budget must be a positive finite number, got {epsilon_budget}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _parse_segments(raw: Any, path: Path) -> list[Segment]:
    if not isinstance(raw, list):
        raise ValueError(f"privacy ledger {path} is corrupt: 'segments' is not a list")
    out: list[Segment] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and all(_number(v) for v in item)):
            raise ValueError(f"privacy ledger {path} is corrupt: bad segment {item!r}")
        q, sigma, steps = item
        if not (0 < q <= 1 and sigma > 0 and isinstance(steps, int) and steps >= 0):
            raise ValueError(f"privacy ledger {path} is corrupt: bad segment {item!r}")
        out.append((float(q), float(sigma), steps))
    return out


class PrivacyLedger:
    """The privacy budget of one site. Create with :meth:`open`; close (or use as a context manager) to release
    the lock."""

    def __init__(
        self, path: Path, site_id: str, epsilon_budget: float, delta: float, segments: list[Segment], lock_fd: int
    ) -> None:
        self.releases: dict[str, list[float]] = {}
        self.path = path
        self.site_id = site_id
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self._segments = segments
        self._lock_fd: int | None = lock_fd
        self._spent = epsilon(segments, delta)

    @classmethod
    def open(cls, path: Path | str, site_id: str, epsilon_budget: float, delta: float) -> PrivacyLedger:
        """Load the ledger at ``path`` or create an empty one.

        An existing ledger of another ``site_id`` raises ``ValueError``; an unreadable one raises ``ValueError``
        too (fail closed: never start over silently). If ``epsilon_budget`` or ``delta`` differ from the file's,
        the new values apply from now on (the hospital's decision, logged as a warning) and the spent steps are
        kept: epsilon spent is recomputed from them at the new delta. Raises :class:`FailedPrecondition` if
        another open ledger holds the lock."""
        _check_budget(epsilon_budget, delta)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._lock(path)
        try:
            remove_stale_temp(path)
            loaded = cls._load(path, site_id) if path.exists() else None
            ledger = cls(path, site_id, float(epsilon_budget), float(delta), loaded[0] if loaded else [], lock_fd)
            ledger.releases = loaded[3] if loaded else {}
            if loaded is None:
                log.info(
                    "created privacy ledger %s for site %s (epsilon %g, delta %g)", path, site_id, epsilon_budget, delta
                )
                ledger._write(ledger._segments, ledger._spent)
            else:
                ledger._reconcile_settings(loaded[1], loaded[2])
        except BaseException:
            os.close(lock_fd)
            raise
        log.info("privacy ledger %s: epsilon spent %.4g of %.4g (delta %g)", path, ledger._spent, epsilon_budget, delta)
        return ledger

    @staticmethod
    def _lock(path: Path) -> int:
        lock_path = path.with_name(f".{path.name}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"privacy ledger {path} is already open in another process or object") from None
        return fd

    @staticmethod
    def _load(path: Path, site_id: str) -> tuple[list[Segment], Any, Any, dict[str, list[float]]]:
        """(segments, stored epsilon budget, stored delta, releases) of the file at ``path``."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"privacy ledger {path} cannot be read ({exc}); refusing to start over") from exc
        if not isinstance(doc, dict) or doc.get("version") != _VERSION:
            raise ValueError(f"privacy ledger {path} is corrupt or of an unknown version")
        if doc.get("site_id") != site_id:
            raise ValueError(
                f"privacy ledger {path} belongs to site {doc.get('site_id')!r}, not {site_id!r}; "
                "each site needs its own ledger file"
            )
        segments = _parse_segments(doc.get("segments"), path)
        releases = doc.get("releases", {})
        if not isinstance(releases, dict) or not all(
            isinstance(v, list) and all(_number(x) for x in v) for v in releases.values()
        ):
            raise ValueError(f"privacy ledger {path} is corrupt: bad releases")
        return segments, doc.get("epsilon_budget"), doc.get("delta"), {k: list(v) for k, v in releases.items()}

    def _reconcile_settings(self, old_budget: Any, old_delta: Any) -> None:
        if old_budget != self.epsilon_budget or old_delta != self.delta:
            log.warning(
                "privacy ledger %s: budget changed from (epsilon %s, delta %s) to (epsilon %g, delta %g); "
                "the %d steps already spent are kept",
                self.path, old_budget, old_delta, self.epsilon_budget, self.delta, self.steps,
            )  # fmt: skip
            self._write(self._segments, self._spent)

    def _write(self, segments: list[Segment], spent: float) -> None:
        doc = {
            "version": _VERSION,
            "site_id": self.site_id,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "segments": [list(s) for s in segments],
            "epsilon_spent": spent,
            "releases": self.releases,
        }
        write_bytes_atomic(self.path, (json.dumps(doc, indent=2) + "\n").encode())
        _fsync_dir(self.path.parent)

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise FailedPrecondition(f"privacy ledger {self.path} is closed")

    def charge(self, q: float, sigma: float) -> float:
        """Record one more step at ``(q, sigma)`` durably and return epsilon spent including it. Raises
        :class:`BudgetExhausted` (recording nothing) if that step would exceed the budget."""
        self._require_open()
        segments = merge_step(self._segments, q, sigma)
        eps = epsilon(segments, self.delta)
        if eps > self.epsilon_budget:
            raise BudgetExhausted(
                f"epsilon spent {self._spent:.3g} of {self.epsilon_budget:.3g} (delta {self.delta:g}); "
                f"one more step at q={q:.3g}, sigma={sigma:.3g} would reach {eps:.3g}"
            )
        self._write(segments, eps)
        self._segments, self._spent = segments, eps
        return eps

    def release(self, name: str, sigma: float, compute: Callable[[], list[float]]) -> list[float]:
        """A one-off Gaussian release (noise multiplier ``sigma``, no subsampling) named ``name``: the first call
        charges it and stores ``compute()``'s noisy values with the charge in one durable write; later calls (also
        after a restart) return the stored values and charge nothing. BudgetExhausted if it does not fit."""
        self._require_open()
        if name in self.releases:
            return list(self.releases[name])
        segments = merge_step(self._segments, 1.0, sigma)
        eps = epsilon(segments, self.delta)
        if eps > self.epsilon_budget:
            raise BudgetExhausted(f"releasing {name} would spend epsilon {eps:.3g} of {self.epsilon_budget:.3g}")
        values = [float(v) for v in compute()]
        self.releases[name] = values
        self._write(segments, eps)
        self._segments, self._spent = segments, eps
        return list(values)

    def spent(self) -> float:
        """Epsilon spent so far at this ledger's delta."""
        return self._spent

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    @property
    def steps(self) -> int:
        """Total steps charged."""
        return sum(s[2] for s in self._segments)

    def remaining_steps(self, q: float, sigma: float) -> int:
        """How many more steps at ``(q, sigma)`` the budget allows."""
        return max_steps(q, sigma, self.epsilon_budget, self.delta, self._segments)

    def would_exceed(self, q: float, sigma: float) -> bool:
        """Whether one more step at ``(q, sigma)`` would exceed the budget (nothing is recorded)."""
        return epsilon(merge_step(self._segments, q, sigma), self.delta) > self.epsilon_budget

    def close(self) -> None:
        """Release the lock; the file is already up to date."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
