"""The generator's round logic: dial sites, check them, and run AsynDGAN steps with deadlines.

Per step every active site gets G's images for its outstanding label maps (one ``Step`` RPC, all sites
concurrently, :class:`StepExchange`). A site that errors, misses the deadline or sends an unusable gradient is
left out of that step (:meth:`Orchestrator._settle` is the one place that books it), the weights are renormalised
over the sites that answered, and it is asked for a fresh batch at the next step. A site that has spent its
privacy budget is finished: training goes on without it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

from asyndgan import codec, wire
from asyndgan.algorithm import Dropped, GeneratorTrainer, StepOutcome
from asyndgan.errors import BUDGET_EXHAUSTED_PREFIX, IncompatibleSites
from asyndgan.messages import LossTerm, SiteDescription, SiteState, StepAnswer, StepWork
from asyndgan.observer import NullObserver, StepObserver
from asyndgan.rpc import TlsConfig, make_channel
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc
from asyndgan.v1 import tensor_pb2

__all__ = [
    "Orchestrator",
    "OrchestratorConfig",
    "SiteLink",
    "SitesFinished",
    "StepExchange",
    "check_compatible",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class SitesFinished(Exception):
    """Every site has spent its privacy budget: there is nothing left to train on."""


@dataclass(frozen=True)
class OrchestratorConfig:
    step_deadline_s: float = 60.0
    connect_deadline_s: float = 10.0
    image_codec: str = str(codec.IMAGE_CODEC)
    grad_codec: str = str(codec.IMAGE_CODEC)
    label_codec: str = str(codec.LABEL_CODEC)
    retries: int = 3
    backoff_s: float = 0.2


@dataclass
class SiteLink:
    """One site as the generator sees it: its channel, description, outstanding batch and counters."""

    name: str
    address: str
    stub: pb_grpc.DiscriminatorStub
    channel: grpc.Channel
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

    @classmethod
    def dial(cls, name: str, address: str, tls: TlsConfig | None = None) -> SiteLink:
        channel = make_channel(address, tls=tls, server_name=name if tls else None)
        return cls(name, address, pb_grpc.DiscriminatorStub(channel), channel)

    def state(self) -> SiteState:
        info = self.info
        return SiteState(
            site_id=self.name,
            address=self.address,
            active=self.active,
            num_samples=info.num_samples if info else 0,
            steps_contributed=self.contributed,
            steps_dropped=self.dropped,
            last_error=self.last_error,
            privacy=info.privacy.mode if info else "",
            epsilon_spent=self.epsilon_spent,
            finished=self.finished,
        )


def check_compatible(infos: Sequence[SiteDescription]) -> tuple[int, int, int, tuple[str, ...]]:
    """(height, width, num_classes, modalities) shared by all sites, or IncompatibleSites."""
    first = infos[0]
    for i in infos[1:]:
        if (i.height, i.width) != (first.height, first.width):
            raise IncompatibleSites(
                f"site {i.site_id} has {i.height}x{i.width} images, {first.site_id} has {first.height}x{first.width}"
            )
        if i.num_classes != first.num_classes:
            raise IncompatibleSites(
                f"site {i.site_id} has {i.num_classes} label classes, {first.site_id} has {first.num_classes}"
            )
    modalities: list[str] = []
    for i in infos:
        if not i.modalities or i.num_samples == 0 or i.batch_size == 0:
            raise IncompatibleSites(f"site {i.site_id} reports no modalities, samples or batch size")
        modalities += [m for m in i.modalities if m not in modalities]
    return first.height, first.width, first.num_classes, tuple(modalities)


def _dropped(e: grpc.RpcError) -> Dropped:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith(BUDGET_EXHAUSTED_PREFIX):
        return Dropped("finished", details)
    reason = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline", grpc.StatusCode.UNAVAILABLE: "unavailable"}
    return Dropped(reason.get(code, "error"), f"{code.name}: {details}")


Counter = Callable[[SiteLink, str, Any, Sequence[tensor_pb2.Tensor]], None]


class StepExchange:
    """One step's round trip: G's images to every site at once, per site its :class:`StepAnswer` or why not.

    It only talks and decodes; it changes no link (the orchestrator settles the outcome afterwards)."""

    def __init__(
        self, links: Sequence[SiteLink], cfg: OrchestratorConfig, observer: StepObserver, count: Counter, step: int
    ) -> None:
        self.links, self.cfg, self.observer, self.count, self.step = links, cfg, observer, count, step

    def _send(self, link: SiteLink, part: torch.Tensor, modalities: tuple[str, ...]) -> grpc.Future:
        work = StepWork(
            link.batch_id,
            part,
            modalities,
            self.step,
            codec.Codec.parse(self.cfg.grad_codec),
            codec.Codec.parse(self.cfg.label_codec),
        )
        req = wire.step_request_to_proto(work, codec.Codec.parse(self.cfg.image_codec))
        self.count(link, "sent", req, [req.fakes])
        return link.stub.Step.future(req, timeout=self.cfg.step_deadline_s)

    def _receive(self, link: SiteLink, part: torch.Tensor, fut: grpc.Future, seconds: float) -> StepAnswer | Dropped:
        try:
            reply = fut.result()
        except grpc.RpcError as e:
            self.observer.on_rpc(link.name, "Step", seconds, e.code().name)
            return _dropped(e)
        self.observer.on_rpc(link.name, "Step", seconds, "OK")
        self.count(link, "received", reply, [reply.grad, reply.next.labels])
        assert link.info is not None
        try:
            return wire.step_reply_from_proto(reply, part, link.info)
        except codec.CodecError as e:
            return Dropped("bad_reply", str(e))

    def __call__(self, parts: list[torch.Tensor], modalities: tuple[str, ...]) -> list[StepAnswer | Dropped]:
        finished: dict[str, float] = {}  # per-site completion time, whatever order we read them in
        sent = []
        for link, part in zip(self.links, parts, strict=True):
            fut = self._send(link, part, modalities)
            fut.add_done_callback(lambda _f, name=link.name: finished.setdefault(name, time.perf_counter()))
            sent.append((time.perf_counter(), fut))
        return [
            self._receive(link, part, fut, finished.get(link.name, time.perf_counter()) - start)
            for link, part, (start, fut) in zip(self.links, parts, sent, strict=True)
        ]


class Orchestrator:
    """Owns the site links; :meth:`step` runs one AsynDGAN generator step over the network."""

    def __init__(
        self,
        links: Sequence[SiteLink],
        cfg: OrchestratorConfig,
        observer: StepObserver | None = None,
    ) -> None:
        if len({link.name for link in links}) != len(links):
            raise ValueError("site names must be unique")
        self.links = list(links)
        self.cfg = cfg
        self.observer: StepObserver = observer or NullObserver()

    # -- calls ---------------------------------------------------------------------------------------

    def _call(self, link: SiteLink, method: str, fn: Callable[[], T], retries: int | None = None) -> T:
        """One unary call; retries only UNAVAILABLE, with exponential backoff and jitter."""
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            start = time.perf_counter()
            try:
                result = fn()
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

    def connect(self) -> tuple[int, int, int, tuple[str, ...]]:
        """Describe every site (all must answer) and check they can train one generator."""
        for link in self.links:
            try:
                reply = self._call(
                    link,
                    "Describe",
                    lambda lk=link: lk.stub.Describe(  # type: ignore[misc]
                        wire.describe_request_to_proto(), timeout=self.cfg.connect_deadline_s, wait_for_ready=True
                    ),
                )
            except grpc.RpcError as e:
                raise ConnectionError(f"site {link.name} at {link.address}: {e.code().name}") from e
            link.info = info = wire.site_info_from_proto(reply)
            link.epsilon_spent = info.privacy.epsilon_spent
            link.finished = info.privacy.exhausted
            log.info(
                "site %s: %d samples, modalities %s, %dx%d, %d classes, privacy %s",
                link.name,
                info.num_samples,
                list(info.modalities),
                info.height,
                info.width,
                info.num_classes,
                info.privacy.mode if info.privacy.guarded else "NONE (unguarded: its gradients leak its images)",
            )
        return check_compatible([link.info for link in self.links if link.info is not None])

    # -- bookkeeping: the one place that decides who is in and who is left out ----------------------

    def _settle(self, link: SiteLink, result: StepAnswer | Dropped) -> None:
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

    def _ensure_batch(self, link: SiteLink) -> None:
        if link.labels is not None or link.finished:
            return
        req = wire.batch_request_to_proto(self.cfg.label_codec)
        try:
            # A site that is down gets one try per step, so it does not slow the others down.
            reply = self._call(
                link,
                "NextBatch",
                lambda: link.stub.NextBatch(req, timeout=self.cfg.step_deadline_s),
                retries=self.cfg.retries if link.active else 0,
            )
            self._count(link, "received", reply, [reply.labels])
            assert link.info is not None
            link.batch_id, link.labels = wire.batch_from_proto(reply, link.info)
        except grpc.RpcError as e:
            self._settle(link, _dropped(e))
            return
        except codec.CodecError as e:
            self._settle(link, Dropped("bad_reply", str(e)))
            return
        if not link.active:
            log.info("site %s is (back) in", link.name)
        link.active = True

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
            raise ConnectionError("no site is reachable")
        exchange = StepExchange(links, self.cfg, self.observer, self._count, gen.steps)
        sizes = [link.info.num_samples if link.info else 0 for link in links]
        labels = [link.labels for link in links if link.labels is not None]
        outcome = gen.step(labels, sizes, lambda parts: exchange(parts, gen.modalities))
        for link, result in zip(links, outcome.results, strict=True):
            self._settle(link, result)
        return outcome

    def checkpoint_sites(self) -> None:
        """Ask every active site to checkpoint its own state (best effort)."""
        for link in self.links:
            if not link.active:
                continue
            try:
                link.stub.Checkpoint(wire.checkpoint_request_to_proto(), timeout=self.cfg.step_deadline_s)
            except grpc.RpcError as e:
                log.warning("site %s did not checkpoint: %s", link.name, e.code().name)

    def close(self) -> None:
        for link in self.links:
            link.channel.close()
