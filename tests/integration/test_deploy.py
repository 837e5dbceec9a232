"""Deployment artefacts that must not drift from the code: the chart's dashboard copy, versions and pins, the
in-image health probe (deploy/docker/asyndgan-health) against a real gRPC health service, plain and mutual TLS, the
`helm test` Pod's metrics check of a dial-out site against a real /metrics, and the alert rules' scoping marker.

The chart itself is checked by `make helm-lint`, the images by `make docker-smoke` (both need tools)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from asyndgan import __version__
from asyndgan.certs import init_ca, issue
from asyndgan.metrics import make_registry, start_metrics_http
from asyndgan.rpc import Server, TlsConfig, make_server

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "asyndgan"
HEALTH = ROOT / "deploy" / "docker" / "asyndgan-health"
TEST_POD = CHART / "templates" / "tests" / "test-health.yaml"
RULES = CHART / "rules" / "asyndgan.rules.yml"
SCOPE = 'namespace=~".*", job=~".*"'  # what the chart's PrometheusRule replaces with the release's namespace and job


def test_chart_dashboard_is_the_canonical_one() -> None:
    canonical = ROOT / "deploy" / "grafana" / "asyndgan.json"
    copy = CHART / "dashboards" / "asyndgan.json"
    assert copy.read_bytes() == canonical.read_bytes(), "run scripts/helm_lint.sh --sync-dashboard"


def test_chart_app_version_is_the_package_version() -> None:
    chart = (CHART / "Chart.yaml").read_text()
    app_version = re.search(r'^appVersion:\s*"?([^"\s]+)"?', chart, re.M)
    assert app_version and app_version.group(1) == __version__  # the image tag the chart defaults to


def test_image_torch_pin_is_the_makefile_pin() -> None:
    makefile = re.search(r"^TORCH_PIN \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
    dockerfile = re.search(r"^ARG TORCH_SPEC=(\S+)", (ROOT / "deploy" / "docker" / "Dockerfile").read_text(), re.M)
    build_sh = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (ROOT / "deploy" / "docker" / "build.sh").read_text())
    assert makefile and dockerfile and build_sh
    assert makefile.group(1) == dockerfile.group(1) == build_sh.group(1)


def probe(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTH), f"--address=127.0.0.1:{port}", "--timeout=5", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def health_server(tls: TlsConfig | None = None) -> Server:
    return make_server("127.0.0.1:0", lambda _s: None, ["asyndgan.v1.DiscriminatorService"], tls=tls)


def test_health_probe_follows_the_serving_state() -> None:
    server = health_server()
    try:
        assert probe(server.port).returncode == 1  # make_server starts NOT_SERVING
        server.set_serving(True)
        ok = probe(server.port)
        assert ok.returncode == 0 and "SERVING" in ok.stdout
        assert probe(server.port, "--service=asyndgan.v1.DiscriminatorService").returncode == 0
    finally:
        server.stop(grace=0)
    down = probe(server.port)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_health_probe_over_mutual_tls_with_the_pods_own_certificate(tmp_path: Path) -> None:
    init_ca(tmp_path)
    cert, key = issue(tmp_path, "hospital-a")
    ca = tmp_path / "ca.pem"
    server = health_server(TlsConfig(cert, key, ca))
    server.set_serving(True)
    try:
        own = [f"--tls-cert={cert}", f"--tls-key={key}", f"--tls-ca={ca}"]
        ok = probe(server.port, *own, "--server-name=hospital-a")
        assert ok.returncode == 0, ok.stderr
        assert probe(server.port, *own, "--server-name=hospital-b").returncode == 1  # wrong name: refused
        assert probe(server.port).returncode == 1  # plaintext against the TLS port
        assert probe(server.port, f"--tls-cert={cert}").returncode == 2  # incomplete TLS flags
    finally:
        server.stop(grace=0)


def block_after(text: str, head: str) -> str:
    """The indented block scalar that follows the line ``head`` (e.g. ``- |`` or ``expr: |``), dedented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == head)
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return textwrap.dedent("\n".join(body))


def run_metrics_check(url: str) -> subprocess.CompletedProcess[str]:
    """The dial-out `helm test` Pod's command: python -c SCRIPT URL TIMEOUT."""
    script = block_after(TEST_POD.read_text(), "- |")
    return subprocess.run([sys.executable, "-c", script, url, "5"], capture_output=True, text=True, timeout=60)


class NotMetrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, *args: object) -> None:
        pass


def test_helm_test_metrics_check_of_a_dial_out_site() -> None:
    http = start_metrics_http(0, make_registry("discriminator", process=False))
    try:
        ok = run_metrics_check(http.url)
        assert ok.returncode == 0 and "serves asyndgan metrics" in ok.stdout, ok.stdout + ok.stderr
    finally:
        http.close()
    other = HTTPServer(("127.0.0.1", 0), NotMetrics)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_metrics_check(f"http://127.0.0.1:{other.server_address[1]}/metrics").returncode == 1
    finally:
        other.shutdown()
        other.server_close()
    assert run_metrics_check(http.url).returncode != 0  # nothing listens any more


def test_alert_rules_scope_every_selector_with_the_charts_marker() -> None:
    """The chart scopes the alerts by replacing SCOPE: every series selector in every expr must start with it."""
    text = RULES.read_text()
    exprs = []
    while "expr: |" in text:
        exprs.append(block_after(text, "expr: |"))
        text = text.split("expr: |", 1)[1]
    assert len(exprs) == 2
    for expr in exprs:
        names = re.findall(r"\basyndgan_[a-z_]+\b", expr)
        selectors = re.findall(r"\basyndgan_[a-z_]+(\{[^}]*\})", expr)
        assert names and len(selectors) == len(names), expr
        assert all(sel.startswith("{" + SCOPE) for sel in selectors), expr


@pytest.mark.parametrize("script", ["helm_lint.sh", "docker_smoke.sh", "install_tools.sh"])
def test_deploy_scripts_parse(script: str) -> None:
    path = ROOT / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
