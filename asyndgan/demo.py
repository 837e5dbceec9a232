"""``asyndgan demo``: N discriminator processes and one generator process on 127.0.0.1, then clean up."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyndgan.algorithm import site_seed
from asyndgan.io import write_json_atomic

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)

EMBEDDED = "embedded:icbm152"


OMP_WAIT_POLICIES = ("PASSIVE", "ACTIVE", "default")  # "default": OMP_WAIT_POLICY unset, OpenMP's own default


def is_omp_wait_policy(text: str) -> bool:
    return text.upper() in (p.upper() for p in OMP_WAIT_POLICIES)


def set_omp_wait_policy(env: MutableMapping[str, str], policy: str) -> None:
    """``OMP_WAIT_POLICY=policy`` in ``env`` (a process's environment); "default" removes it."""
    if policy.lower() == "default":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = policy


@dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    iterations: int = 300
    size: int = 64
    batch_size: int = 8
    out: Path = Path("runs/demo")
    seed: int = 0
    modalities: str = "t1"
    missing: str = ""  # "SITE:MODALITY": that site lacks that modality (multi-modality variant)
    generator_threads: int = 0
    site_threads: int = 1
    codec: str = ""
    grad_codec: str = ""
    extra_generator_args: tuple[str, ...] = ()
    extra_site_args: tuple[str, ...] = ()
    subjects: int = 400  # virtual subjects per site (embedded population; 0 = the template's 75 slices per site)
    privacy: str = "dp"  # the sites' guard: dp (budget planned for `iterations` steps) or none (the paper)
    metrics: bool = False  # every process serves /metrics on a free port: run/metrics/NAME.port, run/metrics.json
    tls: bool = False  # mutual TLS with a development CA made in run/certs
    # Idle OpenMP threads sleep instead of spinning, so a process waiting on the network leaves its cores to
    # the processes that compute (measured in `make bench`); "default" leaves the OpenMP runtime's default.
    omp_wait_policy: str = "PASSIVE"

    def validate(self) -> None:
        if not 1 <= self.sites <= 16:
            raise ValueError("--sites must be between 1 and 16")
        if not is_omp_wait_policy(self.omp_wait_policy):
            raise ValueError("--omp-wait-policy must be PASSIVE, ACTIVE or default")
        if self.privacy not in ("dp", "none") or self.subjects < 0:
            raise ValueError("--privacy must be dp or none and --subjects >= 0")
        if self.iterations < 1 or self.size < 16 or self.batch_size < 1:
            raise ValueError("--iterations >= 1, --size >= 16 and --batch-size >= 1 are required")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyndgan.cli", *args]


def _wait_port(path: Path, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text())
        if proc.poll() is not None:
            tail = log_file.read_text().strip().splitlines()[-1:] if log_file.exists() else []
            raise RuntimeError(f"{log_file.stem} exited with code {proc.returncode}: {' '.join(tail)}")
        time.sleep(0.1)
    raise TimeoutError(f"{log_file.stem} did not start within {timeout:.0f} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _metrics_args(cfg: DemoConfig, run_dir: Path, name: str) -> list[str]:
    if not cfg.metrics:
        return []
    return ["--metrics-port", "0", "--metrics-port-file", str(run_dir / "metrics" / f"{name}.port")]


def _write_metrics_targets(run_dir: Path, names: list[str]) -> None:
    """run/metrics.json (name -> /metrics URL) and run/prometheus.yml, a scrape config for these processes."""
    ports = {n: int((run_dir / "metrics" / f"{n}.port").read_text()) for n in names}
    urls = {n: f"http://127.0.0.1:{p}/metrics" for n, p in ports.items()}
    write_json_atomic(run_dir / "metrics.json", urls)
    jobs = {"asyndgan-generator": ["generator"], "asyndgan-discriminator": [n for n in names if n != "generator"]}
    lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 1s", "scrape_configs:"]
    for job, members in jobs.items():
        lines += [f"  - job_name: {job}", "    static_configs:"]
        for n in members:
            lines += [f"      - targets: ['127.0.0.1:{ports[n]}']", f"        labels: {{name: {n}}}"]
    (run_dir / "prometheus.yml").write_text("\n".join(lines) + "\n")
    log.info("metrics endpoints: %s", ", ".join(f"{n}={u}" for n, u in urls.items()))


def _tls_args(cfg: DemoConfig, run_dir: Path, name: str) -> list[str]:
    if not cfg.tls:
        return []
    d = run_dir / "certs"
    return ["--tls-cert", str(d / f"{name}.pem"), "--tls-key", str(d / f"{name}.key"), "--tls-ca", str(d / "ca.pem")]


def _make_certs(run_dir: Path, names: list[str]) -> None:
    from asyndgan.certs import init_ca, issue

    d = run_dir / "certs"
    if not (d / "ca.pem").exists():
        init_ca(d)
    for name in names:
        issue(d, name)
    log.info("mutual TLS: development CA and certificates for %s in %s", ", ".join(names), d)


def site_data_spec(cfg: DemoConfig, j: int) -> str:
    mods = cfg.modalities
    site_name = f"hospital-{j}"
    if cfg.missing:
        name, _, lacking = cfg.missing.partition(":")
        if name == site_name:
            mods = ",".join(m for m in mods.split(",") if m != lacking)
    population = f"&subjects={cfg.subjects}" if cfg.subjects else ""
    return f"{EMBEDDED}?site={j}&of={cfg.sites}&size={cfg.size}&modalities={mods}{population}"


def heldout_spec(cfg: DemoConfig) -> str:
    population = f"&subjects={max(cfg.subjects // 4, 1)}" if cfg.subjects else ""
    return f"{EMBEDDED}?split=heldout&of={cfg.sites}&size={cfg.size}&modalities={cfg.modalities}{population}"


def _privacy_args(cfg: DemoConfig) -> list[str]:
    if cfg.privacy == "none":
        return ["--privacy", "none"]
    return ["--privacy", "dp", "--privacy-steps", str(cfg.iterations)]


def _prepare(cfg: DemoConfig) -> tuple[Path, dict[str, str]]:
    """A fresh run directory (ports, logs, checkpoints, metrics; certificates with TLS) and the processes' env."""
    run_dir = cfg.out / "run"
    for sub in ("ports", "logs", "checkpoints", "metrics"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for f in [*(run_dir / "ports").glob("*"), *(run_dir / "metrics").glob("*")]:
        f.unlink()
    shutil.rmtree(run_dir / "checkpoints")  # a demo starts fresh; `generator --resume` is for real runs
    if cfg.tls:
        _make_certs(run_dir, ["generator", *(f"hospital-{j}" for j in range(cfg.sites))])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    set_omp_wait_policy(env, cfg.omp_wait_policy)
    return run_dir, env


def _start_sites(
    cfg: DemoConfig, run_dir: Path, env: dict[str, str], procs: list[subprocess.Popen[bytes]]
) -> list[tuple[str, Path, Path]]:
    """One discriminator process per hospital (appended to ``procs``); (name, port file, log file) each."""
    sites = []
    for j in range(cfg.sites):
        name = f"hospital-{j}"
        log_file = run_dir / "logs" / f"{name}.log"
        port_file = run_dir / "ports" / name
        args = _cli(
            "discriminator",
            "--site-id", name,
            "--data", site_data_spec(cfg, j),
            "--listen", "127.0.0.1:0",
            "--port-file", str(port_file),
            "--checkpoint-dir", str(run_dir / "checkpoints" / name),
            "--batch-size", str(cfg.batch_size),
            "--seed", str(site_seed(cfg.seed, j)),
            "--threads", str(cfg.site_threads),
            *_privacy_args(cfg),
            *cfg.extra_site_args,
            *_metrics_args(cfg, run_dir, name),
            *_tls_args(cfg, run_dir, name),
            *(["--allow-client", "generator"] if cfg.tls else []),  # no other hospital's certificate
        )  # fmt: skip
        with open(log_file, "wb") as lf:
            procs.append(subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, env=env))
        sites.append((name, port_file, log_file))
    return sites


def _generator_args(cfg: DemoConfig, run_dir: Path, site_flags: list[str]) -> list[str]:
    return _cli(
        "generator",
        *site_flags,
        "--iterations", str(cfg.iterations),
        "--checkpoint-dir", str(run_dir / "checkpoints" / "generator"),
        "--out", str(cfg.out),
        "--listen", "127.0.0.1:0",
        "--heldout", heldout_spec(cfg),
        "--seed", str(cfg.seed),
        "--threads", str(cfg.generator_threads),
        *(["--codec", cfg.codec] if cfg.codec else []),
        *(["--grad-codec", cfg.grad_codec] if cfg.grad_codec else []),
        *cfg.extra_generator_args,
        *_metrics_args(cfg, run_dir, "generator"),
        *_tls_args(cfg, run_dir, "generator"),
    )  # fmt: skip


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Start the sites and the generator as processes, train, stop everything; returns summary.json."""
    cfg.validate()
    run_dir, env = _prepare(cfg)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sites = _start_sites(cfg, run_dir, env, procs)
        site_flags: list[str] = []
        for (name, port_file, log_file), proc in zip(sites, procs, strict=True):
            port = _wait_port(port_file, proc, log_file)
            site_flags += ["--site", f"{name}=127.0.0.1:{port}"]
        log.info("%d discriminator processes up; starting the generator", cfg.sites)
        gen = subprocess.Popen(_generator_args(cfg, run_dir, site_flags), env=env)
        procs.append(gen)
        if cfg.metrics:
            names = [name for name, _, _ in sites]
            _wait_port(run_dir / "metrics" / "generator.port", gen, run_dir / "logs" / "generator.log")
            _write_metrics_targets(run_dir, ["generator", *names])
        code = gen.wait()
        if code != 0:
            raise RuntimeError(f"generator exited with code {code}; site logs in {run_dir / 'logs'}")
    finally:
        _stop(procs)
    summary: dict[str, Any] = json.loads((cfg.out / "summary.json").read_text())
    return summary
