"""Orchestration scaling: generator step time over N emulated sites (real Orchestrator + GeneratorTrainer, real
gRPC on loopback), against the generator's own compute for the same batch without the network."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from asyndgan.algorithm import Dropped, TrainConfig
from asyndgan.experiments.datasets import label_pool
from asyndgan.experiments.emulated import emulated_sites
from asyndgan.generator import GeneratorTrainer
from asyndgan.messages import LossTerm, StepAnswer
from asyndgan.nets import NetConfig
from asyndgan.services.generator.orchestrator import Orchestrator, OrchestratorConfig, SiteLink

__all__ = ["ZeroExchange", "bench_scaling"]


class ZeroExchange:
    """Every site answers at once with a zero gradient (the generator's compute without any site)."""

    def __init__(self) -> None:
        self.sent: dict[int, torch.Tensor] = {}

    def send(self, j: int, fakes: torch.Tensor) -> None:
        self.sent[j] = fakes

    def answer(self, j: int) -> StepAnswer | Dropped:
        none = torch.empty((0, 0, 0), dtype=torch.uint8)
        return StepAnswer(0, torch.zeros_like(self.sent.pop(j)), [LossTerm("G", "", "total", 0.0)], 0, none)


def _orchestrated(orch: Orchestrator, gen: GeneratorTrainer, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` generator steps over the network, after ``warmup`` steps."""
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        outcome = orch.step(gen)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if not all(outcome.answered):
            raise RuntimeError(f"an emulated site missed step {i} with N={len(orch.links)}")
    return times


def _compute(gen: GeneratorTrainer, labels: list[torch.Tensor], pool_size: int, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` generator steps on the same batch with no network, after ``warmup`` steps."""
    compute = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        gen.step(labels, [pool_size] * len(labels), ZeroExchange())
        if i >= warmup:
            compute.append(time.perf_counter() - t)
    return compute


def _measure(
    n: int, per_site: int, pool: np.ndarray, net: NetConfig, delay: float, size: int, steps: int, warmup: int
) -> tuple[list[float], list[float]]:
    """(step seconds over ``n`` emulated sites, the generator's compute seconds for the same batch)."""
    with contextlib.ExitStack() as stack:
        addresses = stack.enter_context(emulated_sites(n, size, per_site, delay))
        links = [SiteLink.dial(f"site-{j}", addr) for j, addr in enumerate(addresses)]
        orch = Orchestrator(links, OrchestratorConfig(step_deadline_s=max(30.0, 100 * delay)))
        stack.callback(orch.close)
        geometry = orch.wait_for_quorum(timeout=60)
        assert geometry is not None
        _h, _w, k, mods = geometry
        gen = GeneratorTrainer(net, TrainConfig(), num_classes=k, modalities=mods, seed=0, image_size=size)
        times = _orchestrated(orch, gen, warmup, steps)
        labels = [torch.from_numpy(pool[:per_site]) for _ in range(n)]
        return times, _compute(gen, labels, len(pool), warmup, steps)


def bench_scaling(
    ns: Sequence[int],
    delay: float,
    steps: int,
    size: int,
    batch: int,
    ngf: int,
    total_batch: int | None = None,
    warmup: int = 3,
) -> list[dict[str, Any]]:
    """Generator step time over N emulated sites (real Orchestrator + GeneratorTrainer, real gRPC on loopback).

    ``batch`` per site, or with ``total_batch`` that many images split over the N sites (G's compute stays the
    same, so only the orchestration varies with N). Per N: median seconds per step, the generator's own compute
    for the same batch without the network (median of the same number of steps), overhead = step - delay -
    compute."""
    pool, _ = label_pool(size)
    net = NetConfig(ngf=ngf)  # "auto": unet_<size>
    rows: list[dict[str, Any]] = []
    for n in ns:
        per_site = batch if total_batch is None else total_batch // n
        if per_site < 1:
            raise ValueError(f"total batch {total_batch} is smaller than {n} sites")
        times, compute = _measure(n, per_site, pool, net, delay, size, steps, warmup)
        step_s, compute_s = statistics.median(times), statistics.median(compute)
        rows.append(
            {
                "sites": n,
                "batch_per_site": per_site,
                "delay_s": delay,
                "seconds_per_step": step_s,
                "p90_seconds": sorted(times)[int(0.9 * (len(times) - 1))],
                "generator_compute_s": compute_s,
                "overhead_s": step_s - delay - compute_s,
            }
        )
    for r in rows:
        r["ratio_to_n1"] = r["seconds_per_step"] / rows[0]["seconds_per_step"]
    return rows
