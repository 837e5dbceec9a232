"""Attacks on a running discriminator, speaking only the public ``asyndgan.v1.DiscriminatorService`` API.

What a malicious (active) or curious (passive) generator can learn about a site's real images:

* :class:`SiteClient` -- Describe / NextBatch / Step over gRPC, messages converted only by :mod:`asyndgan.wire`.
* :class:`SliceBook` -- recognises a slice from its (flipped, shifted) label map and keeps, per pixel of the
  slice, an interval ``[lo, hi]`` the real value must lie in.
* :func:`run_active` -- sends interval midpoints as "fakes"; the sign of the returned gradient (the L1 term's
  lambda/n * sign(fake - real)) halves every interval on every Step. Answers whose magnitude is well below
  the typical lambda/n are ignored: there the GAN term may have flipped the sign (:func:`confident_signs`).
* :func:`run_passive` -- trains a real G normally and only keeps what the protocol hands it: per pixel, the
  gradient's sign bounds the real value from above or below at G's own output.

Nothing here reads the site's data: scoring against the real images lives in :mod:`asyndgan.clients.audit`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from asyndgan import codec, wire
from asyndgan.algorithm import TrainConfig
from asyndgan.generator import GeneratorTrainer
from asyndgan.messages import SiteDescription, StepAnswer, StepWork
from asyndgan.nets import NetConfig
from asyndgan.rpc import TlsConfig, explain_rpc_error, make_channel
from asyndgan.v1 import discriminator_pb2_grpc as dpb_grpc

__all__ = [
    "AttackRun",
    "AuditError",
    "Placement",
    "SiteClient",
    "SiteFinished",
    "SliceBook",
    "confident_signs",
    "run_active",
    "run_passive",
]

log = logging.getLogger(__name__)

MIN_RATIO = 0.6  # measured at 32 px: 97 % of slices >= 30 dB (plain signs: 72 %), see confident_signs
LOSSLESS = codec.LOSSLESS  # fakes and gradients travel as f32: midpoints need more than bf16's 8 bits


class AuditError(RuntimeError):
    """The audit cannot go on (unreachable site, refused call, unusable input); the message is one line."""


class SiteFinished(AuditError):
    """The site refused further Steps (FAILED_PRECONDITION, e.g. its privacy budget is spent)."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SiteClient:
    """A generator's view of one discriminator: ``with SiteClient("127.0.0.1:50061") as site: ...``."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        server_name: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.server_name = server_name
        self.channel = make_channel(target, tls=tls, server_name=server_name)
        self.stub = dpb_grpc.DiscriminatorServiceStub(self.channel)
        self._info: SiteDescription | None = None

    def _call(self, method: str, rpc: Callable[..., Any], request: object) -> Any:
        try:
            return rpc(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            name = code.name if code is not None else "ERROR"
            what = f"discriminator {self.target}: {method} failed ({name}): {_one_line(str(details or ''))}"
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise SiteFinished(what) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and self._info is None:
                what = f"cannot reach the discriminator: {explain_rpc_error(e, self.target, self.server_name)}"
            raise AuditError(what) from None

    def describe(self) -> SiteDescription:
        if self._info is None:
            self._info = wire.site_info_from_proto(
                self._call("Describe", self.stub.Describe, wire.describe_request_to_proto())
            )
        return self._info

    def next_batch(self) -> tuple[int, torch.Tensor]:
        """The site's outstanding batch: (batch id, label maps (B, H, W) uint8)."""
        reply = self._call("NextBatch", self.stub.NextBatch, wire.batch_request_to_proto(codec.LABEL_CODEC))
        return wire.batch_from_proto(reply, self.describe())

    def step(self, batch_id: int, fakes: torch.Tensor, step: int) -> StepAnswer:
        """Send ``fakes`` (B, C, H, W) for the site's modalities; get d(loss)/d(fakes) and the next batch."""
        info = self.describe()
        work = StepWork(batch_id, fakes, info.modalities, step, LOSSLESS, codec.LABEL_CODEC)
        reply = self._call("Step", self.stub.Step, wire.step_request_to_proto(work, LOSSLESS))
        return wire.step_reply_from_proto(reply, fakes, info)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SiteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Placement:
    """Where a received label map sits on a slice's canvas: ``view = fliplr?(canvas[oy:oy+H, ox:ox+W])``."""

    key: int
    flip: bool
    oy: int
    ox: int


@dataclass
class SliceCanvas:
    """One recognised slice in the coordinates of its first view, with a margin for later shifts.

    ``labels`` is -1 where no view has shown the label yet. ``lo``/``hi`` bound the real value per pixel;
    pixels outside the real image are the site's padding (-1) in every view, so they stay consistent.
    """

    labels: np.ndarray  # (Hc, Wc) int16
    lo: np.ndarray  # (C, Hc, Wc) float32
    hi: np.ndarray  # (C, Hc, Wc) float32
    guess: np.ndarray  # (C, Hc, Wc) float32: last value sent for the pixel (NaN: never)
    first_view: np.ndarray  # (H, W) uint8, exactly as received
    signature: np.ndarray  # per-class pixel counts of the first view (orders the search)
    visits: int = 0


class SliceBook:
    """Canonicalises received label maps into slices and keeps per-pixel bounds on each slice's image.

    A view matches a slice when, under a horizontal flip and a shift that keeps it on the canvas, its labels
    agree with every label already known there (at most ``tolerance`` of the overlap may differ) over an
    overlap of at least half the image; otherwise it starts a new slice.
    """

    def __init__(self, height: int, width: int, channels: int, *, max_shift: int = 2, tolerance: float = 0.0):
        if max_shift < 0 or not 0.0 <= tolerance < 1.0:
            raise ValueError("max_shift must be >= 0 and tolerance in [0, 1)")
        self.height, self.width, self.channels = height, width, channels
        self.margin = 2 * max_shift  # two views of one slice differ by at most twice the site's shift
        self.tolerance = tolerance
        self.slices: list[SliceCanvas] = []

    def _signature(self, view: np.ndarray) -> np.ndarray:
        return np.bincount(view.ravel(), minlength=256).astype(np.int64)

    def _match(self, canvas: SliceCanvas, view: np.ndarray) -> tuple[float, int, bool, int, int]:
        """(mismatch share, overlap, flip, oy, ox) of the best placement of ``view`` on ``canvas``."""
        win = sliding_window_view(canvas.labels, (self.height, self.width))
        known = win >= 0
        overlap = known.sum(axis=(2, 3))
        best = (math.inf, 0, False, 0, 0)
        for flip, v in ((False, view), (True, view[:, ::-1])):
            mis = ((win != v.astype(np.int16)) & known).sum(axis=(2, 3))
            share = mis / np.maximum(overlap, 1)
            share = np.where(overlap * 2 >= view.size, share, math.inf)
            oy, ox = np.unravel_index(int(np.argmin(share)), share.shape)
            cand = (float(share[oy, ox]), int(overlap[oy, ox]), flip, int(oy), int(ox))
            if (cand[0], -cand[1]) < (best[0], -best[1]):
                best = cand
        return best

    def locate(self, view: np.ndarray) -> Placement:
        """The slice and placement of label map ``view`` (H, W); a new slice if none matches."""
        view = np.ascontiguousarray(view, dtype=np.uint8)
        sig = self._signature(view)
        # Two views of one slice differ in class counts only by what the shifts crop at the border.
        limit = 2 * self.margin * (self.height + self.width) + 2 * self.tolerance * view.size
        dist = {k: int(np.abs(c.signature - sig).sum()) for k, c in enumerate(self.slices)}
        for k in sorted((k for k, d in dist.items() if d <= limit), key=dist.__getitem__):
            share, _, flip, oy, ox = self._match(self.slices[k], view)
            if share <= self.tolerance:
                self._learn_labels(Placement(k, flip, oy, ox), view)
                return Placement(k, flip, oy, ox)
        return self._new(view, sig)

    def _new(self, view: np.ndarray, sig: np.ndarray) -> Placement:
        m, c = self.margin, self.channels
        hc, wc = self.height + 2 * m, self.width + 2 * m
        labels = np.full((hc, wc), -1, np.int16)
        labels[m : m + self.height, m : m + self.width] = view
        canvas = SliceCanvas(
            labels=labels,
            lo=np.full((c, hc, wc), -1.0, np.float32),
            hi=np.full((c, hc, wc), 1.0, np.float32),
            guess=np.full((c, hc, wc), np.nan, np.float32),
            first_view=view.copy(),
            signature=sig,
        )
        self.slices.append(canvas)
        return Placement(len(self.slices) - 1, False, m, m)

    def _region(self, p: Placement) -> tuple[slice, slice]:
        return slice(p.oy, p.oy + self.height), slice(p.ox, p.ox + self.width)

    def _learn_labels(self, p: Placement, view: np.ndarray) -> None:
        ys, xs = self._region(p)
        win = self.slices[p.key].labels[ys, xs]
        v = view[:, ::-1] if p.flip else view
        np.copyto(win, v.astype(np.int16), where=win < 0)

    def window(self, p: Placement, values: np.ndarray) -> np.ndarray:
        """``values`` (C, Hc, Wc) of slice ``p.key`` in the frame of the view (C, H, W)."""
        ys, xs = self._region(p)
        out = values[:, ys, xs]
        return np.ascontiguousarray(out[:, :, ::-1] if p.flip else out)

    def midpoints(self, places: list[Placement]) -> np.ndarray:
        """Per view, the midpoints of the intervals (B, C, H, W): the active attack's chosen fakes."""
        return np.stack([self.window(p, (self.slices[p.key].lo + self.slices[p.key].hi) / 2) for p in places])

    def bound(self, places: list[Placement], fakes: np.ndarray, grad: np.ndarray) -> None:
        """Keep what a Step answered: grad > 0 => real < fake (upper bound), grad < 0 => real > fake;
        grad == 0 says nothing (see :func:`confident_signs`)."""
        for p, f, g in zip(places, fakes, grad, strict=True):
            canvas = self.slices[p.key]
            ys, xs = self._region(p)
            if p.flip:
                f, g = f[:, :, ::-1], g[:, :, ::-1]
            hi, lo = canvas.hi[:, ys, xs], canvas.lo[:, ys, xs]
            np.copyto(hi, np.minimum(hi, f), where=g > 0)
            np.copyto(lo, np.maximum(lo, f), where=g < 0)
            canvas.guess[:, ys, xs] = f
            canvas.visits += 1

    def estimate(self, key: int, how: str = "midpoint") -> np.ndarray:
        """Best guess (C, Hc, Wc) of slice ``key``: the interval midpoint, or (``"projection"``) the last value
        sent clipped into the interval (the midpoint where nothing was sent)."""
        c = self.slices[key]
        lo, hi = np.minimum(c.lo, c.hi), np.maximum(c.lo, c.hi)  # crossed bounds (noisy signs): use their span
        mid = (lo + hi) / 2
        if how == "midpoint":
            return mid
        if how == "projection":
            return np.where(np.isnan(c.guess), mid, np.clip(c.guess, lo, hi))
        raise ValueError(f"unknown estimator {how!r}; choose 'midpoint' or 'projection'")


def confident_signs(grad: np.ndarray, min_ratio: float) -> np.ndarray:
    """The gradient with entries below ``min_ratio`` x the batch's median magnitude set to 0 (no answer).

    A site's gradient is c * sign(fake - real) from the L1 term plus the GAN term. Where the GAN term is
    comparable to c the sign can be wrong, and then |grad| tends to be small: at 32 px, answers with
    |grad| < c/4 were wrong 35 % of the time, those with |grad| >= c almost never. The median magnitude
    estimates c without knowing the site's lambda or batch size.
    """
    if min_ratio <= 0:
        return grad
    mag = np.abs(grad)
    c = float(np.median(mag[mag > 0])) if bool((mag > 0).any()) else 0.0
    return np.where(mag >= min_ratio * c, grad, 0.0).astype(grad.dtype, copy=False)


@dataclass
class AttackRun:
    """What an attack collected: the slice book, how many Steps it took, and why it stopped."""

    book: SliceBook
    site: SiteDescription
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""  # empty: ran all requested steps
    generator: GeneratorTrainer | None = field(default=None, repr=False)


StepHook = Callable[[int, "AttackRun"], None]


def _new_run(client: SiteClient, max_shift: int, tolerance: float) -> AttackRun:
    info = client.describe()
    book = SliceBook(info.height, info.width, len(info.modalities), max_shift=max_shift, tolerance=tolerance)
    return AttackRun(book, info)


def run_active(
    client: SiteClient,
    steps: int,
    *,
    max_shift: int = 2,
    tolerance: float = 0.0,
    min_ratio: float = MIN_RATIO,
    on_step: StepHook | None = None,
) -> AttackRun:
    """Active reconstruction: up to ``steps`` Steps of interval midpoints halved by the gradient's sign
    (answers weaker than ``min_ratio`` x the typical magnitude are ignored, see :func:`confident_signs`)."""
    run = _new_run(client, max_shift, tolerance)
    start = time.monotonic()
    batch_id, labels = client.next_batch()
    for step in range(steps):
        places = [run.book.locate(v) for v in labels.numpy()]
        fakes = run.book.midpoints(places)
        try:
            answer = client.step(batch_id, torch.from_numpy(fakes), step)
        except SiteFinished as e:
            run.stopped = str(e)
            log.info("the site refused further Steps after %d: %s", step, e)
            break
        if tuple(answer.grad.shape) == fakes.shape:
            run.book.bound(places, fakes, confident_signs(answer.grad.float().numpy(), min_ratio))
        run.steps = step + 1
        run.seconds = time.monotonic() - start
        batch_id, labels = answer.next_batch_id, answer.next_labels
        if on_step is not None:
            on_step(step + 1, run)
    run.seconds = time.monotonic() - start
    return run


def run_passive(
    client: SiteClient,
    steps: int,
    *,
    net: NetConfig | None = None,
    train: TrainConfig | None = None,
    seed: int = 0,
    max_shift: int = 2,
    tolerance: float = 0.0,
    min_ratio: float = MIN_RATIO,
    on_step: StepHook | None = None,
) -> AttackRun:
    """Passive reconstruction: a normal training of a real G against the site for up to ``steps`` Steps,
    keeping per pixel the bound that each returned gradient's sign puts on the real value at G's output."""
    run = _new_run(client, max_shift, tolerance)
    info = run.site
    gen = GeneratorTrainer(
        net or NetConfig(),
        train or TrainConfig(),
        num_classes=info.num_classes,
        modalities=info.modalities,
        seed=seed,
        image_size=min(info.height, info.width),
    )
    run.generator = gen
    start = time.monotonic()
    batch_id, labels = client.next_batch()
    for step in range(steps):
        fakes = gen.forward(labels)
        sent = fakes.detach().cpu().contiguous()
        try:
            answer = client.step(batch_id, sent, step)
        except SiteFinished as e:
            run.stopped = str(e)
            log.info("the site refused further Steps after %d: %s", step, e)
            break
        grad = answer.grad.float()
        if grad.shape == sent.shape and bool(torch.isfinite(grad).all()):
            places = [run.book.locate(v) for v in labels.numpy()]
            run.book.bound(places, sent.numpy(), confident_signs(grad.numpy(), min_ratio))
            gen.opt.zero_grad(set_to_none=True)
            fakes.backward(grad.to(fakes.device))
            gen.opt.step()
            gen.steps += 1
        run.steps = step + 1
        run.seconds = time.monotonic() - start
        batch_id, labels = answer.next_batch_id, answer.next_labels
        if on_step is not None:
            on_step(step + 1, run)
    run.seconds = time.monotonic() - start
    return run
