"""Figures, PIL only: the evaluation's ``eval.png`` (examples, Dice bars, (c)/(a) curve) and the benchmark's
``bytes.png`` (bytes on the wire per epoch)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from asyndgan.io import write_bytes_atomic
from asyndgan.report import label_rgb

__all__ = ["bytes_png", "figure_png"]

_TILE = 96


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- eval.png ------------------------------------------------------------------------------------------


def _tile(img: np.ndarray) -> Image.Image:
    if img.dtype == np.uint8:
        rgb = label_rgb(img)
    else:
        g = ((np.clip(img, -1, 1) + 1) * 127.5).round().astype(np.uint8)
        rgb = np.repeat(g[..., None], 3, axis=2)
    return Image.fromarray(rgb).resize(
        (_TILE, _TILE), Image.Resampling.BILINEAR if img.dtype != np.uint8 else Image.Resampling.NEAREST
    )


def _bars(s: dict[str, Any], width: int, height: int) -> Image.Image:
    """Mean Dice ± std per condition, y axis zoomed to the data."""
    im = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(im)
    conds = s["conditions"]
    keys = list(conds)
    lo_data = min(c["mean"] - c["std"] for c in conds.values())
    y0 = max(0.0, math.floor((lo_data - 0.05) * 10) / 10)
    left, right, top, bottom = 40, width - 10, 20, height - 30
    colours = {"a": (60, 60, 60), "b": (150, 150, 150), "c": (40, 110, 200), "d": (220, 130, 40), "e": (90, 170, 90)}

    def ypix(v: float) -> float:
        return bottom - (min(max(v, y0), 1.0) - y0) / (1.0 - y0) * (bottom - top)

    for k in range(11):
        v = y0 + (1 - y0) * k / 10
        y = ypix(v)
        dr.line([(left, y), (right, y)], fill=(230, 230, 230))
        dr.text((2, y - 6), f"{v:.2f}", fill=(0, 0, 0))
    a_y = ypix(conds["a"]["mean"])
    slot = (right - left) / len(keys)
    for i, k in enumerate(keys):
        c = conds[k]
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        dr.rectangle([x0, ypix(c["mean"]), x1, bottom], fill=colours.get(k[0], (0, 0, 0)))
        xm = (x0 + x1) / 2
        dr.line([(xm, ypix(c["mean"] - c["std"])), (xm, ypix(c["mean"] + c["std"]))], fill=(0, 0, 0), width=2)
        dr.text((x0, bottom + 3), f"({k})", fill=(0, 0, 0))
        dr.text((x0 - 2, bottom + 15), f"{c['mean']:.3f}", fill=(0, 0, 0))
    dr.line([(left, a_y), (right, a_y)], fill=(200, 0, 0))
    dr.text((left + 4, 4), "mean Dice on held-out real slices (+- std over seeds); red line: (a)", fill=(0, 0, 0))
    return im


def _curve(s: dict[str, Any], width: int, height: int) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(im)
    pts = s["curve"]
    left, right, top, bottom = 40, width - 10, 20, height - 30
    xmax = max(p["generator_seconds"] for p in pts) or 1.0
    lo = min(min(p["ratio_to_a"] for p in pts) - 0.02, 0.95)
    y0 = max(0.0, math.floor(lo * 20) / 20)
    y1 = max(1.02, max(p["ratio_to_a"] for p in pts) + 0.01)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x / xmax * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for v in (0.98, 1.0):
        dr.line([xy(0, v), xy(xmax, v)], fill=(200, 0, 0) if v == 0.98 else (200, 200, 200))
        dr.text((2 if v == 0.98 else 20, xy(0, v)[1] - 6), f"{v:.2f}", fill=(0, 0, 0))
    dr.text((2, xy(0, y0)[1] - 6), f"{y0:.2f}", fill=(0, 0, 0))
    prev = None
    for p in pts:
        q = xy(p["generator_seconds"], p["ratio_to_a"])
        if prev:
            dr.line([prev, q], fill=(40, 110, 200), width=2)
        dr.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=(40, 110, 200))
        dr.text((min(q[0] - 10, width - 34), bottom + 3), f"{p['generator_seconds']:.0f}s", fill=(0, 0, 0))
        prev = q
    dr.text((left + 4, 4), "(c)/(a) vs AsynDGAN G training seconds; red: 0.98", fill=(0, 0, 0))
    return im


def _example_rows(fig: dict[str, Any]) -> list[tuple[str, list[np.ndarray]]]:
    """Per site 2 examples of label | real | AsynDGAN | centralised, then the same for held-out slices."""
    rows: list[tuple[str, list[np.ndarray]]] = []
    for j, site in enumerate(fig["sites"]):
        idx = np.linspace(0, len(site) - 1, 4).round().astype(int)[1:3]
        panels: list[np.ndarray] = []
        for i in idx:
            panels += [
                site.labels[i],
                site.images[i, 0],
                fig["syn_async"][j].images[i, 0],
                fig["syn_central"][j].images[i, 0],
            ]
        rows.append((f"{site.name} (training): label | real | AsynDGAN | centralised  x2", panels))
    held = fig["heldout"]
    idx = np.linspace(0, len(held) - 1, 4).round().astype(int)[1:3]
    panels = []
    for i in idx:
        panels += [held.labels[i], held.images[i, 0], fig["held_async"][i, 0], fig["held_central"][i, 0]]
    rows.append(("held-out (never trained on): label | real | AsynDGAN | centralised  x2", panels))
    return rows


def _setting_block(name: str, s: dict[str, Any], rows: list[tuple[str, list[np.ndarray]]]) -> Image.Image:
    width = 8 * _TILE
    title_h = 14
    head = 18
    bars_h = 220
    height = head + sum(title_h + _TILE for _ in rows) + bars_h
    block = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(block)
    dr.text((4, 3), f"setting {name}: {s['description']}", fill=(0, 0, 0))
    y = head
    for title, pans in rows:
        dr.text((4, y + 1), title, fill=(0, 0, 0))
        y += title_h
        for k, p in enumerate(pans):
            block.paste(_tile(p), (k * _TILE, y))
        y += _TILE
    block.paste(_bars(s, width // 2 + 64, bars_h), (0, y))
    block.paste(_curve(s, width // 2 - 64, bars_h), (width // 2 + 64, y))
    return block


def figure_png(report: dict[str, Any], figures: dict[str, dict[str, Any]]) -> bytes:
    """Per setting: per site 2 examples of label | real | AsynDGAN | centralised, the same for held-out
    slices, then the Dice bars and the (c)/(a) curve."""
    blocks = [_setting_block(name, report["settings"][name], _example_rows(fig)) for name, fig in figures.items()]
    canvas = Image.new(
        "RGB", (sum(b.width for b in blocks) + 10 * (len(blocks) - 1), max(b.height for b in blocks)), "white"
    )
    x = 0
    for b in blocks:
        canvas.paste(b, (x, 0))
        x += b.width + 10
    return _png(canvas)


# -- bytes.png -----------------------------------------------------------------------------------------


def bytes_png(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """Grouped bars (log scale): MB per epoch for each scheme at each image size."""
    colours = [(150, 150, 150), (70, 130, 180), (220, 120, 60)]
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    groups = [(r["size"], r["rows"]) for r in results]
    values = [row["MB_per_epoch"] for _, rows in groups for row in rows]
    lo = 10 ** math.floor(math.log10(max(min(values), 1e-6)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    w, h = max(120 + 220 * len(groups), 480), 460
    left, top, bottom = 80, 50, h - 120
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), "Bytes on the wire per epoch (all sites, log scale)", fill="black", font=font)

    def y_of(v: float) -> float:
        return bottom - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - top)

    decade = lo
    while decade <= hi * 1.0001:
        y = y_of(decade)
        draw.line([(left, y), (w - 20, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{decade:g} MB", fill="black", font=small)
        decade *= 10
    draw.line([(left, top), (left, bottom), (w - 20, bottom)], fill="black")
    bar = 50
    for g, (size, rows) in enumerate(groups):
        x0 = left + 30 + g * 220
        for k, row in enumerate(rows):
            x = x0 + k * (bar + 8)
            y = y_of(row["MB_per_epoch"])
            draw.rectangle([x, y, x + bar, bottom], fill=colours[k % len(colours)])
            draw.text((x, y - 16), f"{row['MB_per_epoch']:.3g}", fill="black", font=small)
        draw.text((x0 + 40, bottom + 6), f"{size} px", fill="black", font=font)
    for k, (_, rows) in enumerate(groups[:1]):
        for i, row in enumerate(rows):
            y = bottom + 34 + i * 20 + k
            draw.rectangle([left, y, left + 14, y + 14], fill=colours[i % len(colours)])
            draw.text((left + 22, y), row["scheme"], fill="black", font=small)
    write_bytes_atomic(path, _png(img))
