"""Overall progress of ``asyndgan eval``: work done of the whole evaluation, with rate and ETA
(:class:`asyndgan.report.Progress`: a log line at each phase change and at most every 30 s in between).

The work is counted in units of one segmenter training step: a segmenter run is ``seg.steps`` units, a generator
step :data:`GEN_STEP_UNITS` units (the reference run, results/eval.json, took ~0.43 s per generator step and ~0.055 s
per segmenter step, one thread each), a memorisation audit :func:`audit_units` (planned as one segmenter run until
the setting's data are loaded and its sizes known). The worker processes report through a queue that the pool's
initializer hands them (:func:`init_worker`); in-process work reports straight to the
:class:`~asyndgan.report.Progress`. Without an active :class:`EvalProgress`,
:func:`advance` does nothing (the generators and segmenters are also used outside the evaluation).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from asyndgan.experiments.settings import EvalOptions, Setting
from asyndgan.report import Progress

__all__ = ["GEN_STEP_UNITS", "EvalProgress", "advance", "audit_units", "init_worker", "planned_units"]

GEN_STEP_UNITS = 8
AUDIT_SEGMENTERS = 1
# Units per (query image x training image x pixel) of an audit: the reference hard setting's audit (488 queries x 224
# training images of 128 x 128 px) took ~2000 units' time.
AUDIT_UNITS_PER_PAIR_PIXEL = 1.2e-6
LOG_INTERVAL_S = 30.0

_sink: Callable[[float], None] | None = None  # where advance() sends units in this process


def advance(units: float) -> None:
    """Report ``units`` of work done (from the main process or a worker)."""
    if _sink is not None:
        _sink(units)


def init_worker(queue: Any) -> None:
    """In a pool worker: report to the main process through ``queue``."""
    global _sink
    _sink = queue.put


def segmenter_runs(setting: Setting, opts: EvalOptions) -> int:
    """Segmenters :func:`~asyndgan.experiments.segmentation.training_conditions` asks for: (a), (b) per site, (c),
    (d), (e) per augmented site, (c) at each earlier G snapshot; each for every seed."""
    n = len(setting.site_specs)
    augmented = (n if opts.augment == "all" else 1) if n > 1 else 0
    return (1 + n + 2 + augmented + len(setting.snapshot_steps()) - 1) * len(opts.seeds)


def planned_units(setting: Setting, opts: EvalOptions) -> float:
    """The whole work of one setting: two generators, the segmenters and two memorisation audits."""
    seg = setting.seg.steps
    return 2 * setting.gen_steps * GEN_STEP_UNITS + segmenter_runs(setting, opts) * seg + 2 * AUDIT_SEGMENTERS * seg


def audit_units(n_train: int, n_heldout: int, pixels: int) -> float:
    """One memorisation audit: the held-out real and synthetic images and the synthetic training images, each
    against every training image."""
    return float(round((2 * n_heldout + n_train) * n_train * pixels * AUDIT_UNITS_PER_PAIR_PIXEL))


class EvalProgress:
    """The evaluation's progress while the ``with`` block runs; :attr:`queue` goes to the worker pool."""

    def __init__(self, settings: Sequence[Setting], opts: EvalOptions) -> None:
        total = sum(planned_units(s, opts) for s in settings)
        self.progress = Progress(total, what="eval", unit="units", interval=LOG_INTERVAL_S, bar=False)
        self.queue: Any = mp.get_context("spawn").Queue() if opts.jobs > 1 else None
        self._reader: threading.Thread | None = None
        self._audits: dict[str, float] = {}

    def phase(self, name: str) -> None:
        self.progress.update(self.progress.done, phase=name)

    def data_loaded(self, setting: Setting, n_train: int, n_heldout: int, pixels: int) -> None:
        """The setting's sizes are known: plan its two audits by them."""
        audits = 2 * audit_units(n_train, n_heldout, pixels)
        with self.progress.lock:
            self.progress.total += audits - 2 * AUDIT_SEGMENTERS * setting.seg.steps
        self._audits[setting.name] = audits

    def audits_done(self, setting: Setting) -> None:
        advance(self._audits.get(setting.name, 2 * AUDIT_SEGMENTERS * setting.seg.steps))

    def _read(self) -> None:
        while (units := self.queue.get()) is not None:
            self.progress.advance(units)

    def __enter__(self) -> EvalProgress:
        global _sink
        _sink = self.progress.advance
        if self.queue is not None:
            self._reader = threading.Thread(target=self._read, name="eval-progress", daemon=True)
            self._reader.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _sink
        _sink = None
        if self._reader is not None:
            self.queue.put(None)
            self._reader.join(timeout=10)
            self.queue.close()
        if kind is None and not self.progress.ended:  # the estimate was high: say it is done
            self.progress.update(self.progress.total, phase="done")
