"""Dial-out sites: they hold a Join stream to the generator and open no port; the generator waits for its quorum."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyndgan import __version__, wire
from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.services.generator.service import GeneratorConfig, GeneratorService
from asyndgan.v1 import federation_pb2_grpc as fpb_grpc
from tests.integration.cluster import (
    Starting,
    generator_config,
    start_dial_out_sites,
    start_sites,
    stop_dial_out,
    stop_sites,
)
from tests.integration.test_distributed import K, local_reference, params
from tests.integration.test_tls import tls_for


def dial_out_config(
    names: list[str], tmp_path: Path, iterations: int, codec: str = "f32", **kw: Any
) -> GeneratorConfig:
    cfg = generator_config([], tmp_path, iterations, codec, **kw)
    return replace(cfg, sites=tuple((name, None) for name in names))


def site_state(svc: GeneratorService, name: str) -> Any:
    return next(s for s in svc.status().sites if s.site_id == name)


def test_lossless_dial_out_equals_in_process_bit_for_bit(tmp_path: Path, one_thread: None) -> None:
    reference = local_reference(2, K)
    starting = Starting(dial_out_config(["site-0", "site-1"], tmp_path, K))
    sites = start_dial_out_sites([0, 1], 2, tmp_path, starting.port())
    svc = starting.service()
    try:
        svc.train()
        assert torch.equal(params(reference), params(svc.gen.G))
        assert all(s.address.startswith("dial-out from") for s in svc.status().sites)
    finally:
        svc.stop(grace=0)
        stop_dial_out(sites)


def test_mixed_federation_trains(tmp_path: Path) -> None:
    """site-0 is dialed by the generator, site-1 dials out: one orchestrator surface for both."""
    dial_in = start_sites(2, tmp_path)[:1]
    cfg = generator_config(dial_in, tmp_path, 4, "bf16+zstd")
    starting = Starting(replace(cfg, sites=(*cfg.sites, ("site-1", None))))
    dial_out = start_dial_out_sites([1], 2, tmp_path / "out", starting.port())
    svc = starting.service()
    try:
        svc.train()
        assert [s.steps_contributed for s in svc.status().sites] == [4, 4]
    finally:
        svc.stop(grace=0)
        stop_dial_out(dial_out)
        stop_sites(dial_in)


def test_generator_waits_for_its_quorum_and_serves_meanwhile(tmp_path: Path) -> None:
    """Started before every site: no exit; health, Status and Synthesize answer; training starts when the
    quorum (--min-sites 1 of 2) is in, and the second site joins at a later step."""
    # enough steps that the late site is in before the end: a site still waiting is probed only every 2 s
    # (OrchestratorConfig.max_backoff_s), and 40 steps once took 1.4 s here
    steps = 200
    starting = Starting(dial_out_config(["site-0", "site-1"], tmp_path, steps, "bf16+zstd", min_sites=1))
    port = starting.port()
    client = GeneratorClient(f"127.0.0.1:{port}", timeout=10)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    sites: list[Any] = []
    try:
        time.sleep(1.0)
        assert not starting.future.done(), "the generator waits, it does not exit"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        waiting = client.status()
        assert waiting.step == 0 and not waiting.training
        assert all("has not dialed in yet" in s.last_error for s in waiting.sites)
        with pytest.raises(grpc.RpcError) as err:
            client.synthesize(np.zeros((1, 32, 32), np.uint8))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        sites += start_dial_out_sites([0], 2, tmp_path, port)
        svc = starting.service()
        worker = threading.Thread(target=svc.train, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while svc.gen.steps < 5:
            assert time.monotonic() < deadline, "training did not start with the quorum"
            time.sleep(0.05)
        assert site_state(svc, "site-1").steps_contributed == 0
        sites += start_dial_out_sites([1], 2, tmp_path, port)
        worker.join(120)
        assert svc.gen.steps == steps
        assert site_state(svc, "site-1").steps_contributed >= 1, "the late site joined"
        assert site_state(svc, "site-0").steps_contributed == steps
        svc.stop(grace=0)
    finally:
        client.close()
        channel.close()
        stop_dial_out(sites)


def join(port: int, name: str, tls: Any = None) -> grpc.RpcError:
    """Opens a Join stream as ``name`` and returns the error it ends with."""
    from asyndgan.rpc import make_channel

    channel = make_channel(f"127.0.0.1:{port}", tls=tls, server_name="generator" if tls else None)
    try:
        for _ in fpb_grpc.FederationServiceStub(channel).Join(
            iter([wire.hello_to_proto(name, __version__)]), timeout=10
        ):
            pass
    except grpc.RpcError as e:
        return e
    finally:
        channel.close()
    raise AssertionError("the stream was accepted")


def test_unknown_site_is_refused(tmp_path: Path) -> None:
    starting = Starting(dial_out_config(["site-0"], tmp_path, 1))
    port = starting.port()
    try:
        err = join(port, "intruder")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "intruder" in (err.details() or "")
    finally:
        sites = start_dial_out_sites([0], 1, tmp_path, port)
        starting.service().stop(grace=0)
        stop_dial_out(sites)


def test_a_second_connection_replaces_the_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Newest wins (a site that reconnects through a new NAT mapping must not wait for its old stream to time
    out); the replaced stream ends with ABORTED, and training goes on."""
    starting = Starting(dial_out_config(["site-0"], tmp_path, 6, "bf16+zstd"))
    port = starting.port()
    sites = start_dial_out_sites([0], 1, tmp_path, port)
    svc = starting.service()
    try:
        svc.train(until=2)
        join_and_hold(port, "site-0")  # an intruding stream that answers nothing, for a second
        assert any("ABORTED" in r.getMessage() and "replaced" in r.getMessage() for r in caplog.records)
        svc.train(until=6)  # the site reconnected (newest wins again) and trains on
        assert svc.gen.steps == 6 and site_state(svc, "site-0").steps_contributed > 2
    finally:
        svc.stop(grace=0)
        stop_dial_out(sites)


def join_and_hold(port: int, name: str, seconds: float = 1.0) -> None:
    """A Join as ``name`` that answers nothing and hangs up after ``seconds``."""
    hang_up = threading.Event()

    def messages() -> Iterator[Any]:
        yield wire.hello_to_proto(name, __version__)
        hang_up.wait(10)

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = fpb_grpc.FederationServiceStub(channel).Join(messages())
    time.sleep(seconds)
    call.cancel()
    hang_up.set()
    channel.close()


def test_tls_join_needs_a_certificate_naming_the_site(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    good, _ = pki
    cfg = dial_out_config(["site-0"], tmp_path, 2, "bf16+zstd", tls=tls_for(good, "generator"))
    starting = Starting(cfg)
    port = starting.port()
    sites: list[Any] = []
    try:
        err = join(port, "site-0", tls=tls_for(good, "site-1"))  # another hospital's certificate, same CA
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "site-1" in (err.details() or "")
        sites = start_dial_out_sites([0], 1, tmp_path, port, tls=tls_for(good, "site-0"))
        svc = starting.service()
        assert svc.train()["iterations"] == 2
        svc.stop(grace=0)
    finally:
        stop_dial_out(sites)


def test_waiting_says_per_site_what_to_check(tmp_path: Path, pki: tuple[Path, Path]) -> None:
    """Connection refused, no answer (packets dropped), TLS name mismatch and a rejected certificate each give
    their own message, per site."""
    good, other = pki
    silent = socket.socket()  # accepts TCP connections and never speaks: a firewall that drops, seen from here
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    fast = {"orchestrator": {"connect_deadline_s": 2.0}, "quorum_timeout_s": 3.0}
    cfg = replace(
        generator_config([], tmp_path, 1, **fast),
        sites=(
            ("refused", f"127.0.0.1:{closed.getsockname()[1]}"),
            ("dropped", f"127.0.0.1:{silent.getsockname()[1]}"),
        ),
    )
    with pytest.raises(ConnectionError) as err:
        GeneratorService.start(cfg)
    assert "refused: connection refused" in str(err.value)
    assert "dropped: no answer from" in str(err.value)

    sites = start_sites(2, tmp_path, tls=tls_for(good, "site-1"))  # site-0's address serves site-1's certificate
    try:
        cfg = generator_config(sites, tmp_path, 1, tls=tls_for(other, "generator"), **fast)  # a CA the sites reject
        with pytest.raises(ConnectionError) as err:
            GeneratorService.start(cfg)
        assert "site-1: TLS handshake with" in str(err.value)
        cfg = generator_config(sites, tmp_path, 1, tls=tls_for(good, "generator"), **fast)
        with pytest.raises(ConnectionError) as err:
            GeneratorService.start(cfg)
        assert "site-0: TLS name mismatch" in str(err.value) and "site-1" not in str(err.value)
    finally:
        stop_sites(sites)
        silent.close()
        closed.close()
