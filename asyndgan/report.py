"""Evaluation and figures shared by the in-process trainer and the distributed generator."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, ImageDraw

from asyndgan.io import write_bytes_atomic

__all__ = ["Progress", "heldout_l1", "label_rgb", "samples_png", "steady_seconds"]

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


class Progress:
    """One status line: a redrawn bar on a terminal, a log line every ``every`` steps otherwise."""

    def __init__(self, total: int, every: int = 10, stream: TextIO | None = None) -> None:
        self.total = total
        self.every = max(every, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, **fields: float | str) -> None:
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        if self.tty:
            done = int(30 * step / max(self.total, 1))
            bar = "#" * done + "." * (30 - done)
            self.stream.write(f"\r[{bar}] {step}/{self.total} {rate:.2f} it/s {info}   ")
            if step >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.every == 0 or step >= self.total:
            log.info("step %d/%d %.2f it/s %s", step, self.total, rate, info)
