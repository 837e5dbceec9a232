"""Hung-site benchmark with real processes: what one SIGSTOPped site costs the others.

``python -m asyndgan.experiments.faults [--mode dial-in|dial-out] --out results/faults.json``

1. Reference: a federation of h0 and h1 alone; its step rate.
2. The same two plus h2 (3 sites); after warm-up h2 gets SIGSTOP. Measured: seconds until its first missed
   deadline, and the step rate of the others from the second step after that miss (target: >= 0.9 x the
   reference rate). Then SIGCONT: steps until h2 contributes again (target: <= 2).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.io import write_json_atomic

__all__ = ["measure"]

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "asyndgan.cli"]


def _wait(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


class _Run:
    """A generator and N site processes in ``mode`` on loopback."""

    def __init__(self, tmp: Path, sites: int, mode: str, size: int, ngf: int, deadline: float) -> None:
        self.tmp, self.n, self.mode = tmp, sites, mode
        self.small = ["--ngf", str(ngf), "--ndf", str(ngf), "--threads", "1"]
        self.size, self.deadline = size, deadline
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = (self.tmp / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([*CLI, *args, *self.small], stdout=out, stderr=out)
        return self.procs[name]

    def _port(self, path: Path, name: str) -> int:
        _wait(lambda: path.exists() or self.procs[name].poll() is not None, 120, path.name, 0.1)
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited: {(self.tmp / f'{name}.log').read_text()[-1000:]}")
        return int(path.read_text())

    def _site_args(self, j: int) -> list[str]:
        return ["discriminator", "--site-id", f"h{j}", "--data", f"embedded:icbm152?site={j}&of=3&size={self.size}",
                "--batch-size", "4", "--checkpoint-dir", str(self.tmp / f"h{j}"), "--privacy", "none"]  # fmt: skip

    def start(self) -> GeneratorClient:
        sites = []
        for j in range(self.n):
            if self.mode == "dial-out":
                sites.append(f"h{j}")
                continue
            port_file = self.tmp / f"h{j}.port"
            self._spawn(f"h{j}", [*self._site_args(j), "--listen", "127.0.0.1:0", "--port-file", str(port_file)])
            sites.append(f"h{j}=127.0.0.1:{self._port(port_file, f'h{j}')}")
        gen_port = self.tmp / "gen.port"
        self._spawn("gen", ["generator", *[f for s in sites for f in ("--site", s)], "--iterations", "1000000",
                            "--checkpoint-dir", str(self.tmp / "g"), "--checkpoint-every", "25",
                            "--deadline", str(self.deadline), "--listen", "127.0.0.1:0",
                            "--port-file", str(gen_port)])  # fmt: skip
        port = self._port(gen_port, "gen")
        if self.mode == "dial-out":
            for j in range(self.n):
                self._spawn(f"h{j}", [*self._site_args(j), "--connect", f"127.0.0.1:{port}"])
        return GeneratorClient(f"127.0.0.1:{port}", timeout=30)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


@contextmanager
def _federation(tmp: Path, sites: int, **kw: Any) -> Iterator[tuple[_Run, GeneratorClient]]:
    run = _Run(tmp, sites, **kw)
    try:
        client = run.start()
        yield run, client
        client.close()
    finally:
        run.stop()


def _rate(client: GeneratorClient, steps: int) -> tuple[float, int]:
    """Steps per second over the next ``steps`` steps; and the step it ended at."""
    first = client.status().step
    t0 = time.monotonic()
    _wait(lambda: client.status().step >= first + steps, 600, f"{steps} steps")
    end = client.status().step
    return (end - first) / (time.monotonic() - t0), end


def _contributed(client: GeneratorClient, name: str) -> tuple[int, int]:
    s = next(s for s in client.status().sites if s.site_id == name)
    return s.steps_contributed, s.steps_dropped


def measure(mode: str, size: int, ngf: int, deadline: float, warmup: int, window: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="asyndgan-faults-") as d:
        tmp = Path(d)
        (tmp / "two").mkdir()
        (tmp / "three").mkdir()
        opts = {"mode": mode, "size": size, "ngf": ngf, "deadline": deadline}
        with _federation(tmp / "two", 2, **opts) as (_, client):
            _wait(lambda: client.status().step >= warmup, 600, "warm-up")
            two_sites, _ = _rate(client, window)
        log.info("reference: 2 sites, %.2f steps/s", two_sites)
        with _federation(tmp / "three", 3, **opts) as (run, client):
            _wait(lambda: client.status().step >= warmup, 600, "warm-up")
            three_sites, _ = _rate(client, window)
            run.procs["h2"].send_signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            _wait(lambda: _contributed(client, "h2")[1] >= 1, 2 * deadline + 30, "the first missed deadline")
            to_miss = time.monotonic() - t_stop
            missed_at = client.status().step
            _wait(lambda: client.status().step >= missed_at + 2, 60, "two steps")
            stopped, _ = _rate(client, window)
            before, _ = _contributed(client, "h2")
            cont_at = client.status().step
            run.procs["h2"].send_signal(signal.SIGCONT)
            _wait(lambda: _contributed(client, "h2")[0] > before, 120, "h2 back")
            back_after = client.status().step - cont_at
        log.info("3 sites %.2f steps/s; stopped: %.2f steps/s; back after %d steps", three_sites, stopped, back_after)
    return {
        "mode": mode,
        "size": size,
        "ngf": ngf,
        "deadline_s": deadline,
        "window_steps": window,
        "rate_two_sites": round(two_sites, 3),
        "rate_three_sites": round(three_sites, 3),
        "seconds_to_first_missed_deadline": round(to_miss, 2),
        "rate_with_one_stopped": round(stopped, 3),
        "stopped_over_two_sites": round(stopped / two_sites, 3),
        "steps_until_back_after_sigcont": back_after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", action="append", choices=["dial-in", "dial-out"], help="repeat; default both")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--deadline", type=float, default=60.0, help="--deadline of the generator (the maximum)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--window", type=int, default=40, help="steps per rate measurement")
    p.add_argument("--out", default="results/faults.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    rows = [measure(m, a.size, a.ngf, a.deadline, a.warmup, a.window) for m in a.mode or ["dial-in", "dial-out"]]
    write_json_atomic(Path(a.out), {"runs": rows})
    lines = [
        "| mode | steps/s, 2 sites | 3 sites | first miss after (s) | one of 3 stopped | stopped / 2 sites "
        "| back after SIGCONT (steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['rate_two_sites']} | {r['rate_three_sites']} | "
                     f"{r['seconds_to_first_missed_deadline']} | {r['rate_with_one_stopped']} | "
                     f"{r['stopped_over_two_sites']} | {r['steps_until_back_after_sigcont']} |")  # fmt: skip
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
