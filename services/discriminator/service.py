"""Entry logic of a hospital's discriminator: load data, build the site, then serve it (dial-in) or join the
generator (dial-out, no listening port)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from asyndgan.algorithm import TrainConfig
from asyndgan.data import load_site
from asyndgan.guard import PrivacyConfig
from asyndgan.io import write_bytes_atomic
from asyndgan.metrics import GrpcServerMetrics, SiteCollector
from asyndgan.nets import NetConfig
from asyndgan.rpc import Server, TlsConfig, make_server
from asyndgan.services.discriminator.dialout import DialOut
from asyndgan.services.discriminator.servicer import DiscriminatorServicer
from asyndgan.services.discriminator.site import Site
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc

__all__ = ["DiscriminatorConfig", "build_site", "start_dial_out", "start_discriminator"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiscriminatorService"].full_name


@dataclass(frozen=True)
class DiscriminatorConfig:
    site_id: str
    data: str
    listen: str = "127.0.0.1:0"
    checkpoint_dir: Path | None = None
    size: int | None = None
    batch_size: int = 8
    seed: int = 0
    resume: bool = True
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    port_file: Path | None = None
    tls: TlsConfig | None = None
    allowed_clients: tuple[str, ...] = ()  # with tls: certificate names that may call the service (empty: any)
    device: str = "cpu"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    connect: str | None = None  # dial out to the generator's join port at HOST:PORT instead of listening
    server_name: str = "generator"  # with TLS and connect: the name the generator's certificate must carry

    def validate(self) -> None:
        if not self.site_id or any(c in self.site_id for c in "/\\ \t\n="):
            raise ValueError(f"invalid site id {self.site_id!r}: use letters, digits, '-', '_' and '.'")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if self.allowed_clients and self.tls is None:
            raise ValueError("--allow-client needs mutual TLS (--tls-cert, --tls-key, --tls-ca)")
        self.net.validate()
        self.train.validate()
        self.privacy.validate()


def build_site(cfg: DiscriminatorConfig, registry: CollectorRegistry | None = None) -> Site:
    """Load data and build the site (resuming from its checkpoint); its own metrics go on ``registry``."""
    cfg.validate()
    data = load_site(cfg.data, size=cfg.size)
    site = Site(
        cfg.site_id,
        data,
        cfg.net,
        cfg.train,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        checkpoint_dir=cfg.checkpoint_dir,
        device=cfg.device,
        privacy=cfg.privacy,
    )
    if cfg.resume:
        site.restore()
    if registry is not None:
        registry.register(SiteCollector(site))
    d = site.description
    log.info(
        "site %s: %d samples, modalities %s, %dx%d, privacy %s",
        cfg.site_id,
        d.num_samples,
        list(d.modalities),
        d.height,
        d.width,
        d.privacy.mode,
    )
    return site


def start_discriminator(
    cfg: DiscriminatorConfig,
    interceptors: tuple[grpc.ServerInterceptor, ...] = (),
    *,
    registry: CollectorRegistry | None = None,
) -> tuple[Site, Server]:
    """A dial-in site: build it, start serving; returns both.

    With ``registry``, gRPC server metrics and the site's own step count and losses are registered on it.
    The server reports SERVING only once data and model are loaded."""
    if registry is not None:
        interceptors = (
            GrpcServerMetrics(registry, [pb.DESCRIPTOR.services_by_name["DiscriminatorService"]]),
            *interceptors,
        )
    site = build_site(cfg, registry)
    server = make_server(
        cfg.listen,
        lambda s: pb_grpc.add_DiscriminatorServiceServicer_to_server(DiscriminatorServicer(site), s),
        [SERVICE_NAME],
        tls=cfg.tls,
        allowed_clients=cfg.allowed_clients,
        interceptors=interceptors,
    )
    if cfg.port_file:
        write_bytes_atomic(cfg.port_file, str(server.port).encode())
    server.set_serving(True)
    log.info("site %s serving on port %d", cfg.site_id, server.port)
    return site, server


def start_dial_out(cfg: DiscriminatorConfig, registry: CollectorRegistry | None = None) -> tuple[Site, DialOut]:
    """A dial-out site: build it and keep it joined to the generator at ``cfg.connect``; no port is opened."""
    if not cfg.connect:
        raise ValueError("a dial-out site needs the generator's address (--connect HOST:PORT)")
    site = build_site(cfg, registry)
    link = DialOut(site, cfg.connect, tls=cfg.tls, server_name=cfg.server_name)
    link.start()
    log.info("site %s dials out to the generator at %s (no listening port)", cfg.site_id, cfg.connect)
    return site, link
