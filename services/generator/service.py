"""The central generator service: connect to sites, train, checkpoint, serve Synthesize and Status."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry

from asyndgan import codec
from asyndgan.algorithm import StepOutcome, TrainConfig, training_settings
from asyndgan.data import SiteData, load_site
from asyndgan.errors import FailedPrecondition
from asyndgan.generator import GeneratorTrainer
from asyndgan.io import load_checkpoint, remove_stale_temp, save_checkpoint, write_bytes_atomic, write_json_atomic
from asyndgan.local import evaluate_heldout, sample_rows
from asyndgan.messages import TrainingState
from asyndgan.metrics import GeneratorMetrics, GrpcServerMetrics
from asyndgan.nets import NetConfig
from asyndgan.observer import FanoutObserver, StepObserver
from asyndgan.report import Progress, samples_png, steady_seconds
from asyndgan.rpc import Server, TlsConfig, make_server
from asyndgan.services.generator.federation import FederationServicer
from asyndgan.services.generator.orchestrator import Geometry, Orchestrator, OrchestratorConfig, SiteLink, SitesFinished
from asyndgan.services.generator.servicer import GeneratorServicer
from asyndgan.services.generator.transport import JoinedSite
from asyndgan.v1 import federation_pb2 as fpb
from asyndgan.v1 import federation_pb2_grpc as fpb_grpc
from asyndgan.v1 import generator_pb2 as gpb
from asyndgan.v1 import generator_pb2_grpc as gpb_grpc

__all__ = ["GeneratorConfig", "GeneratorService"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "generator.pt"
RETRY_IDLE_S = 2.0


@dataclass(frozen=True)
class GeneratorConfig:
    sites: tuple[tuple[str, str | None], ...]  # (name, HOST:PORT of a dial-in site, or None: the site dials out)
    iterations: int
    checkpoint_dir: Path
    listen: str = "127.0.0.1:0"
    resume: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    out: Path | None = None
    heldout: str | None = None
    port_file: Path | None = None
    tls: TlsConfig | None = None
    allowed_clients: tuple[str, ...] = ()  # with tls: certificate names that may call the service (empty: any)
    max_grad_norm: float = 1e3  # a site gradient with a larger L2 norm is left out of the step
    pipeline: bool = False  # per-site forward/backward overlapping the sites' round trips (GeneratorTrainer.step)
    stale: bool = False  # apply each batch's gradients one step late (GeneratorTrainer.step; changes the algorithm)
    site_styles: bool = False  # G also takes the site whose scanner it renders (GeneratorTrainer, styles)
    device: str = "cpu"
    eval_samples: int = 64
    min_sites: int = 0  # sites needed to start training (0 = all); later sites join at the next step
    quorum_timeout_s: float | None = None  # give up waiting for the quorum (None: wait until stopped)

    def validate(self) -> None:
        if not self.sites:
            raise ValueError("at least one --site NAME=HOST:PORT (or --site NAME for a dial-out site) is needed")
        names = [name for name, _ in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique: {names}")
        if not 0 <= self.min_sites <= len(self.sites):
            raise ValueError(f"--min-sites must be between 0 (all) and {len(self.sites)}")
        if self.iterations < 0 or self.checkpoint_every < 1:
            raise ValueError("iterations must be >= 0 and checkpoint_every >= 1")
        if self.allowed_clients and self.tls is None:
            raise ValueError("--allow-client needs mutual TLS (--tls-cert, --tls-key, --tls-ca)")
        self.net.validate()
        self.train.validate()
        for c in (self.orchestrator.image_codec, self.orchestrator.grad_codec):
            if codec.Codec.parse(c).dtype == "u8":
                raise ValueError(f"codec {c!r} is for label maps; images and gradients need f32, bf16, f16 or q8")
        codec.Codec.parse(self.orchestrator.label_codec)


class GeneratorService:
    """The running generator: G, the site links and the gRPC server (Generator and Federation services).
    Build it with :meth:`start`; then :meth:`train`, and :meth:`stop` at the end."""

    server: Server  # set by start(), once the service exists for its Status

    def __init__(self, cfg: GeneratorConfig, orch: Orchestrator) -> None:
        self.cfg, self.orch = cfg, orch
        self._gen: GeneratorTrainer | None = None
        self.height = self.width = 0
        self.heldout: SiteData | None = None
        self.training = False
        self.generator_loss = math.nan
        self.step_seconds: list[float] = []

    @classmethod
    def start(
        cls,
        cfg: GeneratorConfig,
        observer: StepObserver | None = None,
        registry: CollectorRegistry | None = None,
        stop: threading.Event | None = None,
    ) -> GeneratorService:
        """Serve (health, Status, Synthesize, the join port for dial-out sites), then wait for the quorum of
        sites (``cfg.min_sites``), build G (resuming from its checkpoint with ``cfg.resume``; a resumed G serves
        Synthesize while the sites come in) and load the held-out set. Returns without G (:attr:`ready` false)
        if ``stop`` is set first. With ``registry``, training and gRPC server metrics are registered on it."""
        cfg.validate()
        interceptors: tuple[grpc.ServerInterceptor, ...] = ()
        if registry is not None:
            metrics = GeneratorMetrics(registry, [name for name, _ in cfg.sites])
            observer = FanoutObserver(observer, metrics) if observer is not None else metrics
            services = [
                gpb.DESCRIPTOR.services_by_name["GeneratorService"],
                fpb.DESCRIPTOR.services_by_name["FederationService"],
            ]
            interceptors = (GrpcServerMetrics(registry, services),)
        links = [SiteLink.dial(name, addr, cfg.tls) if addr else SiteLink.joined(name) for name, addr in cfg.sites]
        orch = Orchestrator(links, cfg.orchestrator, observer, training_settings(cfg.net, cfg.train))
        service = cls(cfg, orch)
        if registry is not None:
            metrics.track(service.status)  # G's step and target, each site's state, read at scrape time
        joined = {lk.name: lk.transport for lk in links if isinstance(lk.transport, JoinedSite)}
        ckpt = cfg.checkpoint_dir / CHECKPOINT_FILE
        remove_stale_temp(ckpt)
        state = load_checkpoint(ckpt) if cfg.resume and ckpt.exists() else None
        if state is not None and "height" in state:
            service._build((state["height"], state["width"], state["num_classes"], tuple(state["modalities"])), state)

        def register(server: grpc.Server) -> None:
            gpb_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(service), server)
            fpb_grpc.add_FederationServiceServicer_to_server(FederationServicer(joined, cfg.tls is not None), server)

        service.server = make_server(
            cfg.listen,
            register,
            [gpb.DESCRIPTOR.services_by_name["GeneratorService"].full_name],
            tls=cfg.tls,
            allowed_clients=cfg.allowed_clients,
            interceptors=interceptors,
            workers=8 + len(joined),  # a Join stream holds a worker for its lifetime
            open_services=[fpb.DESCRIPTOR.services_by_name["FederationService"].full_name],
        )
        if cfg.port_file:
            write_bytes_atomic(cfg.port_file, str(service.server.port).encode())
        service.server.set_serving(True)
        log.info("generator serving on port %d (join port for dial-out sites: the same)", service.server.port)
        try:
            geometry = service.orch.wait_for_quorum(cfg.min_sites, stop, cfg.quorum_timeout_s)
            if geometry is not None and service._gen is None:
                service._build(geometry, state)
        except BaseException:
            service.stop(grace=0)
            raise
        return service

    def _build(self, geometry: Geometry, state: dict[str, Any] | None) -> None:
        height, width, num_classes, modalities = geometry
        gen = GeneratorTrainer(
            self.cfg.net,
            self.cfg.train,
            num_classes=num_classes,
            modalities=modalities,
            seed=self.cfg.seed,
            image_size=min(height, width),
            device=self.cfg.device,
            max_grad_norm=self.cfg.max_grad_norm,
            pipeline=self.cfg.pipeline,
            stale=self.cfg.stale,
            styles=[link.name for link in self.orch.links] if self.cfg.site_styles else (),
        )
        if state is not None:
            gen.load_state_dict(state)
            log.info("resumed generator at step %d", gen.steps)
        self.height, self.width = height, width
        self.heldout = load_site(self.cfg.heldout, size=height) if self.cfg.heldout else None
        self.orch.geometry = geometry
        self._gen = gen
        log.info("generator built: %dx%d, %d classes, modalities %s", height, width, num_classes, list(modalities))

    @property
    def ready(self) -> bool:
        """G exists (the quorum was in, or a checkpoint was resumed)."""
        return self._gen is not None

    @property
    def gen(self) -> GeneratorTrainer:
        if self._gen is None:
            raise FailedPrecondition("the generator is still waiting for its sites: no model yet")
        return self._gen

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.gen.modalities

    def status(self) -> TrainingState:
        links, gen = self.orch.links, self._gen
        return TrainingState(
            step=gen.steps if gen else 0,
            target_steps=self.cfg.iterations,
            training=self.training,
            sites=[lk.state() for lk in links],
            modalities=gen.modalities if gen else (),
            height=self.height,
            width=self.width,
            num_classes=gen.num_classes if gen else 0,
            generator_loss=self.generator_loss,
            wire_bytes_sent=sum(lk.wire_sent for lk in links),
            wire_bytes_received=sum(lk.wire_received for lk in links),
            styles=gen.styles if gen else (),
        )

    def checkpoint(self) -> None:
        """Generator state here, and each site's state at that site, at the same step."""
        state = {**self.gen.state_dict(), "height": self.height, "width": self.width}
        save_checkpoint(self.cfg.checkpoint_dir / CHECKPOINT_FILE, state)
        self.orch.checkpoint_sites()
        log.info("checkpoint at step %d", self.gen.steps)

    def _train_step(self, stop: threading.Event) -> StepOutcome | None:
        """One step attempt with its metrics; None when no site could take part (then waits a little)."""
        start = time.perf_counter()
        try:
            outcome = self.orch.step(self.gen)
        except ConnectionError as e:
            self.orch.observer.on_step(time.perf_counter() - start, None, 0, {})
            log.warning("%s; retrying in %.0f s", e, RETRY_IDLE_S)
            stop.wait(RETRY_IDLE_S)
            return None
        self.step_seconds.append(time.perf_counter() - start)
        links = self.orch.links
        answered = sum(outcome.answered)
        self.orch.observer.on_step(self.step_seconds[-1], outcome, answered, {lk.name: lk.last_losses for lk in links})
        if not math.isnan(outcome.generator_loss):
            self.generator_loss = outcome.generator_loss
        return outcome

    def train(self, stop: threading.Event | None = None, until: int | None = None) -> dict[str, Any]:
        """Train until step ``until`` (default: ``iterations``), ``stop``, or until every site has spent its
        privacy budget; checkpoint; write the summary."""
        stop = stop or threading.Event()
        target = self.cfg.iterations if until is None else until
        l1_start = self._l1()
        start_step = self.gen.steps
        progress = Progress(target, start=start_step)
        self.training = True
        self.step_seconds = []
        t0 = time.perf_counter()
        try:
            while self.gen.steps < target and not stop.is_set():
                outcome = self._train_step(stop)
                if outcome is None:
                    continue
                if self.gen.steps % self.cfg.checkpoint_every == 0 and any(outcome.answered):
                    self.checkpoint()
                links = self.orch.links
                progress.update(
                    self.gen.steps,
                    g_loss=self.generator_loss,
                    sites=f"{sum(outcome.answered)}/{len(links)}",
                    MB=f"{sum(lk.wire_sent + lk.wire_received for lk in links) / 1e6:.1f}",
                )
        except SitesFinished as e:
            log.info("training ends at step %d: %s", self.gen.steps, e)
        finally:
            self.training = False
            self.checkpoint()
        seconds = time.perf_counter() - t0
        return self._summary(seconds, self.gen.steps - start_step, l1_start)

    def _l1(self) -> float:
        if self.heldout is None:
            return math.nan
        with self.gen.lock:
            return evaluate_heldout(self.gen, self.heldout, self.cfg.eval_samples)

    def _summary(self, seconds: float, steps: int, l1_start: float) -> dict[str, Any]:
        links = self.orch.links
        summary: dict[str, Any] = {
            "mode": "distributed",
            "iterations": self.gen.steps,
            "steps_this_run": steps,
            "sites": [
                {
                    "name": lk.name,
                    "num_samples": lk.info.num_samples if lk.info else 0,
                    "modalities": list(lk.info.modalities) if lk.info else [],
                    "steps_contributed": lk.contributed,
                    "steps_dropped": lk.dropped,
                    "privacy": lk.info.privacy.mode if lk.info else "",
                    "epsilon_spent": lk.epsilon_spent,
                    "epsilon_budget": lk.info.privacy.epsilon_budget if lk.info else 0.0,
                    "delta": lk.info.privacy.delta if lk.info else 0.0,
                    "finished": lk.finished,
                    "wire_bytes_sent": lk.wire_sent,
                    "wire_bytes_received": lk.wire_received,
                }
                for lk in links
            ],
            "modalities": list(self.gen.modalities),
            "seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / max(steps, 1), 4),
            "seconds_per_step_steady": round(steady_seconds(self.step_seconds), 4),
            "wire_bytes_sent": sum(lk.wire_sent for lk in links),
            "wire_bytes_received": sum(lk.wire_received for lk in links),
            "payload_bytes_sent": sum(lk.payload_sent for lk in links),
            "payload_bytes_received": sum(lk.payload_received for lk in links),
            "generator_loss": self.generator_loss,
            "l1_heldout_start": l1_start,
            "l1_heldout": self._l1(),
            "codecs": {
                "image": self.cfg.orchestrator.image_codec,
                "grad": self.cfg.orchestrator.grad_codec,
                "label": self.cfg.orchestrator.label_codec,
            },
            "torch_threads": torch.get_num_threads(),
        }
        summary["payload_bytes"] = summary["payload_bytes_sent"] + summary["payload_bytes_received"]
        wire = summary["wire_bytes_sent"] + summary["wire_bytes_received"]
        summary["wire_to_payload"] = round(wire / summary["payload_bytes"], 4) if summary["payload_bytes"] else None
        if self.cfg.out is not None:
            last = {lk.name: lk.labels.numpy() for lk in links if lk.labels is not None}
            with self.gen.lock:
                rows = sample_rows(self.gen, last, self.heldout)
            samples_png(self.cfg.out / "samples.png", rows)
            write_json_atomic(self.cfg.out / "summary.json", summary)
        return summary

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace)
        self.orch.close()
