"""The generator's round logic: bring sites in, check them, and run AsynDGAN steps with deadlines.

Per step every active site gets G's images for its outstanding label maps (one ``Step`` call, all sites
concurrently, :class:`StepExchange`), over whichever transport reaches it (it dials in or out). A site that
errors, misses its deadline or sends an unusable gradient is left out of that step (:meth:`Orchestrator._settle`
is the one place that books it) and the weights are renormalised over the sites that answered. A background
probe brings it back: the late answer of the step it missed, else NextBatch with backoff; it takes part again
from the step after. No step ever waits on a site that is out. A site that has spent its privacy budget is
finished: training goes on without it.

Deadlines adapt per site: once a site has answered three steps it gets ``deadline_factor`` x the slowest of its
last 20 answers, at least ``deadline_floor_s`` and at most ``step_deadline_s`` (``--deadline``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from google.protobuf.message import Message

from asyndgan import codec, wire
from asyndgan.algorithm import Dropped, StepOutcome
from asyndgan.errors import BUDGET_EXHAUSTED_PREFIX, IncompatibleSites
from asyndgan.generator import GeneratorTrainer
from asyndgan.messages import LossTerm, SiteDescription, SiteState, StepAnswer, StepWork, TrainingSettings
from asyndgan.observer import NullObserver, StepObserver
from asyndgan.rpc import TlsConfig
from asyndgan.services.generator.admission import Geometry, check_compatible, check_joins, check_settings
from asyndgan.services.generator.transport import DialedSite, JoinedSite, Pending, SiteTransport
from asyndgan.v1 import tensor_pb2

__all__ = [
    "Geometry",
    "Orchestrator",
    "OrchestratorConfig",
    "SiteLink",
    "SitesFinished",
    "StepExchange",
]

log = logging.getLogger(__name__)


class SitesFinished(Exception):
    """Every site has spent its privacy budget: there is nothing left to train on."""


@dataclass(frozen=True)
class OrchestratorConfig:
    step_deadline_s: float = 60.0  # the most a site is given per step; also the timeout of background probes
    deadline_floor_s: float = 5.0  # adaptive deadline: max(floor, factor x slowest of the last 20 answers) ...
    deadline_factor: float = 5.0  # ... capped at step_deadline_s
    connect_deadline_s: float = 10.0
    image_codec: str = str(codec.IMAGE_CODEC)
    grad_codec: str = str(codec.IMAGE_CODEC)
    label_codec: str = str(codec.LABEL_CODEC)
    retries: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0


@dataclass
class SiteLink:
    """One site as the generator sees it: how to reach it, its description, outstanding batch and counters."""

    name: str
    transport: SiteTransport
    info: SiteDescription | None = None
    batch_id: int = 0
    labels: torch.Tensor | None = None
    active: bool = False
    finished: bool = False
    contributed: int = 0
    dropped: int = 0
    last_error: str = ""
    wire_sent: int = 0
    wire_received: int = 0
    payload_sent: int = 0
    payload_received: int = 0
    epsilon_spent: float = 0.0
    last_losses: list[LossTerm] = field(default_factory=list)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    waiting: str = ""  # why the site is not in, while it is not
    recovering: bool = False  # a background probe is bringing it (back) in
    pending: tuple[int, torch.Tensor] | None = None  # the batch a probe brought back, taken at the next step

    @classmethod
    def dial(cls, name: str, address: str, tls: TlsConfig | None = None) -> SiteLink:
        """A dial-in site: the generator calls it at ``address``."""
        return cls(name, DialedSite(name, address, tls))

    @classmethod
    def joined(cls, name: str) -> SiteLink:
        """A dial-out site: it calls the generator's join port."""
        return cls(name, JoinedSite(name))

    @property
    def address(self) -> str:
        return self.transport.address

    def deadline(self, cfg: OrchestratorConfig) -> float:
        """Seconds this site gets per step: adapted from its recent answers once it has given three."""
        if len(self.latencies) < 3:
            return cfg.step_deadline_s
        return min(cfg.step_deadline_s, max(cfg.deadline_floor_s, cfg.deadline_factor * max(self.latencies)))

    def state(self) -> SiteState:
        info = self.info
        return SiteState(
            site_id=self.name,
            address=self.address,
            active=self.active,
            num_samples=info.num_samples if info else 0,
            steps_contributed=self.contributed,
            steps_dropped=self.dropped,
            last_error=self.last_error if self.active or not self.waiting else f"waiting: {self.waiting}",
            privacy=info.privacy.mode if info else "",
            epsilon_spent=self.epsilon_spent,
            finished=self.finished,
        )


def _dropped(e: grpc.RpcError) -> Dropped:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(BUDGET_EXHAUSTED_PREFIX):
        return Dropped("finished", details)
    reason = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline", grpc.StatusCode.UNAVAILABLE: "unavailable"}
    return Dropped(reason.get(code, "error"), f"{code.name}: {details}")


Counter = Callable[[SiteLink, str, Any, Sequence[tensor_pb2.Tensor]], None]
_TIMEOUTS = (TimeoutError, grpc.FutureTimeoutError)


class StepExchange:
    """One step's round trip (an :class:`Exchange`): G's images to each site as soon as they are made, per site
    its :class:`StepAnswer` or why not.

    Each site is waited for until its own deadline (:meth:`SiteLink.deadline`); a call still running then is
    kept in :attr:`late` (its answer brings the site back in). It only talks and decodes; it changes no link."""

    def __init__(
        self,
        links: Sequence[SiteLink],
        cfg: OrchestratorConfig,
        observer: StepObserver,
        count: Counter,
        gen: GeneratorTrainer,
    ) -> None:
        self.links, self.cfg, self.observer, self.count = links, cfg, observer, count
        self.step, self.modalities = gen.steps, gen.modalities
        self.codecs = tuple(codec.Codec.parse(c) for c in (cfg.image_codec, cfg.grad_codec, cfg.label_codec))
        self.sent: dict[int, tuple[torch.Tensor, Pending, float]] = {}
        self.late: dict[str, Pending] = {}
        self.seconds: dict[str, float] = {}

    def _send(self, link: SiteLink, part: torch.Tensor) -> Pending:
        image, grad, label = self.codecs
        work = StepWork(link.batch_id, part, self.modalities, self.step, grad, label)
        req = wire.step_request_to_proto(work, image)
        self.count(link, "sent", req, [req.fakes])
        return link.transport.call("Step", req, self.cfg.step_deadline_s)

    def _receive(self, link: SiteLink, part: torch.Tensor, fut: Pending, start: float) -> StepAnswer | Dropped:
        deadline = link.deadline(self.cfg)
        try:
            reply = fut.result(timeout=max(0.0, start + deadline - time.perf_counter()))
        except _TIMEOUTS:
            self.observer.on_rpc(link.name, "Step", time.perf_counter() - start, "DEADLINE_EXCEEDED")
            self.late[link.name] = fut
            return Dropped("deadline", f"no answer within {deadline:.1f} s")
        except grpc.RpcError as e:
            self.observer.on_rpc(link.name, "Step", self.seconds.get(link.name, 0.0), e.code().name)
            return _dropped(e)
        # result() can return before the done-callback that records the time has run
        seconds = self.seconds.setdefault(link.name, time.perf_counter() - start)
        self.observer.on_rpc(link.name, "Step", seconds, "OK")
        self.count(link, "received", reply, [reply.grad, reply.next.labels])
        assert link.info is not None
        try:
            return wire.step_reply_from_proto(reply, part, link.info)
        except codec.CodecError as e:
            return Dropped("bad_reply", str(e))

    def send(self, j: int, part: torch.Tensor) -> None:
        link, start = self.links[j], time.perf_counter()
        fut = self._send(link, part)
        # per-site completion time, whatever order we read them in
        fut.add_done_callback(lambda _f, n=link.name, t=start: self.seconds.setdefault(n, time.perf_counter() - t))
        self.sent[j] = (part, fut, start)

    def answer(self, j: int) -> StepAnswer | Dropped:
        part, fut, start = self.sent.pop(j)
        return self._receive(self.links[j], part, fut, start)


class Orchestrator:
    """Owns the site links; :meth:`wait_for_quorum` brings the first sites in, :meth:`step` runs one AsynDGAN
    generator step over the network. A site that is not in (not up yet, dropped, late) is brought (back) in by
    a background probe and takes part from the next step on; no step waits for it."""

    def __init__(
        self,
        links: Sequence[SiteLink],
        cfg: OrchestratorConfig,
        observer: StepObserver | None = None,
        settings: TrainingSettings | None = None,
    ) -> None:
        """``settings``: the training settings every site must report (None: not checked)."""
        if len({link.name for link in links}) != len(links):
            raise ValueError("site names must be unique")
        self.links = list(links)
        self.cfg = cfg
        self.settings = settings
        self.observer: StepObserver = observer or NullObserver()
        self.geometry: Geometry | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()

    # -- calls ---------------------------------------------------------------------------------------

    def _call(self, link: SiteLink, method: str, request: Message, timeout: float, retries: int | None = None) -> Any:
        """One call; retries only UNAVAILABLE, with exponential backoff and jitter."""
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            start = time.perf_counter()
            try:
                result = link.transport.call(method, request, timeout).result()
            except grpc.RpcError as e:
                self.observer.on_rpc(link.name, method, time.perf_counter() - start, e.code().name)
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == retries:
                    raise
                time.sleep(self.cfg.backoff_s * (2**attempt) * (0.5 + random.random()))
            else:
                self.observer.on_rpc(link.name, method, time.perf_counter() - start, "OK")
                return result
        raise AssertionError("unreachable")

    def _count(self, link: SiteLink, direction: str, msg: Any, tensors: Sequence[tensor_pb2.Tensor]) -> None:
        wire_bytes = msg.ByteSize()
        payload = sum(codec.raw_nbytes(t) for t in tensors)
        if direction == "sent":
            link.wire_sent += wire_bytes
            link.payload_sent += payload
        else:
            link.wire_received += wire_bytes
            link.payload_received += payload
        self.observer.on_bytes(link.name, direction, wire_bytes, payload)

    def _admit(self, link: SiteLink, reply: Any) -> None:
        """Take a site's Describe answer (checked against the generator, once it exists)."""
        info = wire.site_info_from_proto(reply)
        check_settings(self.settings, info)
        if self.geometry is not None:
            check_joins(self.geometry, info)
        link.info = info
        link.epsilon_spent = info.privacy.epsilon_spent
        link.finished = info.privacy.exhausted
        log.info(
            "site %s (%s): %d samples, modalities %s, %dx%d, %d classes, privacy %s",
            link.name,
            link.address,
            info.num_samples,
            list(info.modalities),
            info.height,
            info.width,
            info.num_classes,
            info.privacy.mode if info.privacy.guarded else "NONE (unguarded: its gradients leak its images)",
        )

    def _note(self, link: SiteLink, problem: str) -> None:
        if problem != link.waiting:  # one line per change, not one per retry
            log.warning("site %s: %s", link.name, problem)
            link.waiting = problem

    # -- bringing sites in ---------------------------------------------------------------------------

    def wait_for_quorum(
        self, min_sites: int = 0, stop: threading.Event | None = None, timeout: float | None = None
    ) -> Geometry | None:
        """Describe sites until ``min_sites`` (0 = all) have answered, then check they fit one generator and
        fetch their first batches. Says per site what it waits for. None if ``stop`` was set first;
        ConnectionError after ``timeout`` seconds."""
        need = min(min_sites or len(self.links), len(self.links))
        stop = stop or threading.Event()
        give_up = None if timeout is None else time.monotonic() + timeout
        delay = self.cfg.backoff_s
        while True:
            missing = [link for link in self.links if link.info is None]
            calls = [(lk, lk.transport.call("Describe", wire.describe_request_to_proto(), self.cfg.connect_deadline_s))
                     for lk in missing]  # fmt: skip
            for link, fut in calls:
                try:
                    self._admit(link, fut.result())
                    link.waiting = ""
                except grpc.RpcError as e:
                    self._note(link, link.transport.explain(e))
            ready = [link for link in self.links if link.info is not None]
            if len(ready) >= need:
                break
            waits = "; ".join(f"{lk.name}: {lk.waiting}" for lk in self.links if lk.info is None)
            if give_up is not None and time.monotonic() > give_up:
                raise ConnectionError(f"{len(ready)} of the {need} sites needed answered ({waits})")
            if stop.wait(delay * (0.5 + random.random())):
                return None
            delay = min(delay * 2, self.cfg.max_backoff_s)
        geometry = check_compatible([link.info for link in ready if link.info is not None])
        self.geometry = self.geometry or geometry  # a resumed generator keeps its own (sites were checked)
        log.info("quorum: %d of %d sites in (%s)", len(ready), len(self.links), ", ".join(lk.name for lk in ready))
        for link in ready:
            self._first_batch(link)
        return self.geometry

    def _first_batch(self, link: SiteLink) -> None:
        try:
            reply = self._call(
                link, "NextBatch", wire.batch_request_to_proto(self.cfg.label_codec), self.cfg.step_deadline_s
            )
            self._take(link, reply)
        except (grpc.RpcError, codec.CodecError) as e:
            self._note(link, str(e))
            self._recover(link)
            return
        with self._lock:
            pending, link.pending = link.pending, None
        assert pending is not None
        link.batch_id, link.labels = pending
        link.active = True

    def _take(self, link: SiteLink, reply: Any) -> None:
        """A NextBatch answer: the site's batch, taken at the next step."""
        self._count(link, "received", reply, [reply.labels])
        assert link.info is not None
        batch = wire.batch_from_proto(reply, link.info)
        with self._lock:
            link.pending = batch

    def _recover(self, link: SiteLink, late: Pending | None = None) -> None:
        """Bring ``link`` (back) in, in the background (at most one probe per site)."""
        with self._lock:
            if link.recovering or link.finished or self._closed.is_set():
                return
            link.recovering = True
        threading.Thread(target=self._probe, args=(link, late), name=f"probe-{link.name}", daemon=True).start()

    def _late_answer(self, link: SiteLink, late: Pending) -> bool:
        """A late Step answer carries the site's next batch: it is back (its gradient is stale and unused)."""
        try:
            reply = late.result(timeout=self.cfg.step_deadline_s)
            self._count(link, "received", reply, [reply.grad, reply.next.labels])
            link.epsilon_spent = reply.epsilon_spent
            self._take(link, reply.next)
        except (grpc.RpcError, codec.CodecError, *_TIMEOUTS, CancelledError, grpc.FutureCancelledError):
            return False
        return True

    def _probe(self, link: SiteLink, late: Pending | None) -> None:
        try:
            if late is not None and self._late_answer(link, late):
                return
            delay = self.cfg.backoff_s
            request = wire.batch_request_to_proto(self.cfg.label_codec)
            while not self._closed.is_set():
                try:
                    if link.info is None:
                        self._admit(
                            link,
                            self._call(
                                link, "Describe", wire.describe_request_to_proto(), self.cfg.connect_deadline_s, 0
                            ),
                        )
                    self._take(link, self._call(link, "NextBatch", request, self.cfg.step_deadline_s, 0))
                    return
                except grpc.RpcError as e:
                    if _dropped(e).reason == "finished":
                        link.finished = True
                        return
                    self._note(link, link.transport.explain(e))
                except (codec.CodecError, IncompatibleSites) as e:
                    self._note(link, str(e))
                self._closed.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.cfg.max_backoff_s)
        finally:
            with self._lock:
                link.recovering = False

    # -- bookkeeping: the one place that decides who is in and who is left out ----------------------

    def _settle(self, link: SiteLink, result: StepAnswer | Dropped, late: Pending | None = None) -> None:
        if isinstance(result, StepAnswer):
            link.contributed += 1
            link.batch_id, link.labels = result.next_batch_id, result.next_labels
            link.last_losses = result.losses
            link.epsilon_spent = result.epsilon_spent
            return
        if result.reason == "finished":
            if not link.finished:
                log.info("site %s is finished: %s", link.name, result.detail)
            link.finished = True
        elif link.active:
            log.warning("site %s left out of this step: %s (%s)", link.name, result.reason, result.detail)
        link.active = False
        link.labels = None
        link.dropped += 1
        link.last_error = f"{result.reason}: {result.detail}"[:300]
        self.observer.on_drop(link.name, result.reason)
        self._recover(link, late)

    def _ensure_batch(self, link: SiteLink) -> None:
        """Take the batch a probe brought back; never calls the site (no step waits for a site that is out)."""
        if link.labels is not None or link.finished:
            return
        with self._lock:
            pending, link.pending = link.pending, None
        if pending is None:
            self._recover(link)
            return
        link.batch_id, link.labels = pending
        if not link.active:
            log.info("site %s is (back) in", link.name)
        link.active = True
        link.waiting = ""

    # -- one step ------------------------------------------------------------------------------------

    def step(self, gen: GeneratorTrainer) -> StepOutcome:
        """One generator step over all sites that have a batch; raises ConnectionError if no site can take
        part and SitesFinished once every site has spent its budget."""
        for link in self.links:
            self._ensure_batch(link)
        if all(link.finished for link in self.links):
            raise SitesFinished("every site has spent its privacy budget")
        links = [link for link in self.links if link.labels is not None]
        if not links:
            waits = "; ".join(f"{lk.name}: {lk.waiting or lk.last_error or 'coming back'}" for lk in self.links)
            raise ConnectionError(f"no site is ready ({waits})")
        exchange = StepExchange(links, self.cfg, self.observer, self._count, gen)
        sizes = [link.info.num_samples if link.info else 0 for link in links]
        labels = [link.labels for link in links if link.labels is not None]
        styles = [gen.style_index(link.name) for link in links] if gen.styles else None
        outcome = gen.step(labels, sizes, exchange, styles)
        for link, result in zip(links, outcome.results, strict=True):
            if isinstance(result, StepAnswer):
                link.latencies.append(exchange.seconds.get(link.name, 0.0))
            self._settle(link, result, exchange.late.get(link.name))
        return outcome

    def checkpoint_sites(self) -> None:
        """Ask every active site to checkpoint its own state (best effort; each waited for up to its deadline)."""
        request = wire.checkpoint_request_to_proto()
        calls = [(lk, time.perf_counter(), lk.transport.call("Checkpoint", request, self.cfg.step_deadline_s))
                 for lk in self.links if lk.active]  # fmt: skip
        for link, start, fut in calls:
            deadline = link.deadline(self.cfg)
            try:
                fut.result(timeout=max(0.0, start + deadline - time.perf_counter()))
            except _TIMEOUTS:  # a missed deadline like any other: probed in the background, not waited for
                self._settle(link, Dropped("deadline", f"no checkpoint answer within {deadline:.1f} s"))
            except grpc.RpcError as e:
                log.warning("site %s did not checkpoint: %s", link.name, e.code().name)

    def close(self) -> None:
        self._closed.set()
        for link in self.links:
            link.transport.close()
