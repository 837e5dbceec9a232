"""Mutual TLS: only clients with a certificate from the site's CA get in, and the generator only talks to
a site whose certificate names that site."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from asyndgan.metrics import GrpcServerMetrics
from asyndgan.rpc import Server, TlsConfig, make_channel
from asyndgan.services.discriminator.service import DiscriminatorConfig
from asyndgan.services.discriminator.site import Site
from asyndgan.services.generator.service import GeneratorService
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc
from tests.integration.cluster import generator_config, start_sites, stop_sites


def tls_for(directory: Path, name: str) -> TlsConfig:
    return TlsConfig(directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.pem")


def describe(port: int, tls: TlsConfig | None, name: str = "site-0") -> pb.DescribeResponse:
    channel = make_channel(f"127.0.0.1:{port}", tls=tls, server_name=name if tls else None)
    try:
        return pb_grpc.DiscriminatorServiceStub(channel).Describe(pb.DescribeRequest(), timeout=5)
    finally:
        channel.close()


def train_over_tls(
    sites: list[tuple[Site, Server]], tmp_path: Path, ca_dir: Path, steps: int, codec: str = "f32"
) -> int:
    """Train a generator with the "generator" certificate for ``steps`` steps; the steps it made."""
    svc = GeneratorService.start(generator_config(sites, tmp_path, steps, codec, tls=tls_for(ca_dir, "generator")))
    try:
        svc.train()
        return svc.gen.steps
    finally:
        svc.stop(grace=0)


def test_mutual_tls_trains_and_refuses_strangers(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    good, other = pki
    sites = start_sites(1, tmp_path, tls=tls_for(good, "site-0"))
    port = sites[0][1].port
    try:
        assert describe(port, tls_for(good, "generator")).site_id == "site-0"
        with pytest.raises(grpc.RpcError) as plain:
            describe(port, None)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as stranger:
            describe(port, tls_for(other, "generator"))
        assert stranger.value.code() == grpc.StatusCode.UNAVAILABLE
        assert train_over_tls(sites, tmp_path, good, 2, "bf16+zstd") == 2
    finally:
        stop_sites(sites)


def test_site_with_another_sites_certificate_is_refused(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    good, _ = pki
    # The server at "site-0"'s address presents site-1's certificate (same CA): impersonation.
    sites = start_sites(1, tmp_path, tls=tls_for(good, "site-1"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            describe(sites[0][1].port, tls_for(good, "generator"), name="site-0")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        cfg = generator_config(
            sites, tmp_path, 1, tls=tls_for(good, "generator"), orchestrator={"connect_deadline_s": 3.0},
            quorum_timeout_s=3.0,
        )  # fmt: skip
        with pytest.raises(ConnectionError, match="site-0: TLS name mismatch"):
            GeneratorService.start(cfg)
    finally:
        stop_sites(sites)


def test_allow_list_admits_only_the_generator(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    """Every hospital's certificate comes from the same CA; with --allow-client generator, another hospital's
    certificate cannot call the site (PERMISSION_DENIED, counted in the metrics) but can still probe health."""
    good, _ = pki
    registry = CollectorRegistry()
    metrics = GrpcServerMetrics(registry, [pb.DESCRIPTOR.services_by_name["DiscriminatorService"]])
    sites = start_sites(
        1, tmp_path, tls=tls_for(good, "site-0"), allowed_clients=("generator",), interceptors={0: (metrics,)}
    )
    port = sites[0][1].port
    try:
        assert describe(port, tls_for(good, "generator")).site_id == "site-0"
        with pytest.raises(grpc.RpcError) as denied:
            describe(port, tls_for(good, "site-1"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        labels = {"grpc_type": "unary", "grpc_service": "asyndgan.v1.DiscriminatorService", "grpc_method": "Describe"}
        assert registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "PERMISSION_DENIED"}) == 1
        channel = make_channel(f"127.0.0.1:{port}", tls=tls_for(good, "site-1"), server_name="site-0")
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            channel.close()
        assert train_over_tls(sites, tmp_path, good, 1) == 1
    finally:
        stop_sites(sites)


def test_allow_list_needs_tls() -> None:
    with pytest.raises(ValueError, match="needs mutual TLS"):
        DiscriminatorConfig(site_id="s", data="embedded:icbm152?site=0&of=1", allowed_clients=("g",)).validate()
