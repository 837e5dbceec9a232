"""Real gRPC discriminator servers on 127.0.0.1:0 inside the test process, and generator configs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from asyndgan.algorithm import TrainConfig, site_seed
from asyndgan.guard import PrivacyConfig
from asyndgan.nets import NetConfig
from asyndgan.rpc import Server
from asyndgan.services.discriminator.dialout import DialOut
from asyndgan.services.discriminator.service import DiscriminatorConfig, start_dial_out, start_discriminator
from asyndgan.services.discriminator.site import Site
from asyndgan.services.generator.orchestrator import OrchestratorConfig
from asyndgan.services.generator.service import GeneratorConfig, GeneratorService

NET = NetConfig(generator="unet_32", ngf=8, ndf=8)
TRAIN = TrainConfig()
SIZE = 32
BATCH = 4
# The in-process reference trainer runs the paper's exchange; sites compared with it bit for bit run unguarded.
PAPER = PrivacyConfig(mode="none")


def site_spec(j: int, of: int, modalities: str = "t1") -> str:
    return f"embedded:icbm152?site={j}&of={of}&size={SIZE}&modalities={modalities}"


def start_sites(
    n: int,
    tmp_path: Path,
    *,
    seed: int = 0,
    modalities: Sequence[str] | None = None,
    interceptors: dict[int, tuple[grpc.ServerInterceptor, ...]] | None = None,
    privacy: Sequence[PrivacyConfig] | PrivacyConfig = PAPER,
    **overrides: Any,
) -> list[tuple[Site, Server]]:
    """``n`` sites; ``privacy`` one config for all, or one per site."""
    guards = [privacy] * n if isinstance(privacy, PrivacyConfig) else list(privacy)
    out = []
    for j in range(n):
        cfg = site_config(
            j, n, tmp_path, seed, data=site_spec(j, n, modalities[j] if modalities else "t1"), privacy=guards[j]
        )
        out.append(start_discriminator(replace(cfg, **overrides), (interceptors or {}).get(j, ())))
    return out


def stop_sites(sites: list[tuple[Site, Server]]) -> None:
    for site, server in sites:
        server.stop(grace=0)
        site.close()


def site_config(j: int, n: int, tmp_path: Path, seed: int = 0, **overrides: Any) -> DiscriminatorConfig:
    cfg = DiscriminatorConfig(
        site_id=f"site-{j}",
        data=site_spec(j, n),
        checkpoint_dir=tmp_path / f"site-{j}",
        batch_size=BATCH,
        seed=site_seed(seed, j),
        net=NET,
        train=TRAIN,
        privacy=PAPER,
    )
    return replace(cfg, **overrides)


def start_dial_out_sites(
    sites: Sequence[int], n: int, tmp_path: Path, port: int, **overrides: Any
) -> list[tuple[Site, DialOut]]:
    """Sites ``sites`` of ``n`` that join the generator on 127.0.0.1:``port`` (no listening port)."""
    return [start_dial_out(site_config(j, n, tmp_path, connect=f"127.0.0.1:{port}", **overrides)) for j in sites]


def stop_dial_out(sites: list[tuple[Site, DialOut]]) -> None:
    for site, link in sites:
        link.stop()
        site.close()


class Starting:
    """``GeneratorService.start`` in a thread (it waits for its sites); its port is known as soon as it serves."""

    def __init__(self, cfg: GeneratorConfig, **kw: Any) -> None:
        self.port_file = cfg.checkpoint_dir.parent / "generator.port"
        self.port_file.unlink(missing_ok=True)
        cfg = replace(cfg, port_file=self.port_file)
        self.pool = ThreadPoolExecutor(1)
        self.future = self.pool.submit(GeneratorService.start, cfg, **kw)

    def port(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.future.done():
                self.future.result()  # raises what start raised
            assert time.monotonic() < deadline, "the generator did not start serving"
            time.sleep(0.05)
        return int(self.port_file.read_text())

    def service(self, timeout: float = 60) -> GeneratorService:
        svc = self.future.result(timeout)
        self.pool.shutdown()
        return svc


def generator_config(
    sites: list[tuple[Site, Server]], tmp_path: Path, iterations: int, codec: str = "f32", **kw: Any
) -> GeneratorConfig:
    orch = OrchestratorConfig(image_codec=codec, grad_codec=codec, **kw.pop("orchestrator", {}))
    kw.setdefault("quorum_timeout_s", 60.0)  # a test never waits forever for a site
    return GeneratorConfig(
        sites=tuple((site.site_id, f"127.0.0.1:{server.port}") for site, server in sites),
        iterations=iterations,
        checkpoint_dir=tmp_path / "generator",
        net=NET,
        train=TRAIN,
        orchestrator=orch,
        **kw,
    )
