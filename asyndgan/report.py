"""Evaluation and figures shared by the in-process trainer and the distributed generator."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw

from asyndgan.io import write_bytes_atomic

__all__ = ["Progress", "duration", "heldout_l1", "label_rgb", "samples_png", "steady_seconds"]

WARMUP_STEPS = 3

log = logging.getLogger(__name__)

_PALETTE = np.array(
    [[0, 0, 0], [70, 130, 180], [220, 120, 60], [240, 240, 200], [120, 200, 90], [200, 80, 160]] * 43,
    dtype=np.uint8,
)


def label_rgb(labels: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours."""
    return _PALETTE[np.asarray(labels, dtype=np.int64)]


def _gray(img: np.ndarray) -> np.ndarray:
    g = ((np.clip(img, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def heldout_l1(
    synthesize: Callable[[torch.Tensor], torch.Tensor],
    labels: np.ndarray,
    images: np.ndarray,
    channels: Sequence[int],
    batch_size: int = 16,
) -> float:
    """Mean |G(label) - real| (images in [-1, 1]) over held-out pairs; ``channels`` picks G's outputs."""
    total, count = 0.0, 0
    for i in range(0, len(labels), batch_size):
        fake = synthesize(torch.from_numpy(labels[i : i + batch_size]))[:, list(channels)]
        real = torch.from_numpy(images[i : i + batch_size])
        total += float((fake - real).abs().sum())
        count += real.numel()
    return total / max(count, 1)


def steady_seconds(step_seconds: Sequence[float]) -> float:
    """Mean seconds per step after the first ``WARMUP_STEPS`` (lazy init, allocator warm-up)."""
    tail = list(step_seconds[WARMUP_STEPS:]) or list(step_seconds)
    return sum(tail) / len(tail) if tail else float("nan")


def samples_png(path: Path, rows: Sequence[tuple[str, Sequence[np.ndarray]]], scale: int = 2) -> None:
    """A grid: one titled row per entry; panels are (H, W) label maps (uint8) or images in [-1, 1]."""
    tiles = []
    for _title, panels in rows:
        rgb = [label_rgb(p) if p.dtype == np.uint8 else _gray(p) for p in panels]
        tiles.append(np.concatenate(rgb, axis=1))
    width = max(t.shape[1] for t in tiles) * scale
    title_h = 14
    height = sum(t.shape[0] * scale + title_h for t in tiles)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (title, _), tile in zip(rows, tiles, strict=True):
        draw.text((2, y + 1), title, fill=(0, 0, 0))
        y += title_h
        img = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.Resampling.NEAREST)
        canvas.paste(img, (0, y))
        y += tile.shape[0] * scale
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def duration(seconds: float) -> str:
    """``seconds`` as 1h02m, 4m05s or 12s."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _num(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


class Progress:
    """Work done of ``total`` with rate, elapsed time and ETA, for training, ``asyndgan eval`` and ``make bench``.

    With ``bar`` (default: when the stream is a terminal) one redrawn status line; otherwise ``logging`` lines, at
    most one every ``interval`` seconds plus one at each phase change and one at the end, whatever the step rate.
    ``start``: work already done before this run (a resumed training); it counts towards done, not the rate.
    Thread-safe (``asyndgan eval`` feeds it from a thread that reads its worker processes' reports)."""

    def __init__(
        self,
        total: float,
        *,
        what: str = "step",
        unit: str = "it",
        start: float = 0,
        interval: float = 10.0,
        bar: bool | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.done = self.start_done = start
        self.interval = interval
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.clock = clock
        self.t0 = clock()
        self.last_line = float("-inf")  # the first update logs
        self.phase = ""
        self.ended = False
        self.lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.t0

    @property
    def rate(self) -> float:
        """Units per second in this run."""
        elapsed = self.elapsed
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds to ``total`` at this run's rate so far; None before any progress."""
        if self.done >= self.total:
            return 0.0
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self, **fields: float | str) -> str:
        eta = self.eta
        pct = 100.0 * self.done / self.total if self.total > 0 else 100.0
        parts = [
            f"{self.what}{f' [{self.phase}]' if self.phase else ''} {_num(self.done)}/{_num(self.total)} ({pct:.0f}%)",
            f"{self.rate:.3g} {self.unit}/s",
            f"elapsed {duration(self.elapsed)}",
            f"ETA {duration(eta) if eta is not None else '?'}",
        ]
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        return ", ".join(parts) + (f" {info}" if info else "")

    def update(self, done: float, phase: str | None = None, **fields: float | str) -> None:
        """Now ``done`` units are done (of ``total``), in ``phase`` if given; ``fields`` go on the line."""
        with self.lock:
            self._set(done, phase, fields)

    def advance(self, units: float = 1, phase: str | None = None, **fields: float | str) -> None:
        """``units`` more are done."""
        with self.lock:
            self._set(self.done + units, phase, fields)

    def _set(self, done: float, phase: str | None, fields: dict[str, float | str]) -> None:
        self.done = done
        changed = phase is not None and phase != self.phase
        self.phase = self.phase if phase is None else phase
        end = done >= self.total and not self.ended
        self.ended = self.ended or end
        if self.bar:
            self._draw(end, **fields)
        elif changed or end or self.clock() - self.last_line >= self.interval:
            self.last_line = self.clock()
            log.info("%s", self.line(**fields))

    def _draw(self, end: bool, **fields: float | str) -> None:
        filled = int(30 * min(self.done / self.total, 1.0)) if self.total > 0 else 30
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.line(**fields)}   ")
        if end:
            self.stream.write("\n")
        self.stream.flush()
