"""Step time over emulated WAN links: the distributed run (N discriminator processes, dial-in, and a generator
process on 127.0.0.1) with each site reached through its own :class:`LinkEmulator` (added RTT, capped
bandwidth), at several RTTs, plus one row without a proxy.

Same algorithm and settings as ``bench_distributed`` (``--privacy none --subjects 0`` on the embedded template
sites, generator on all cores, one thread per site, idle OpenMP threads passive as in the demo). The site
processes are started once per image size and serve every row; each row starts a fresh generator. Every process
serves Prometheus metrics, which give the split of a steady step into the generator's own work, the slowest
site's Step RPC as the generator sees it, the site's handling of it, and the rest (network, gRPC, waiting).

``python -m asyndgan.experiments.link_bench --sizes 64 --rtts 0,20,100 --bandwidth 100 --out FILE.json``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from asyndgan.algorithm import site_seed
from asyndgan.demo import DemoConfig, site_data_spec
from asyndgan.experiments.linkemu import LinkEmulator
from asyndgan.io import write_json_atomic
from asyndgan.report import WARMUP_STEPS

__all__ = ["bench_link", "default_steps", "main"]

log = logging.getLogger(__name__)

GENERATOR_THREADS = 2
SITE_THREADS = 1
OMP_WAIT_POLICY = "PASSIVE"  # the demo's default
POLL_S = 1.0  # how often the metrics are read during a run

_Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def default_steps(size: int) -> int:
    """Steps per run: bounded run time (30 at 64 px, 20 above)."""
    return 30 if size <= 64 else 20


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyndgan.cli", *args]


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> int:
    """The port a process wrote to ``path``; raises if it exits or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text().strip()):
            return int(text)
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before writing {path}")
        time.sleep(0.1)
    raise TimeoutError(f"no {path} within {timeout:.0f} s")


def _scrape(port: int) -> _Samples:
    """Every sample of a /metrics endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: _Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(samples: _Samples, name: str, **labels: str) -> float:
    """The sum over the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, lb), v in samples.items() if n == name and set(labels.items()) <= set(lb))


def _mean(before: _Samples, after: _Samples, histogram: str, **labels: str) -> float:
    """Mean observation of a histogram between two scrapes."""
    count = _sum(after, f"{histogram}_count", **labels) - _sum(before, f"{histogram}_count", **labels)
    total = _sum(after, f"{histogram}_sum", **labels) - _sum(before, f"{histogram}_sum", **labels)
    return total / count if count else float("nan")


class _Sites:
    """N discriminator processes listening on 127.0.0.1, with their gRPC and metrics ports."""

    def __init__(self, cfg: DemoConfig, run_dir: Path, env: dict[str, str]) -> None:
        self.names = [f"hospital-{j}" for j in range(cfg.sites)]
        self.procs: list[subprocess.Popen[bytes]] = []
        files = []
        for j, name in enumerate(self.names):
            port_file, metrics_file = run_dir / f"{name}.port", run_dir / f"{name}.metrics"
            args = _cli(
                "discriminator", "--site-id", name, "--data", site_data_spec(cfg, j),
                "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                "--checkpoint-dir", str(run_dir / "checkpoints" / name), "--batch-size", str(cfg.batch_size),
                "--seed", str(site_seed(cfg.seed, j)), "--threads", str(cfg.site_threads), "--privacy", "none",
                "--metrics-port", "0", "--metrics-port-file", str(metrics_file),
            )  # fmt: skip
            with open(run_dir / f"{name}.log", "wb") as lf:
                self.procs.append(subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, env=env))
            files.append((port_file, metrics_file))
        try:
            self.ports = [_wait_file(pf, p) for (pf, _), p in zip(files, self.procs, strict=True)]
            self.metrics_ports = [_wait_file(mf, p) for (_, mf), p in zip(files, self.procs, strict=True)]
        except BaseException:
            self.stop()
            raise

    def scrape(self) -> list[_Samples]:
        return [_scrape(p) for p in self.metrics_ports]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class _Poller:
    """Reads the generator's and the sites' metrics every ``POLL_S`` during a run: the first scrape after the
    warm-up steps and the last one bracket the steady steps."""

    def __init__(self, sites: _Sites, port_file: Path, proc: subprocess.Popen[bytes]) -> None:
        self.sites, self.port_file, self.proc = sites, port_file, proc
        self.first: tuple[_Samples, list[_Samples]] | None = None
        self.last: tuple[_Samples, list[_Samples]] | None = None
        self._thread = threading.Thread(target=self._run, name="link-bench-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError):
            port = _wait_file(self.port_file, self.proc)
            while self.proc.poll() is None:
                try:
                    gen, sites = _scrape(port), self.sites.scrape()
                except OSError:  # the generator has just exited
                    return
                if _sum(gen, "asyndgan_iterations_total") >= WARMUP_STEPS:
                    self.first = self.first or (gen, sites)
                    self.last = (gen, sites)
                time.sleep(POLL_S)

    def split(self) -> dict[str, float]:
        """Mean seconds per steady step: whole step, the slowest site's Step RPC, the sites' handling of it."""
        self._thread.join(timeout=30)
        if self.first is None or self.last is None or self.first[0] is self.last[0]:
            return {}
        (g0, s0), (g1, s1) = self.first, self.last
        step = _mean(g0, g1, "asyndgan_step_duration_seconds")
        rpc = max(_mean(g0, g1, "asyndgan_rpc_duration_seconds", site=n, method="Step") for n in self.sites.names)
        handling = [
            _mean(a, b, "grpc_server_handling_seconds", grpc_method="Step") for a, b in zip(s0, s1, strict=True)
        ]
        site = max(handling)
        return {
            "step_s": step,
            "generator_own_s": step - rpc,  # forward, encode, decode, aggregation, backward, update
            "slowest_rpc_s": rpc,
            "site_handling_s": site,  # decode, D step, G's gradient, encode (slowest site's mean)
            "in_flight_s": rpc - site,  # network (emulated link), gRPC, and waiting for the site's threads
        }


Variant = tuple[float | None, str]  # (RTT in ms, None: no proxy; the generator's step: a key of STEP_FLAGS)
STEP_FLAGS = {"batched": [], "pipelined": ["--pipeline"], "stale": ["--stale"]}


def _generator(
    cfg: DemoConfig,
    run_dir: Path,
    env: dict[str, str],
    sites: _Sites,
    targets: Sequence[int],
    row: str,
    step: str,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One generator run against ``targets`` (ports standing for the sites); its summary and the time split."""
    out = run_dir / row
    metrics_file = out / "generator.metrics"
    out.mkdir(parents=True)
    flags = [a for n, p in zip(sites.names, targets, strict=True) for a in ("--site", f"{n}=127.0.0.1:{p}")]
    args = _cli(
        "generator", *flags, "--iterations", str(cfg.iterations), "--checkpoint-dir", str(out / "checkpoints"),
        "--out", str(out), "--listen", "127.0.0.1:0", "--seed", str(cfg.seed),
        "--threads", str(cfg.generator_threads), "--metrics-port", "0", "--metrics-port-file", str(metrics_file),
        *STEP_FLAGS[step],
    )  # fmt: skip
    with open(out / "generator.log", "wb") as lf:
        proc = subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, env=env)
    try:
        poller = _Poller(sites, metrics_file, proc)
        code = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        tail = (out / "generator.log").read_text(errors="replace").strip().splitlines()[-12:]
        raise RuntimeError(f"generator ({row}) exited with code {code}:\n" + "\n".join(tail))
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary, poller.split()


@contextlib.contextmanager
def _links(ports: Sequence[int], rtt_ms: float | None, bandwidth_mbit: float) -> Iterator[list[int]]:
    """One emulated link per site (None: no proxy); yields the ports the generator dials."""
    if rtt_ms is None:
        yield list(ports)
        return
    with contextlib.ExitStack() as stack:
        links = [
            stack.enter_context(LinkEmulator("127.0.0.1", p, rtt_s=rtt_ms / 1e3, bandwidth_bps=bandwidth_mbit * 1e6))
            for p in ports
        ]
        yield [lk.port for lk in links]


def _row(variant: Variant, bandwidth_mbit: float, summary: dict[str, Any], split: dict[str, float]) -> dict[str, Any]:
    rtt_ms, step = variant
    wire = summary["wire_bytes_sent"] + summary["wire_bytes_received"]
    return {
        "link": "direct" if rtt_ms is None else "emulated",
        "step": step,
        "rtt_ms": rtt_ms,
        "bandwidth_mbit": None if rtt_ms is None else bandwidth_mbit,
        "seconds_per_step": summary["seconds_per_step_steady"],
        "wire_bytes_per_step": wire / summary["iterations"],
        "split_s": {k: round(v, 4) for k, v in split.items()},
    }


def _attempt(
    cfg: DemoConfig, run_dir: Path, env: dict[str, str], procs: _Sites, variant: Variant, bw: float, name: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """One generator run over fresh links."""
    with _links(procs.ports, variant[0], bw) as ports:
        return _generator(cfg, run_dir, env, procs, ports, name, variant[1])


def _rounds(
    cfg: DemoConfig, run_dir: Path, env: dict[str, str], variants: Sequence[Variant], bandwidth: float, repeat: int
) -> list[list[dict[str, Any]]]:
    """Per variant its runs, in ``repeat`` interleaved rounds against the same site processes."""
    runs: list[list[dict[str, Any]]] = [[] for _ in variants]
    procs = _Sites(cfg, run_dir, env)
    try:
        for k in range(repeat):
            for (rtt, step), done in zip(variants, runs, strict=True):
                name = f"{'direct' if rtt is None else f'rtt{rtt:g}'}{'' if step == 'batched' else f'-{step}'}-{k}"
                load = os.getloadavg()[0]
                summary, split = _attempt(cfg, run_dir, env, procs, (rtt, step), bandwidth, name)
                row = _row((rtt, step), bandwidth, summary, split)
                done.append({**row, "load_1m": [load, os.getloadavg()[0]]})
                log.info("%d px, %s: %.3f s/step %s", cfg.size, name, done[-1]["seconds_per_step"], split)
    finally:
        procs.stop()
    return runs


def bench_link(
    size: int,
    rtts_ms: Sequence[float],
    bandwidth_mbit: float,
    sites: int = 3,
    steps: int | None = None,
    batch: int = 8,
    repeat: int = 1,
    pipeline_rtts_ms: Sequence[float] = (),
    stale_rtts_ms: Sequence[float] = (),
) -> dict[str, Any]:
    """Steady seconds per generator step over emulated links at each RTT (``bandwidth_mbit`` per site and
    direction), plus a direct row, with the default (batched) step and, at ``pipeline_rtts_ms`` and
    ``stale_rtts_ms``, the pipelined and the stale one; ``ratio_to_rtt0`` is relative to the RTT-0 row of the
    same step through the proxy. With ``repeat`` > 1, interleaved rounds and each row's fastest run (all in
    ``runs_s_per_step``)."""
    steps = steps or default_steps(size)
    cfg = DemoConfig(
        sites=sites, iterations=steps, size=size, batch_size=batch, subjects=0, privacy="none",
        generator_threads=GENERATOR_THREADS, site_threads=SITE_THREADS,
    )  # fmt: skip
    cfg.validate()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY=OMP_WAIT_POLICY)
    with tempfile.TemporaryDirectory(prefix="link-bench-") as tmp:
        variants: list[Variant] = [(None, "batched"), *((r, "batched") for r in rtts_ms)]
        variants += [*((r, "pipelined") for r in pipeline_rtts_ms), *((r, "stale") for r in stale_rtts_ms)]
        runs = _rounds(cfg, Path(tmp), env, variants, bandwidth_mbit, max(repeat, 1))
    rows = []
    for r in runs:
        rows.append(dict(min(r, key=lambda x: x["seconds_per_step"])))
        rows[-1]["runs_s_per_step"] = [x["seconds_per_step"] for x in r]
    for row in rows:
        base = next((r["seconds_per_step"] for r in rows if r["rtt_ms"] == 0 and r["step"] == row["step"]), None)
        row["ratio_to_rtt0"] = round(row["seconds_per_step"] / base, 3) if base else None
    return {
        "size": size,
        "batch": batch,
        "sites": sites,
        "steps": steps,
        "repeat": repeat,
        "bandwidth_mbit": bandwidth_mbit,
        "threads": f"generator {GENERATOR_THREADS}, site {SITE_THREADS}, OMP_WAIT_POLICY={OMP_WAIT_POLICY}",
        "rows": rows,
    }


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="64", help="image sizes, comma-separated")
    p.add_argument("--rtts", default="0,20,100", help="added round-trip times in ms, comma-separated")
    p.add_argument("--pipeline-rtts", default="", help="RTTs (ms) to run again with the generator's --pipeline")
    p.add_argument("--stale-rtts", default="", help="RTTs (ms) to run again with the generator's --stale")
    p.add_argument("--bandwidth", type=float, default=100.0, help="Mbit/s per site link and direction")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="steps per run (0: 30 at 64 px, 20 above)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; each row keeps its fastest run")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = []
    for size in (int(s) for s in a.sizes.split(",") if s.strip()):
        t = time.perf_counter()
        rtts, piped, stale = _floats(a.rtts), _floats(a.pipeline_rtts), _floats(a.stale_rtts)
        results.append(
            bench_link(size, rtts, a.bandwidth, a.sites, a.steps or None, a.batch_size, a.repeat, piped, stale)
        )
        log.info("%d px done in %.0f s", size, time.perf_counter() - t)
        for r in results[-1]["rows"]:
            log.info("  %s", json.dumps(r))
    if a.out:
        write_json_atomic(a.out, {"link_bench": results})
        log.info("wrote %s", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
