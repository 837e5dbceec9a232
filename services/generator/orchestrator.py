"""The generator's round logic: dial sites, check them, and run AsynDGAN steps with deadlines.

Per step every active site gets G's images for its outstanding label maps (one ``Step`` RPC, all sites
concurrently). A site that errors or misses the deadline is left out of that step, the weights are
renormalised over the sites that answered, and it is asked for a fresh batch at the next step.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import torch

from asyndgan import codec
from asyndgan.algorithm import GeneratorTrainer, LossTerm, StepOutcome
from asyndgan.rpc import TlsConfig, make_channel
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc
from asyndgan.v1 import tensor_pb2

__all__ = [
    "IncompatibleSites",
    "Orchestrator",
    "OrchestratorConfig",
    "SiteLink",
    "StepObserver",
    "check_compatible",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class IncompatibleSites(ValueError):
    """The sites cannot train one generator together (geometry or classes differ)."""


@dataclass(frozen=True)
class OrchestratorConfig:
    step_deadline_s: float = 60.0
    connect_deadline_s: float = 10.0
    image_codec: str = str(codec.IMAGE_CODEC)
    grad_codec: str = str(codec.IMAGE_CODEC)
    label_codec: str = str(codec.LABEL_CODEC)
    retries: int = 3
    backoff_s: float = 0.2


class StepObserver(Protocol):
    """Hooks for metrics; every method is optional to act on."""

    def on_rpc(self, site: str, method: str, seconds: float, code: str) -> None: ...
    def on_bytes(self, site: str, direction: str, wire: int, payload: int) -> None: ...
    def on_drop(self, site: str, reason: str) -> None: ...
    def on_step(
        self, seconds: float, outcome: StepOutcome | None, active: int, site_losses: Mapping[str, Sequence[LossTerm]]
    ) -> None:
        """After each step attempt: its duration, outcome (None: no site could take part), sites that counted,
        and each site's last loss terms."""


class NullObserver:
    def on_rpc(self, site: str, method: str, seconds: float, code: str) -> None:
        pass

    def on_bytes(self, site: str, direction: str, wire: int, payload: int) -> None:
        pass

    def on_drop(self, site: str, reason: str) -> None:
        pass

    def on_step(
        self, seconds: float, outcome: StepOutcome | None, active: int, site_losses: Mapping[str, Sequence[LossTerm]]
    ) -> None:
        pass


@dataclass
class SiteLink:
    """One site as the generator sees it: its channel, description, outstanding batch and counters."""

    name: str
    address: str
    stub: pb_grpc.DiscriminatorStub
    channel: grpc.Channel
    info: pb.SiteInfo | None = None
    batch_id: int = 0
    labels: torch.Tensor | None = None
    active: bool = False
    contributed: int = 0
    dropped: int = 0
    last_error: str = ""
    wire_sent: int = 0
    wire_received: int = 0
    payload_sent: int = 0
    payload_received: int = 0
    last_losses: list[LossTerm] = field(default_factory=list)

    @classmethod
    def dial(cls, name: str, address: str, tls: TlsConfig | None = None) -> SiteLink:
        channel = make_channel(address, tls=tls, server_name=name if tls else None)
        return cls(name, address, pb_grpc.DiscriminatorStub(channel), channel)


def check_compatible(infos: Sequence[pb.SiteInfo]) -> tuple[int, int, int, tuple[str, ...]]:
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


def _losses(reply: pb.StepReply) -> list[LossTerm]:
    return [LossTerm(t.network, t.modality, t.term, t.value) for t in reply.losses]


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
        self.lock = threading.Lock()

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
        wire = msg.ByteSize()
        payload = sum(codec.raw_nbytes(t) for t in tensors)
        if direction == "sent":
            link.wire_sent += wire
            link.payload_sent += payload
        else:
            link.wire_received += wire
            link.payload_received += payload
        self.observer.on_bytes(link.name, direction, wire, payload)

    def _take_batch(self, link: SiteLink, batch: pb.ConditionBatch) -> None:
        assert link.info is not None
        limits = codec.Limits(max_elements=link.info.batch_size * link.info.height * link.info.width)
        labels = codec.decode(batch.labels, limits)
        if labels.dim() != 3 or tuple(labels.shape[1:]) != (link.info.height, link.info.width):
            raise codec.CodecError(f"label batch of shape {tuple(labels.shape)} from {link.name}")
        if labels.numel() and int(labels.max()) >= link.info.num_classes:
            raise codec.CodecError(f"label value out of range from {link.name}")
        link.batch_id, link.labels = batch.batch_id, labels

    def _drop(self, link: SiteLink, reason: str, detail: str) -> None:
        if link.active:
            log.warning("site %s left out of this step: %s (%s)", link.name, reason, detail)
        link.active = False
        link.labels = None
        link.dropped += 1
        link.last_error = f"{reason}: {detail}"[:300]
        self.observer.on_drop(link.name, reason)

    def connect(self) -> tuple[int, int, int, tuple[str, ...]]:
        """Describe every site (all must answer) and check they can train one generator."""
        infos = []
        for link in self.links:
            try:
                link.info = self._call(
                    link,
                    "Describe",
                    lambda lk=link: lk.stub.Describe(  # type: ignore[misc]
                        pb.DescribeRequest(), timeout=self.cfg.connect_deadline_s, wait_for_ready=True
                    ),
                )
            except grpc.RpcError as e:
                raise ConnectionError(f"site {link.name} at {link.address}: {e.code().name}") from e
            infos.append(link.info)
            log.info(
                "site %s: %d samples, modalities %s, %dx%d, %d classes",
                link.name,
                link.info.num_samples,
                list(link.info.modalities),
                link.info.height,
                link.info.width,
                link.info.num_classes,
            )
        return check_compatible(infos)

    def _ensure_batch(self, link: SiteLink) -> None:
        if link.labels is not None:
            return
        try:
            req = pb.BatchRequest(label_codec=self.cfg.label_codec)
            # A site that is down gets one try per step, so it does not slow the others down.
            reply = self._call(
                link,
                "NextBatch",
                lambda: link.stub.NextBatch(req, timeout=self.cfg.step_deadline_s),
                retries=self.cfg.retries if link.active else 0,
            )
            self._count(link, "received", reply, [reply.labels])
            self._take_batch(link, reply)
            if not link.active:
                log.info("site %s is (back) in", link.name)
            link.active = True
        except grpc.RpcError as e:
            self._drop(link, "unavailable" if e.code() == grpc.StatusCode.UNAVAILABLE else "error", e.code().name)
        except codec.CodecError as e:
            self._drop(link, "bad_reply", str(e))

    # -- one step ------------------------------------------------------------------------------------

    def step(self, gen: GeneratorTrainer) -> StepOutcome:
        """One generator step over all sites that have a batch; raises if no site can take part."""
        for link in self.links:
            self._ensure_batch(link)
        links = [link for link in self.links if link.labels is not None]
        if not links:
            raise ConnectionError("no site is reachable")
        channels = list(gen.modalities)

        def exchange(parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[LossTerm]] | None]:
            futures = []
            finished: dict[str, float] = {}  # per-site completion time, whatever order we read them in
            for link, part in zip(links, parts, strict=True):
                req = pb.StepRequest(
                    batch_id=link.batch_id,
                    fakes=codec.encode(part, self.cfg.image_codec),
                    modalities=channels,
                    grad_codec=self.cfg.grad_codec,
                    label_codec=self.cfg.label_codec,
                    step=gen.steps,
                )
                self._count(link, "sent", req, [req.fakes])
                fut = link.stub.Step.future(req, timeout=self.cfg.step_deadline_s)
                fut.add_done_callback(lambda _f, name=link.name: finished.setdefault(name, time.perf_counter()))
                futures.append((time.perf_counter(), fut))
            replies: list[tuple[torch.Tensor, list[LossTerm]] | None] = []
            for link, part, (start, fut) in zip(links, parts, futures, strict=True):
                try:
                    reply = fut.result()
                    self.observer.on_rpc(link.name, "Step", finished.get(link.name, time.perf_counter()) - start, "OK")
                    self._count(link, "received", reply, [reply.grad, reply.next.labels])
                    grad = codec.decode(reply.grad, codec.Limits(max_elements=max(part.numel(), 1)))
                    self._take_batch(link, reply.next)
                    link.last_losses = _losses(reply)
                    replies.append((grad, link.last_losses))
                except grpc.RpcError as e:
                    elapsed = finished.get(link.name, time.perf_counter()) - start
                    self.observer.on_rpc(link.name, "Step", elapsed, e.code().name)
                    reason = {
                        grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
                        grpc.StatusCode.UNAVAILABLE: "unavailable",
                    }.get(e.code(), "error")
                    self._drop(link, reason, f"{e.code().name}: {e.details()}")
                    replies.append(None)
                except codec.CodecError as e:
                    self._drop(link, "bad_reply", str(e))
                    replies.append(None)
            return replies

        with self.lock:
            sizes = [int(link.info.num_samples) if link.info else 0 for link in links]
            labels = [link.labels for link in links if link.labels is not None]
            outcome = gen.step(labels, sizes, exchange)
        for link, ok, r in zip(links, outcome.answered, outcome.losses, strict=True):
            if ok:
                link.contributed += 1
            elif r is not None:  # answered, but its gradient was unusable
                link.dropped += 1
                link.last_error = "bad_gradient"
                self.observer.on_drop(link.name, "bad_gradient")
                log.warning("site %s: gradient rejected (non-finite, wrong shape or too large)", link.name)
        return outcome

    def checkpoint_sites(self) -> None:
        """Ask every active site to checkpoint its own state (best effort)."""
        for link in self.links:
            if not link.active:
                continue
            try:
                link.stub.Checkpoint(pb.CheckpointRequest(), timeout=self.cfg.step_deadline_s)
            except grpc.RpcError as e:
                log.warning("site %s did not checkpoint: %s", link.name, e.code().name)

    def close(self) -> None:
        for link in self.links:
            link.channel.close()
