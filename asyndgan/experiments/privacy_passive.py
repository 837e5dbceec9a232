"""The passive (honest-but-curious) reconstruction attack inside an in-process training run.

:class:`RecordingSites` is :class:`asyndgan.local.InProcessSites` that also keeps, for one site, what the
protocol hands the generator at every step: the label maps, G's fakes and the returned gradient. Afterwards
:func:`passive_attack` feeds them to a :class:`~asyndgan.clients.attacks.SliceBook` exactly as
:func:`~asyndgan.clients.attacks.run_passive` does (locate each label map, keep the bound that each confident
gradient sign puts on the real value at G's output), and :func:`passive_report` scores the bounds against the
site's real slices with :mod:`asyndgan.clients.audit`.

:class:`IndexedSliceBook` is the SliceBook with an exact look-up in front of its search (same answers; see its
docstring): the plain search compares a view against every slice of similar class counts, which at 2,000
population slices per site costs ~0.1-0.5 s per view.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from asyndgan.algorithm import Dropped, SiteTrainer
from asyndgan.clients.attacks import MIN_RATIO, AttackRun, Placement, SliceBook, confident_signs
from asyndgan.clients.audit import (
    GOOD_DB,
    LEAK_MARGIN_DB,
    Score,
    class_mean_baseline,
    match_slices,
    reconstructions,
    score_slices,
)
from asyndgan.data import SiteData
from asyndgan.experiments.privacy_common import PhaseClock, finite
from asyndgan.local import InProcessSites
from asyndgan.messages import SiteDescription, StepAnswer

__all__ = ["IndexedSliceBook", "RecordingSites", "passive_attack", "passive_report"]

log = logging.getLogger(__name__)

Record = tuple[np.ndarray, np.ndarray, np.ndarray]  # (labels (B, H, W), fakes sent (B, C, H, W), gradient)


class RecordingSites(InProcessSites):
    """The in-process exchange, keeping (labels, fakes, gradient) of site ``watch`` at every step: exactly what
    a generator receives over the wire from that site (copied, so training is unchanged)."""

    def __init__(self, trainers: list[SiteTrainer], modalities: tuple[str, ...], watch: int = 0) -> None:
        super().__init__(trainers, modalities)
        self.watch = watch
        self.records: list[Record] = []

    def answer(self, j: int) -> StepAnswer | Dropped:
        if j != self.watch:
            return super().answer(j)
        labels = self.batches[j].labels.numpy().copy()
        sent = self.sent[j].detach().cpu().numpy().copy()
        answer = super().answer(j)
        if isinstance(answer, StepAnswer):
            grad = answer.grad.detach().float().cpu().numpy().copy()
            if grad.shape == sent.shape and bool(np.isfinite(grad).all()):  # as run_passive
                self.records.append((labels, sent, grad))
        return answer


def _content_box(view: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the non-zero labels, or None when there are none, when they touch the border (then a
    shift may have cropped them and the crop is no exact fingerprint) or when they are mirror-symmetric."""
    rows, cols = np.flatnonzero(view.any(1)), np.flatnonzero(view.any(0))
    if len(rows) == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    h, w = view.shape
    if y0 == 0 or x0 == 0 or y1 == h or x1 == w:
        return None
    crop = view[y0:y1, x0:x1]
    if np.array_equal(crop, crop[:, ::-1]):  # mirror-symmetric: both flips fit; let the plain search choose
        return None
    return y0, y1, x0, x1


class IndexedSliceBook(SliceBook):
    """A :class:`SliceBook` whose :meth:`locate` first looks the view up by its content.

    The site's augmentation (flip, shift padded with label 0) leaves the crop of a view's non-zero labels
    unchanged up to a flip, unless the shift pushed content off the image (then the content touches the
    border). So every uncropped view is indexed by its crop in canvas coordinates; a later uncropped view of the
    same slice finds it directly, and the placement is checked against every known label of the canvas as the
    plain search would. A view that touches the border (or is mirror-symmetric) falls back to the plain search
    over all slices; an uncropped view that is not in the index is searched for among the slices never seen
    uncropped, else it is a new slice. Same placements as :class:`SliceBook` (a test compares them), much faster
    with many slices."""

    def __init__(self, height: int, width: int, channels: int, *, max_shift: int = 2) -> None:
        super().__init__(height, width, channels, max_shift=max_shift, tolerance=0.0)
        self.index: dict[bytes, tuple[int, int, int]] = {}  # crop fingerprint -> (key, canvas y0, canvas x0)
        self.indexed: set[int] = set()  # slices seen uncropped at least once
        self.unindexed: set[int] = set()  # the others

    @staticmethod
    def _fingerprint(crop: np.ndarray) -> bytes:
        return np.asarray(crop.shape, np.int32).tobytes() + np.ascontiguousarray(crop).tobytes()

    def _lookup(self, view: np.ndarray, box: tuple[int, int, int, int]) -> Placement | None:
        y0, y1, x0, x1 = box
        crop = view[y0:y1, x0:x1]
        for flip, fp in ((False, crop), (True, crop[:, ::-1])):
            hit = self.index.get(self._fingerprint(fp))
            if hit is None:
                continue
            key, cy, cx = hit
            oy, ox = cy - y0, (cx + x1 - self.width) if flip else (cx - x0)
            if 0 <= oy <= 2 * self.margin and 0 <= ox <= 2 * self.margin and self._agrees(key, flip, oy, ox, view):
                return Placement(key, flip, oy, ox)
        return None

    def _agrees(self, key: int, flip: bool, oy: int, ox: int, view: np.ndarray) -> bool:
        win = self.slices[key].labels[oy : oy + self.height, ox : ox + self.width]
        win = win[:, ::-1] if flip else win
        known = win >= 0
        return int(known.sum()) * 2 >= view.size and not bool(((win != view) & known).any())

    def _register(self, p: Placement, view: np.ndarray, box: tuple[int, int, int, int] | None) -> None:
        if box is None:
            if p.key not in self.indexed:
                self.unindexed.add(p.key)
            return
        y0, y1, x0, x1 = box
        crop = view[y0:y1, x0:x1]
        canvas_crop, cx = (crop[:, ::-1], p.ox + self.width - x1) if p.flip else (crop, p.ox + x0)
        self.index.setdefault(self._fingerprint(canvas_crop), (p.key, p.oy + y0, cx))
        self.indexed.add(p.key)
        self.unindexed.discard(p.key)

    def _search(self, view: np.ndarray, keys: list[int]) -> Placement | None:
        """The plain search (SliceBook.locate's) restricted to ``keys``."""
        sig = self._signature(view)
        limit = 2 * self.margin * (self.height + self.width)
        dist = {k: int(np.abs(self.slices[k].signature - sig).sum()) for k in keys}
        for k in sorted((k for k, d in dist.items() if d <= limit), key=dist.__getitem__):
            share, _, flip, oy, ox = self._match(self.slices[k], view)
            if share <= self.tolerance:
                return Placement(k, flip, oy, ox)
        return None

    def locate(self, view: np.ndarray) -> Placement:
        view = np.ascontiguousarray(view, dtype=np.uint8)
        box = _content_box(view)
        if box is None:
            p = super().locate(view)
        else:
            found = self._lookup(view, box) or self._search(view, sorted(self.unindexed))
            if found is not None:
                self._learn_labels(found, view)
                p = found
            else:
                p = self._new(view, self._signature(view))
        self._register(p, view, box)
        return p


def passive_attack(records: list[Record], data: SiteData, site_id: str, max_shift: int = 2) -> AttackRun:
    """What :func:`~asyndgan.clients.attacks.run_passive` keeps, from recorded steps: per step, locate every
    label map and bound the real value at G's fakes by the confident gradient signs."""
    if not records:
        raise ValueError(f"no step of {site_id} was recorded: nothing to attack")
    h, w = data.labels.shape[1:]
    channels = len(data.modalities)
    book = IndexedSliceBook(h, w, channels, max_shift=max_shift)
    clock = PhaseClock(f"passive attack on {site_id}", len(records))
    for i, (labels, sent, grad) in enumerate(records, 1):
        places = [book.locate(v) for v in labels]
        book.bound(places, sent, confident_signs(grad, MIN_RATIO))
        clock.update(i, f", {len(book.slices)} slices")
    info = SiteDescription(site_id, len(data), data.modalities, h, w, data.num_classes, len(records[0][0]))
    return AttackRun(book, info, steps=len(records), seconds=clock.elapsed)


def _subset(score: Score, keep: list[bool]) -> dict[str, Any]:
    vals = [v for v, k in zip(score.per_slice, keep, strict=True) if k and v is not None]
    return {
        "slices": len(vals),
        "median_psnr_db": finite(float(np.median(vals)), 2) if vals else None,
        "share_ge_30db": round(sum(v >= GOOD_DB for v in vals) / len(vals), 4) if vals else None,
    }


def _summary(score: Score) -> dict[str, Any]:
    return {k: v for k, v in score.as_dict().items() if k != "per_slice_psnr_db"}


def passive_report(run: AttackRun, data: SiteData) -> dict[str, Any]:
    """Median PSNR and share >= 30 dB of the kept bounds (projection estimator, as the audit's passive report;
    midpoint too) against the class-mean baseline, for all slices and for slices seen at least twice."""
    baseline = score_slices(dict(enumerate(class_mean_baseline(data))), data)
    kept = score_slices(reconstructions(run, data, "projection"), data)
    midpoint = score_slices(reconstructions(run, data, "midpoint"), data)
    visits = [0] * len(data)
    for key, m in match_slices(run.book, data, run.book.margin // 2).items():
        visits[m.slice] = max(visits[m.slice], run.book.slices[key].visits)  # the key reconstructions() uses
    twice = [v >= 2 for v in visits]
    out = _summary(kept) | {
        "estimator": "projection",
        "steps": run.steps,
        "keys": len(run.book.slices),
        "midpoint_median_psnr_db": finite(midpoint.median_db, 2),
        "baseline_median_psnr_db": finite(baseline.median_db, 2),
        "baseline_share_ge_30db": round(baseline.share_good, 4),
        "visits_histogram": np.bincount(np.asarray(visits, np.int64)).tolist(),
        "seen_ge_2": _subset(kept, twice) | {"baseline_median_psnr_db": _subset(baseline, twice)["median_psnr_db"]},
        "leaks": bool(kept.median_db > baseline.median_db + LEAK_MARGIN_DB),
    }
    log.info(
        "passive: median %.2f dB over %d seen slices (%d seen >= 2 times: %s dB), baseline %.2f dB",
        kept.median_db,
        kept.seen,
        out["seen_ge_2"]["slices"],
        out["seen_ge_2"]["median_psnr_db"],
        baseline.median_db,
    )
    return out
