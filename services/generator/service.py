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
from asyndgan.algorithm import GeneratorTrainer, StepOutcome, TrainConfig
from asyndgan.data import SiteData, load_site
from asyndgan.io import load_checkpoint, remove_stale_temp, save_checkpoint, write_bytes_atomic, write_json_atomic
from asyndgan.local import evaluate_heldout, sample_rows
from asyndgan.messages import TrainingState
from asyndgan.metrics import GeneratorMetrics, GrpcServerMetrics
from asyndgan.nets import NetConfig
from asyndgan.observer import FanoutObserver, StepObserver
from asyndgan.report import Progress, samples_png, steady_seconds
from asyndgan.rpc import Server, TlsConfig, make_server
from asyndgan.services.generator.orchestrator import Orchestrator, OrchestratorConfig, SiteLink, SitesFinished
from asyndgan.services.generator.servicer import GeneratorServicer
from asyndgan.v1 import generator_pb2 as gpb
from asyndgan.v1 import generator_pb2_grpc as gpb_grpc

__all__ = ["GeneratorConfig", "GeneratorService"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "generator.pt"
RETRY_IDLE_S = 2.0


@dataclass(frozen=True)
class GeneratorConfig:
    sites: tuple[tuple[str, str], ...]  # (name, HOST:PORT)
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
    device: str = "cpu"
    eval_samples: int = 64

    def validate(self) -> None:
        if not self.sites:
            raise ValueError("at least one --site NAME=HOST:PORT is needed")
        if self.iterations < 0 or self.checkpoint_every < 1:
            raise ValueError("iterations must be >= 0 and checkpoint_every >= 1")
        if self.allowed_clients and self.tls is None:
            raise ValueError("--allow-client needs mutual TLS (--tls-cert, --tls-key, --tls-ca)")
        self.net.validate()
        self.train.validate()
        for c in (self.orchestrator.image_codec, self.orchestrator.grad_codec, self.orchestrator.label_codec):
            codec.Codec.parse(c)


class GeneratorService:
    """The running generator: G, the site links and the gRPC server. Build it with :meth:`start`; then
    :meth:`train`, and :meth:`stop` at the end."""

    server: Server  # set by start(), once the service exists for its Status

    def __init__(self, cfg: GeneratorConfig, orch: Orchestrator, gen: GeneratorTrainer, shape: tuple[int, int]) -> None:
        self.cfg, self.orch, self.gen = cfg, orch, gen
        self.height, self.width = shape
        self.heldout: SiteData | None = load_site(cfg.heldout, size=self.height) if cfg.heldout else None
        self.training = False
        self.generator_loss = math.nan
        self.step_seconds: list[float] = []

    @classmethod
    def start(
        cls,
        cfg: GeneratorConfig,
        observer: StepObserver | None = None,
        registry: CollectorRegistry | None = None,
    ) -> GeneratorService:
        """Dial and describe the sites, build G (resuming from its checkpoint with ``cfg.resume``), load the
        held-out set, start serving. With ``registry``, training and gRPC server metrics are registered on it."""
        cfg.validate()
        interceptors: tuple[grpc.ServerInterceptor, ...] = ()
        if registry is not None:
            metrics = GeneratorMetrics(registry, [name for name, _ in cfg.sites])
            observer = FanoutObserver(observer, metrics) if observer is not None else metrics
            interceptors = (GrpcServerMetrics(registry, [gpb.DESCRIPTOR.services_by_name["Generator"]]),)
        orch = Orchestrator(
            [SiteLink.dial(name, addr, cfg.tls) for name, addr in cfg.sites], cfg.orchestrator, observer
        )
        height, width, num_classes, modalities = orch.connect()
        gen = GeneratorTrainer(
            cfg.net,
            cfg.train,
            num_classes=num_classes,
            modalities=modalities,
            seed=cfg.seed,
            image_size=min(height, width),
            device=cfg.device,
            max_grad_norm=cfg.max_grad_norm,
        )
        ckpt = cfg.checkpoint_dir / CHECKPOINT_FILE
        remove_stale_temp(ckpt)
        if cfg.resume and ckpt.exists():
            gen.load_state_dict(load_checkpoint(ckpt))
            log.info("resumed generator at step %d", gen.steps)
        service = cls(cfg, orch, gen, (height, width))
        service.server = make_server(
            cfg.listen,
            lambda s: gpb_grpc.add_GeneratorServicer_to_server(
                GeneratorServicer(gen, height, width, service.status), s
            ),
            [gpb.DESCRIPTOR.services_by_name["Generator"].full_name],
            tls=cfg.tls,
            allowed_clients=cfg.allowed_clients,
            interceptors=interceptors,
        )
        if cfg.port_file:
            write_bytes_atomic(cfg.port_file, str(service.server.port).encode())
        service.server.set_serving(True)
        log.info("generator serving on port %d; modalities %s", service.server.port, list(modalities))
        return service

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.gen.modalities

    def status(self) -> TrainingState:
        links = self.orch.links
        return TrainingState(
            step=self.gen.steps,
            target_steps=self.cfg.iterations,
            training=self.training,
            sites=[lk.state() for lk in links],
            modalities=self.gen.modalities,
            height=self.height,
            width=self.width,
            num_classes=self.gen.num_classes,
            generator_loss=self.generator_loss,
            wire_bytes_sent=sum(lk.wire_sent for lk in links),
            wire_bytes_received=sum(lk.wire_received for lk in links),
        )

    def checkpoint(self) -> None:
        """Generator state here, and each site's state at that site, at the same step."""
        save_checkpoint(self.cfg.checkpoint_dir / CHECKPOINT_FILE, self.gen.state_dict())
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
        progress = Progress(target)
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
