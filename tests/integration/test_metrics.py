"""Observability: /metrics of both services (promtool), a real Prometheus scraping a short training run, the Grafana
dashboard's queries against it, health states, and agreement of the metrics with summary.json.

promtool and prometheus come from the Debian package ``prometheus``; without them these tests fail (not skip).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from asyndgan import codec
from asyndgan.algorithm import site_seed
from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.metrics import DROP_REASONS, MetricsHttpServer, make_registry, start_metrics_http
from asyndgan.report import Progress
from asyndgan.rpc import Server
from asyndgan.services.discriminator.service import DiscriminatorConfig, start_discriminator
from asyndgan.services.discriminator.site import Site
from asyndgan.services.generator.service import GeneratorConfig, GeneratorService
from asyndgan.v1 import discriminator_pb2 as dpb
from asyndgan.v1 import discriminator_pb2_grpc as dpb_grpc
from asyndgan.v1 import generator_pb2 as gpb
from asyndgan.v1 import generator_pb2_grpc as gpb_grpc
from tests.integration.cluster import BATCH, NET, TRAIN, site_spec

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "asyndgan.json"
RULES = ROOT / "deploy" / "k8s" / "asyndgan" / "rules" / "asyndgan.rules.yml"
SITES = ("hospital-0", "hospital-1")
RATE_WINDOW = "1m"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: install the Debian package `prometheus` "
            "(apt-get update && apt-get install -y prometheus). These tests do not skip.",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data: bytes = r.read()
        return data


# -- an in-process cluster with a registry per service ------------------------------------------------


@dataclass
class Cluster:
    sites: list[tuple[Site, Server, CollectorRegistry]]
    gen: GeneratorService
    registry: CollectorRegistry
    http: list[MetricsHttpServer] = field(default_factory=list)

    def serve_metrics(self) -> dict[str, int]:
        """Start /metrics for every service; name -> port."""
        regs = {"generator": self.registry, **{s.site_id: r for s, _, r in self.sites}}
        ports = {}
        for name, reg in regs.items():
            h = start_metrics_http(0, reg, "127.0.0.1")
            self.http.append(h)
            ports[name] = h.port
        return ports

    def stop(self) -> None:
        for h in self.http:
            h.close()
        self.gen.stop(grace=0)
        for _, server, _ in self.sites:
            server.stop(grace=0)


def start_cluster(tmp: Path, iterations: int, out: Path | None = None) -> Cluster:
    sites = []
    for j, name in enumerate(SITES):
        reg = make_registry("discriminator")
        cfg = DiscriminatorConfig(
            site_id=name,
            data=site_spec(j, len(SITES)),
            checkpoint_dir=tmp / name,
            batch_size=BATCH,
            seed=site_seed(0, j),
            net=NET,
            train=TRAIN,
        )
        site, server = start_discriminator(cfg, registry=reg)
        sites.append((site, server, reg))
    registry = make_registry("generator")
    gcfg = GeneratorConfig(
        sites=tuple((s.site_id, f"127.0.0.1:{server.port}") for s, server, _ in sites),
        iterations=iterations,
        checkpoint_dir=tmp / "generator",
        checkpoint_every=1000,
        net=NET,
        train=TRAIN,
        out=out,
    )
    return Cluster(sites, GeneratorService.start(gcfg, registry=registry), registry)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """Two sites and a generator, each with its own registry, after a short run (default bf16+zstd codec)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trained")
    cluster = start_cluster(tmp, iterations=6, out=tmp / "out")
    try:
        cluster.gen.train()
        summary = json.loads((tmp / "out" / "summary.json").read_text())
        yield cluster, summary
    finally:
        cluster.stop()


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    assert v is not None, f"{name}{labels} missing"
    return v


# -- metrics agree with summary.json -------------------------------------------------------------------


def test_summary_bytes_agree_with_metrics(trained: tuple[Cluster, dict[str, Any]]) -> None:
    cluster, summary = trained
    reg = cluster.registry
    for s in summary["sites"]:
        for direction in ("sent", "received"):
            assert (
                value(reg, "asyndgan_wire_bytes_total", site=s["name"], direction=direction)
                == s[f"wire_bytes_{direction}"]
            )
    for kind in ("wire", "payload"):
        for direction in ("sent", "received"):
            total = sum(value(reg, f"asyndgan_{kind}_bytes_total", site=n, direction=direction) for n in SITES)
            assert total == summary[f"{kind}_bytes_{direction}"] > 0
            wire = sum(value(reg, "asyndgan_wire_bytes_total", site=n, direction=direction) for n in SITES)
            assert wire <= total
    steps = summary["steps_this_run"]
    assert value(reg, "asyndgan_iterations_total") == steps == 6
    assert value(reg, "asyndgan_step_duration_seconds_count") == steps
    assert value(reg, "asyndgan_sites_active") == 2 == value(reg, "asyndgan_sites_configured")
    assert value(reg, "asyndgan_generator_step") == summary["iterations"] == value(reg, "asyndgan_target_steps") == 6
    for name in SITES:
        assert value(reg, "asyndgan_site_active", site=name) == 1
        assert value(reg, "asyndgan_site_finished", site=name) == 0
    assert value(reg, "asyndgan_loss", network="G", site="all", modality="", term="total") == pytest.approx(
        summary["generator_loss"]
    )
    for site, _, site_reg in cluster.sites:
        name = site.site_id
        assert value(reg, "asyndgan_rpc_duration_seconds_count", site=name, method="Step") == steps
        assert value(reg, "asyndgan_rpcs_total", site=name, method="Step", code="OK") == steps
        for reason in DROP_REASONS:
            assert value(reg, "asyndgan_site_dropped_total", site=name, reason=reason) == 0
        # The site reports its own losses; the generator shows the same values from the replies.
        assert value(site_reg, "asyndgan_site_steps_total", site=name) == steps
        for t in site.last_losses:
            labels = {"network": t.network, "site": name, "modality": t.modality, "term": t.term}
            assert value(site_reg, "asyndgan_loss", **labels) == value(reg, "asyndgan_loss", **labels) == t.value


def test_grpc_server_metrics_cover_unary_and_streaming_calls(trained: tuple[Cluster, dict[str, Any]]) -> None:
    cluster, summary = trained
    _, server, site_reg = cluster.sites[0]
    unary = {"grpc_type": "unary", "grpc_service": "asyndgan.v1.DiscriminatorService"}
    steps = summary["steps_this_run"]
    assert value(site_reg, "grpc_server_handled_total", grpc_method="Step", grpc_code="OK", **unary) == steps
    assert value(site_reg, "grpc_server_handling_seconds_count", grpc_method="Step", **unary) == steps
    assert value(site_reg, "grpc_server_msg_received_total", grpc_method="Step", **unary) == steps
    # Methods never called exist from the start (at zero), as go-grpc-prometheus does it.
    assert value(site_reg, "grpc_server_started_total", grpc_method="Status", **unary) == 0

    # A failing unary call is counted with its status code.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = dpb_grpc.DiscriminatorServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(dpb.StepRequest(batch_id=10**9), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # fakes missing
        stub.Status(dpb.StatusRequest(), timeout=10)
    assert value(site_reg, "grpc_server_handled_total", grpc_method="Step", grpc_code="INVALID_ARGUMENT", **unary) == 1
    assert value(site_reg, "grpc_server_handled_total", grpc_method="Status", grpc_code="OK", **unary) == 1

    # Bidirectional streaming (Synthesize): one call, messages counted both ways; an aborted stream too.
    bidi = {"grpc_type": "bidi_stream", "grpc_service": "asyndgan.v1.GeneratorService", "grpc_method": "Synthesize"}
    reg = cluster.registry
    with GeneratorClient(f"127.0.0.1:{cluster.gen.server.port}", timeout=30) as client:
        images, _ = client.synthesize(np.zeros((5, 32, 32), np.uint8), batch_size=2)
        assert images.shape == (5, 1, 32, 32)
        with pytest.raises(grpc.RpcError):
            client.synthesize(np.full((2, 32, 32), 200, np.uint8))  # label values out of range
    assert value(reg, "grpc_server_started_total", **bidi) == 2
    assert value(reg, "grpc_server_handled_total", grpc_code="OK", **bidi) == 1
    assert value(reg, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **bidi) == 1
    assert value(reg, "grpc_server_handling_seconds_count", **bidi) == 2
    assert value(reg, "grpc_server_msg_received_total", **bidi) == 4  # 3 batches, then 1 bad one
    assert value(reg, "grpc_server_msg_sent_total", **bidi) == 3

    # Streams the client abandons half-way are each recorded exactly once, never as UNKNOWN. grpcio may hand a
    # cancelled stream's handler a plain end of input before it learns of the cancellation; such a stream is
    # counted with the code its handler ended with (OK), as go-grpc-prometheus counts handler results.
    release = threading.Event()
    abandoned = 12

    def requests() -> Iterator[gpb.SynthesizeRequest]:
        yield gpb.SynthesizeRequest(labels=codec.encode(torch.zeros(2, 32, 32, dtype=torch.uint8), codec.LABEL_CODEC))
        release.wait(10)

    with grpc.insecure_channel(f"127.0.0.1:{cluster.gen.server.port}") as ch:
        for _ in range(abandoned):
            stream = gpb_grpc.GeneratorServiceStub(ch).Synthesize(requests(), timeout=30)
            next(stream)
            stream.cancel()
        deadline = time.monotonic() + 30
        while value(reg, "grpc_server_handling_seconds_count", **bidi) < 2 + abandoned:
            assert time.monotonic() < deadline, "abandoned streams not recorded"
            time.sleep(0.05)
        release.set()
    time.sleep(0.2)  # nothing is recorded twice, late
    names = [code.name for code in grpc.StatusCode]
    codes = {c: reg.get_sample_value("grpc_server_handled_total", {**bidi, "grpc_code": c}) or 0 for c in names}
    assert codes["CANCELLED"] >= 1 and codes["UNKNOWN"] == 0
    assert codes["CANCELLED"] + codes["OK"] == abandoned + 1, codes
    assert sum(codes.values()) == value(reg, "grpc_server_started_total", **bidi) == 2 + abandoned


def test_promtool_check_metrics_on_both_services(trained: tuple[Cluster, dict[str, Any]]) -> None:
    promtool = tool("promtool")
    cluster, _ = trained
    ports = cluster.serve_metrics()
    for name, port in ports.items():
        text = http_get(f"http://127.0.0.1:{port}/metrics")
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert res.returncode == 0, f"{name}: {res.stdout.decode()} {res.stderr.decode()}"
        names = {m.name for m in text_string_to_metric_families(text.decode())}
        assert {"grpc_server_handled", "grpc_server_handling_seconds", "grpc_server_started"} <= names, name
        assert {"asyndgan_build_info", "asyndgan_loss", "process_cpu_seconds"} <= names, name
        if name == "generator":
            assert {
                "asyndgan_wire_bytes",
                "asyndgan_payload_bytes",
                "asyndgan_rpc_duration_seconds",
                "asyndgan_step_duration_seconds",
                "asyndgan_iterations",
                "asyndgan_sites_active",
                "asyndgan_site_dropped",
                "asyndgan_generator_step",
                "asyndgan_target_steps",
                "asyndgan_site_active",
                "asyndgan_site_finished",
            } <= names
        else:
            assert "asyndgan_site_steps" in names


def test_step_gauge_carries_on_after_a_restart(trained: tuple[Cluster, dict[str, Any]]) -> None:
    """A generator resumed from the checkpoint: its iterations counter starts again at 0, its step gauge does not."""
    cluster, summary = trained
    stop = threading.Event()
    stop.set()  # G is built from the checkpoint; then no waiting for the sites (nothing listens at port 9)
    sites = tuple((name, "127.0.0.1:9") for name, _ in cluster.gen.cfg.sites)
    cfg = dataclasses.replace(cluster.gen.cfg, sites=sites, resume=True, iterations=50, out=None, port_file=None)
    reg = make_registry("generator", process=False)
    gen = GeneratorService.start(cfg, registry=reg, stop=stop)
    try:
        assert value(reg, "asyndgan_generator_step") == summary["iterations"] == 6
        assert value(reg, "asyndgan_target_steps") == 50
        assert value(reg, "asyndgan_iterations_total") == 0
    finally:
        gen.stop(grace=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_rate_limited_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    p = Progress(1000, start=200, interval=10, bar=False, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="asyndgan.report"):
        for step in range(201, 1001):  # 2 steps per second, resumed at step 200
            clock.now += 0.5
            p.update(step, g_loss=0.5)
            if step == 600:
                assert p.rate == pytest.approx(2.0) and p.eta == pytest.approx(200.0)
    lines = [r.getMessage() for r in caplog.records]
    assert 40 <= len(lines) <= 42, lines  # 400 s: one line per 10 s (+ the first and the last), not one per step
    assert lines[-1].startswith("step 1000/1000 (100%), 2 it/s, elapsed 6m40s, ETA 0s g_loss=0.5"), lines[-1]
    assert "step 201/1000 (20%)" in lines[0] and "ETA 6m40s" in lines[0]

    caplog.clear()
    clock.now = 0.0
    q = Progress(10, what="eval", unit="units", interval=30, bar=False, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="asyndgan.report"):
        q.update(0, phase="easy: generators")
        q.advance(0)  # same phase, within 30 s: no line
        clock.now = 10.0
        q.advance(2, phase="easy: segmenters")  # a new phase: a line at once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("eval [easy: generators] 0/10 (0%)") and "ETA ?" in lines[0]
    assert lines[1].startswith("eval [easy: segmenters] 2/10 (20%), 0.2 units/s, elapsed 10s, ETA 40s"), lines[1]


# -- health ----------------------------------------------------------------------------------------------


def health_status(port: int, service: str = "") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def spy_port_file(monkeypatch: pytest.MonkeyPatch, module: str, seen: list[str]) -> None:
    """When a service writes its port file (its port is now public), record what health says at that moment."""
    import importlib

    mod = importlib.import_module(module)
    real: Callable[[Path, bytes], None] = mod.write_bytes_atomic

    def spy(path: Path, data: bytes) -> None:
        real(path, data)
        seen.append(health_status(int(data)))

    monkeypatch.setattr(mod, "write_bytes_atomic", spy)


def watch_until_not_serving(server: Server, service: str) -> list[str]:
    """Watch health while the server shuts down gracefully; returns the statuses seen."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        seen = [health_pb2.HealthCheckResponse.ServingStatus.Name(next(stream).status)]
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 10.0})
        stopper.start()
        seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(stream).status))
        stream.cancel()  # the last in-flight call; lets the graceful stop finish early
        stopper.join(timeout=15)
        assert not stopper.is_alive()
    return seen


def test_health_serving_only_when_loaded_and_not_serving_during_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_seen: list[str] = []
    gen_seen: list[str] = []
    spy_port_file(monkeypatch, "asyndgan.services.discriminator.service", site_seen)
    spy_port_file(monkeypatch, "asyndgan.services.generator.service", gen_seen)
    cfg = DiscriminatorConfig(
        site_id="hospital-0",
        data=site_spec(0, 2),
        batch_size=BATCH,
        net=NET,
        train=TRAIN,
        port_file=tmp_path / "site.port",
        checkpoint_dir=tmp_path / "site",
    )
    _, server = start_discriminator(cfg)
    gen = None
    try:
        # Reachable before it is ready: NOT_SERVING; SERVING once data and model are loaded.
        assert site_seen == ["NOT_SERVING"]
        assert health_status(server.port) == "SERVING"
        assert health_status(server.port, "asyndgan.v1.DiscriminatorService") == "SERVING"
        gen = GeneratorService.start(
            GeneratorConfig(
                sites=(("hospital-0", f"127.0.0.1:{server.port}"),),
                iterations=0,
                checkpoint_dir=tmp_path / "g",
                net=NET,
                train=TRAIN,
                port_file=tmp_path / "gen.port",
            )
        )
        assert gen_seen == ["NOT_SERVING"]
        assert health_status(gen.server.port, "asyndgan.v1.GeneratorService") == "SERVING"
        # Graceful shutdown: NOT_SERVING first, then the server drains and stops.
        assert watch_until_not_serving(gen.server, "asyndgan.v1.GeneratorService") == ["SERVING", "NOT_SERVING"]
        assert watch_until_not_serving(server, "") == ["SERVING", "NOT_SERVING"]
    finally:
        if gen is not None:
            gen.stop(grace=0)
        server.stop(grace=0)


# -- the Grafana dashboard -------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return model


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every query in the dashboard."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


DASHBOARD_VARIABLES = ("namespace", "job", "site")  # each with All = ".*"
SCOPE = 'namespace=~"$namespace", job=~"$job"'
SELECTOR = re.compile(r"\b((?:asyndgan|grpc_server)_[a-z_]+)(\{[^}]*\})?")


def concrete(expr: str) -> str:
    """What Grafana sends for this expr with every variable at All over a short range."""
    out = expr.replace("$__rate_interval", RATE_WINDOW)
    for name in DASHBOARD_VARIABLES:
        out = out.replace(f"${{{name}}}", ".*").replace(f"${name}", ".*")
    assert "$" not in out, out
    return out


def test_dashboard_model_is_complete() -> None:
    model = dashboard()
    assert model["uid"] and model["title"] and model["schemaVersion"] >= 30
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert [v["name"] for v in model["templating"]["list"]] == ["datasource", *DASHBOARD_VARIABLES]
    for name in DASHBOARD_VARIABLES:  # two releases in one Prometheus are told apart by namespace and job
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
        assert v["query"]["query"].startswith("label_values(") and v["query"]["query"].endswith(f", {name})"), name
    assert 'namespace=~"$namespace"' in variables["job"]["query"]["query"]
    assert SCOPE in variables["site"]["query"]["query"]
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in model["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
        for t in p["targets"]:  # every series selector is scoped to the chosen namespace(s) and job(s)
            for m in SELECTOR.finditer(t["expr"]):
                assert (m.group(2) or "").startswith("{" + SCOPE), (p["title"], m.group(0))
    exprs = " ".join(e for _, e in dashboard_exprs())
    for needle in (
        "rate(asyndgan_wire_bytes_total",
        "asyndgan_payload_bytes_total",
        "histogram_quantile(0.5, sum by (le, site) (rate(asyndgan_rpc_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, site) (rate(asyndgan_rpc_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, site) (rate(asyndgan_rpc_duration_seconds_bucket",
        "asyndgan_step_duration_seconds",
        "rate(asyndgan_iterations_total",
        "asyndgan_loss",
        "asyndgan_sites_active",
        "asyndgan_site_dropped_total",
        "asyndgan_generator_step",
        "asyndgan_target_steps",
        "asyndgan_site_active",
        'site=~"$site"',
        "[$__rate_interval]",
    ):
        assert needle in exprs, needle


def test_dashboard_queries_pass_promtool_check_rules(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules = tmp_path / "dashboard.rules.yml"
    lines = ["groups:", "  - name: asyndgan-dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_exprs()):
        lines += [f"      - record: asyndgan:dashboard_query_{i}", f"        expr: {json.dumps(concrete(expr))}"]
    rules.write_text("\n".join(lines) + "\n")
    res = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(dashboard_exprs())} rules found" in res.stdout


# -- the alert rules (deploy/k8s/asyndgan/rules: the chart's PrometheusRule, or a plain rules file) -------


def loaded_alert_rules(tmp: Path) -> dict[str, dict[str, Any]]:
    """RULES as Prometheus itself loads them (the project has no YAML parser): by name, from /api/v1/rules."""
    prom = Prometheus(tmp, {}, (RULES,))
    try:
        prom.wait("the alert rules loaded", lambda: len(prom.alert_rules()) == 2)
        return prom.alert_rules()
    finally:
        prom.stop()


def expected_annotations(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations with {{ $labels.X }} filled in (the only template they use)."""
    fill = re.compile(r"\{\{ \$labels\.(\w+) \}\}")
    return {k: fill.sub(lambda m: labels[m.group(1)], v) for k, v in rule["annotations"].items()}


def alert_case(rule: dict[str, Any], eval_time: str, *fired: dict[str, str]) -> dict[str, Any]:
    exp = [
        {
            "exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": expected_annotations(rule, {**labels, **rule["labels"]}),
        }
        for labels in fired
    ]
    return {"eval_time": eval_time, "alertname": rule["name"], "exp_alerts": exp}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"namespace": "ns", "job": "gen", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_alert_rules_pass_promtool_check_and_fire_when_they_should(tmp_path: Path) -> None:
    """SiteDown: a site left out for > 5 min, not a finished one, nothing once the target is reached.
    NoProgress: G's step unchanged for 10 min below its target, not in a release's first 10 minutes."""
    promtool = tool("promtool")
    res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "2 rules found" in res.stdout, res.stdout + res.stderr
    rules = loaded_alert_rules(tmp_path)
    down, stalled = rules["AsynDGANSiteDown"], rules["AsynDGANNoProgress"]
    assert down["duration"] == 300 and down["labels"]["severity"] == "warning"
    assert stalled["labels"]["severity"] == "critical"
    a, gen = {"namespace": "ns", "job": "gen", "site": "a"}, {"namespace": "ns", "job": "gen"}
    training = [  # a out from minute 2; b in; c finished (its budget spent); G stalls at step 5 from minute 5
        series("asyndgan_site_active", "1 1 0x30", site="a"),
        series("asyndgan_site_active", "1x32", site="b"),
        series("asyndgan_site_active", "0x32", site="c"),
        *(series("asyndgan_site_finished", "0x32", site=s) for s in "ab"),
        series("asyndgan_site_finished", "1x32", site="c"),
        series("asyndgan_target_steps", "100x32"),
        series("asyndgan_generator_step", "0+1x5 5x27"),
    ]
    finished = [  # every site has spent its budget at step 40: training ends there by design
        *(series("asyndgan_site_active", "0x32", site=s) for s in "ab"),
        *(series("asyndgan_site_finished", "1x32", site=s) for s in "ab"),
        series("asyndgan_target_steps", "100x32"),
        series("asyndgan_generator_step", "40x32"),
    ]
    done = [  # target reached; a site that went away afterwards does not matter
        series("asyndgan_site_active", "0x32", site="a"),
        series("asyndgan_site_finished", "0x32", site="a"),
        series("asyndgan_target_steps", "100x32"),
        series("asyndgan_generator_step", "100x32"),
    ]
    young = [series("asyndgan_target_steps", "100x8"), series("asyndgan_generator_step", "0x8")]
    tests = [
        {
            "interval": "1m",
            "input_series": training,
            "alert_rule_test": [
                alert_case(down, "6m"),  # out for 4 minutes: not yet
                alert_case(down, "8m", a),
                alert_case(stalled, "12m"),  # unchanged for 7 minutes: not yet
                alert_case(stalled, "17m", gen),
            ],
        },
        {
            "interval": "1m",
            "input_series": finished,
            "alert_rule_test": [alert_case(down, "20m"), alert_case(stalled, "20m")],
        },
        {
            "interval": "1m",
            "input_series": done,
            "alert_rule_test": [alert_case(down, "20m"), alert_case(stalled, "20m")],
        },
        {"interval": "1m", "input_series": young, "alert_rule_test": [alert_case(stalled, "8m")]},
    ]
    spec = tmp_path / "alerts.test.yml"
    spec.write_text(json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    res = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# -- a real Prometheus scraping a real training run -----------------------------------------------------


class Prometheus:
    """prometheus on 127.0.0.1 with a temp config and data dir, scraping every second."""

    def __init__(self, tmp: Path, jobs: dict[str, list[int]], rule_files: tuple[Path, ...] = ()) -> None:
        binary = tool("prometheus")
        lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 1s", "  evaluation_interval: 1s"]
        lines.append(f"rule_files: {json.dumps([str(f) for f in rule_files])}")
        lines.append("scrape_configs:" if jobs else "scrape_configs: []")
        for job, ports in jobs.items():
            targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
            lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: [{targets}]"]
        config = tmp / "prometheus.yml"
        config.write_text("\n".join(lines) + "\n")
        self.expected_targets = sum(len(p) for p in jobs.values())
        self.log = tmp / "prometheus.log"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        body = json.loads(http_get(url))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["result"]
        return result

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if ok():
                    return
            except (OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.25)
        pytest.fail(f"prometheus: {what} within {timeout:.0f} s; log: {self.log.read_text()[-2000:]}")

    def alert_rules(self) -> dict[str, dict[str, Any]]:
        """The alerting rules Prometheus loaded, by name: query, duration (s), labels, annotations, health."""
        groups = self.api("/api/v1/rules", type="alert")["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    def all_targets_up(self) -> bool:
        targets = self.api("/api/v1/targets")["activeTargets"]
        return len(targets) == self.expected_targets and all(t["health"] == "up" for t in targets)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def by_site(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}


def test_prometheus_scrapes_training_and_dashboard_returns_data(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    iterations = 20
    cluster = start_cluster(tmp_path, iterations, out=tmp_path / "out")
    prom = None
    try:
        ports = cluster.serve_metrics()
        prom = Prometheus(
            tmp_path,
            {
                "asyndgan-generator": [ports["generator"]],
                "asyndgan-discriminator": [ports[n] for n in SITES],
            },
            (RULES,),
        )
        prom.wait("all targets up", prom.all_targets_up)
        # Training starts only after a first scrape, so every counter has a sample from before it.
        summary = cluster.gen.train()
        prom.wait(
            "the final step scraped",
            lambda: (r := prom.query("asyndgan_iterations_total")) != [] and float(r[0]["value"][1]) == iterations,
        )

        # Per-site bytes in both directions, fewer on the wire than raw, and equal to summary.json.
        wire = by_site(prom.query("asyndgan_wire_bytes_total"), "site", "direction")
        payload = by_site(prom.query("asyndgan_payload_bytes_total"), "site", "direction")
        assert set(wire) == set(payload) == {(s, d) for s in SITES for d in ("sent", "received")}
        for key in wire:
            assert 0 < wire[key] < payload[key], key
        for s in summary["sites"]:
            assert wire[(s["name"], "sent")] == s["wire_bytes_sent"]
            assert wire[(s["name"], "received")] == s["wire_bytes_received"]

        # Latency quantiles per site, from the histogram.
        for q in (0.5, 0.95, 0.99):
            expr = (
                f"histogram_quantile({q}, sum by (le, site) "
                f'(rate(asyndgan_rpc_duration_seconds_bucket{{method="Step"}}[{RATE_WINDOW}])))'
            )
            lat = by_site(prom.query(expr), "site")
            assert set(lat) == {(s,) for s in SITES}, expr
            assert all(0 < v < 60 for v in lat.values()), (expr, lat)

        # Every dashboard query returns data from this Prometheus.
        empty = [f"{title}: {concrete(e)}" for title, e in dashboard_exprs() if not prom.query(concrete(e))]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        ratio = prom.query(concrete(next(e for t, e in dashboard_exprs() if t.startswith("Compression ratio"))))
        assert all(float(r["value"][1]) > 1 for r in ratio), ratio
        progress = by_site(prom.query("asyndgan_generator_step / asyndgan_target_steps"), "job")
        assert progress == {("asyndgan-generator",): 1.0}, progress
        # A healthy run: the alert rules evaluate without error on the real series and nothing fires.
        prom.wait("the alert rules evaluated", lambda: all(r["health"] == "ok" for r in prom.alert_rules().values()))
        for name, rule in prom.alert_rules().items():
            assert rule["state"] == "inactive" and prom.query(rule["query"]) == [], name
        active = by_site(prom.query('max by (site) (asyndgan_site_active{namespace=~".*", job=~".*"})'), "site")
        assert active == {(s,): 1.0 for s in SITES}, active
        rate = prom.query(f"sum(rate(asyndgan_iterations_total[{RATE_WINDOW}]))")
        assert float(rate[0]["value"][1]) > 0
        step = prom.query(
            f"histogram_quantile(0.5, sum by (le) (rate(asyndgan_step_duration_seconds_bucket[{RATE_WINDOW}])))"
        )
        assert 0 < float(step[0]["value"][1]) < 60
        losses = by_site(prom.query('asyndgan_loss{network="D"}'), "job", "site", "term")
        for job in ("asyndgan-generator", "asyndgan-discriminator"):
            assert {(job, s, "fake") for s in SITES} <= set(losses), losses
            assert all(math.isfinite(v) for v in losses.values())
        # The sites run the default guard: no loss computed on real images reaches any metric.
        assert not [k for k in losses if k[2] == "real"], losses
        spent = by_site(prom.query("asyndgan_privacy_epsilon"), "site")
        assert {k[0] for k in spent} == set(SITES) and all(0 < v <= 8 for v in spent.values()), spent
    finally:
        if prom is not None:
            prom.stop()
        cluster.stop()


# -- the demo: summary.json and the metrics agree --------------------------------------------------------


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.e2e
def test_demo_with_metrics_agrees_with_summary(tmp_path: Path) -> None:
    promtool = tool("promtool")
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "asyndgan.cli", "demo", "--sites", "2", "--iterations", "3", "--size", "32",
         "--batch-size", "4", "--out", str(out), "--metrics"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families((out / "metrics.prom").read_text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def metric(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    for s in summary["sites"]:
        for d in ("sent", "received"):
            assert metric("asyndgan_wire_bytes_total", site=s["name"], direction=d) == s[f"wire_bytes_{d}"] > 0
    for kind in ("wire", "payload"):
        for d in ("sent", "received"):
            total = sum(metric(f"asyndgan_{kind}_bytes_total", site=s["name"], direction=d) for s in summary["sites"])
            assert total == summary[f"{kind}_bytes_{d}"]
    assert metric("asyndgan_iterations_total") == summary["iterations"] == 3

    # Every process had its own metrics port, recorded in the run dir, and closed it on exit.
    urls = json.loads((out / "run" / "metrics.json").read_text())
    assert set(urls) == {"generator", "hospital-0", "hospital-1"}
    for name, url in urls.items():
        port = int((out / "run" / "metrics" / f"{name}.port").read_text())
        assert url == f"http://127.0.0.1:{port}/metrics"
        assert port_closed(port), name
    check = subprocess.run(
        [promtool, "check", "config", str(out / "run" / "prometheus.yml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
