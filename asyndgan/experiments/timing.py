"""Measuring helpers of the benchmarks: best-of timing, the cores this process may use, and per-section wall
time with the share of the machine that other processes used meanwhile."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["best_of", "clock", "cores"]


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn``, in seconds."""
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cores() -> int:
    """CPUs this process may run on (the affinity mask, e.g. under ``taskset``), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_and_own_cpu_s() -> tuple[float, float]:
    """(CPU seconds all processes on this machine have used, CPU seconds this process and its waited-for
    descendants have used), for telling how much other work shared the machine during a section."""
    own = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan, own
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (idle iowait) irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), own


@contextlib.contextmanager
def clock(log_rows: list[dict[str, Any]], name: str) -> Iterator[None]:
    """Records a section's wall time and the share of the machine's CPU that *other* processes used meanwhile."""
    busy0, own0, t0 = *_busy_and_own_cpu_s(), time.perf_counter()
    yield
    busy1, own1, wall = *_busy_and_own_cpu_s(), time.perf_counter() - t0
    n = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * n) if wall > 0 else math.nan
    log_rows.append({"section": name, "seconds": wall, "other_processes_cpu_share": others})
