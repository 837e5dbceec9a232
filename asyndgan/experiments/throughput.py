"""Step time: the in-process trainer in this process, and the in-process trainer vs the distributed demo (N site
processes + a generator on loopback), each in fresh processes under a thread plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyndgan.algorithm import TrainConfig
from asyndgan.demo import set_omp_wait_policy
from asyndgan.experiments.datasets import embedded_sites
from asyndgan.local import LocalRun, train_local
from asyndgan.nets import NetConfig

__all__ = ["ThreadPlan", "bench_distributed", "bench_in_process_subprocess", "bench_local_step", "best_runs"]


def bench_local_step(size: int, batch: int, sites: int, steps: int, threads: int) -> dict[str, Any]:
    """Seconds per in-process AsynDGAN step (all sites' D steps + one G step), after warm-up."""
    torch.set_num_threads(threads)
    data = embedded_sites(size, sites)
    result = train_local(data, None, NetConfig(), TrainConfig(), LocalRun(iterations=steps, batch_size=batch), None)
    return {
        "size": size,
        "batch": batch,
        "sites": sites,
        "threads": threads,
        "steps": steps,
        "seconds_per_step": result.summary["seconds_per_step_steady"],
    }


@dataclass(frozen=True)
class ThreadPlan:
    """Threads per process for one distributed run: generator, each site, and the OpenMP wait policy."""

    generator: int
    site: int
    passive: bool = False

    @classmethod
    def parse(cls, text: str, cores: int) -> ThreadPlan:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "passive"):
            raise ValueError(f"thread plan {text!r}: expected GEN:SITE or GEN:SITE:passive (GEN 0 = all cores)")
        return cls(int(parts[0]) or cores, int(parts[1]) or cores, len(parts) == 3)

    def __str__(self) -> str:
        return f"{self.generator}:{self.site}{':passive' if self.passive else ''}"


def _env(passive: bool) -> dict[str, str]:
    env = dict(os.environ)
    set_omp_wait_policy(env, "PASSIVE" if passive else "default")
    return env


def _run_summary(args: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "asyndgan.cli", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, timeout=3600, env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}): {' | '.join(tail)}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def bench_in_process_subprocess(
    size: int, batch: int, sites: int, steps: int, threads: int, passive: bool
) -> dict[str, Any]:
    """``asyndgan train-local`` in a fresh process (same start-up and environment as the distributed run)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["train-local", "--sites", str(sites), "--iterations", str(steps), "--size", str(size)]
        args += ["--batch-size", str(batch), "--threads", str(threads)]
        s = _run_summary(args, Path(tmp), _env(passive))
    return {
        "mode": "in-process",
        "threads": f"{threads}{' passive' if passive else ''}",
        "seconds_per_step": s["seconds_per_step_steady"],
    }


def bench_distributed(size: int, batch: int, sites: int, steps: int, plan: ThreadPlan) -> dict[str, Any]:
    """The demo's processes (N sites + generator) on loopback; steady seconds per step and bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["demo", "--sites", str(sites), "--iterations", str(steps), "--size", str(size)]
        args += ["--batch-size", str(batch), "--generator-threads", str(plan.generator)]
        args += ["--site-threads", str(plan.site)]
        # The same algorithm and data as train-local: the paper's exchange on the template sites (the privacy
        # guard's cost is measured by `make eval-privacy`).
        args += ["--privacy", "none", "--subjects", "0"]
        # The demo sets OMP_WAIT_POLICY for its processes itself; "default" leaves OpenMP's own default.
        args += ["--omp-wait-policy", "PASSIVE" if plan.passive else "default"]
        s = _run_summary(args, Path(tmp), _env(plan.passive))
    wire = s["wire_bytes_sent"] + s["wire_bytes_received"]
    return {
        "mode": "distributed",
        "threads": f"G {plan.generator} + {sites} x site {plan.site}{' passive' if plan.passive else ''}",
        "plan": str(plan),
        "size": size,
        "batch": batch,
        "sites": sites,
        "steps": steps,
        "generator_threads": plan.generator,
        "site_threads": plan.site,
        "omp_wait_policy": "PASSIVE" if plan.passive else "default",
        "seconds_per_step": s["seconds_per_step_steady"],
        "wire_bytes_per_step": wire / s["iterations"],
        "raw_f32_bytes_per_step": s["payload_bytes"] / s["iterations"],
        "wire_to_raw": wire / s["payload_bytes"],
    }


def best_runs(variants: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant: its fastest run, with every run's seconds per step in ``runs_s_per_step``."""
    out = []
    for runs in variants:
        best = dict(min(runs, key=lambda r: r["seconds_per_step"]))
        best["runs_s_per_step"] = [r["seconds_per_step"] for r in runs]
        out.append(best)
    return out
