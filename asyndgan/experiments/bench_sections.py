"""The benchmark's sections: each runs its measurement with the command's flags, stores its results, prints
its table (:class:`~asyndgan.experiments.tables.Report`) and adds its targets."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asyndgan.experiments.bytes_bench import bench_bytes
from asyndgan.experiments.codec_bench import bench_codecs
from asyndgan.experiments.figures import bytes_png
from asyndgan.experiments.link_bench import bench_link
from asyndgan.experiments.scaling import bench_scaling
from asyndgan.experiments.synthesize_bench import bench_synthesize_with_policy
from asyndgan.experiments.tables import Report, target
from asyndgan.experiments.throughput import (
    ThreadPlan,
    bench_distributed,
    bench_in_process_subprocess,
    bench_local_step,
    best_runs,
)

__all__ = ["SECTIONS", "BenchRun", "ints"]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


@dataclass
class BenchRun:
    """One ``bench`` command: its flags, the cores it may use, and what the sections have produced so far."""

    args: argparse.Namespace
    cores: int
    out: Path
    results: dict[str, Any]
    report: Report = field(default_factory=Report)
    targets: list[dict[str, Any]] = field(default_factory=list)
    timing: list[dict[str, Any]] = field(default_factory=list)


def codec_section(run: BenchRun) -> None:
    a = run.args
    torch.set_num_threads(1)
    size = 32 if a.quick else 64
    rows = bench_codecs(size, a.batch_size, 3 if a.quick else 20)
    run.results["codec"] = rows
    run.report.section(
        f"Codec (batch {a.batch_size}, {size} px; GB/s of raw float32/uint8 bytes; 1 thread)",
        rows,
        ["tensor", "codec", "ratio", "encode_GBps", "decode_GBps", "rel_l2_error"],
    )


def step_section(run: BenchRun) -> None:
    a = run.args
    rows = [bench_local_step(s, a.batch_size, a.sites, a.steps, run.cores) for s in ints(a.step_sizes)]
    run.results["local_step"] = rows
    run.report.section(
        f"In-process step ({a.sites} sites, batch {a.batch_size}, default nets)",
        rows,
        ["size", "batch", "sites", "threads", "steps", "seconds_per_step"],
    )


# (fakes, gradients) codecs beside the defaults: 8-bit gradients, then 8-bit fakes too.
Q8_VARIANTS = (("", "q8+zstd"), ("q8+zstd", "q8+zstd"))


def bytes_section(run: BenchRun) -> None:
    a = run.args

    def measure(size: int, fakes: str = "", grads: str = "") -> dict[str, Any]:
        return bench_bytes(size, a.batch_size, a.sites, a.bytes_steps, run.cores, fakes, grads)

    sizes = ints(a.bytes_sizes)
    per_size = [measure(s) for s in sizes]
    q8 = [[measure(s, *v) for v in Q8_VARIANTS] for s in sizes]
    run.results["bytes"] = per_size
    run.results["bytes_q8"] = q8
    b0 = per_size[0]
    png = run.out.with_name("bytes.png")
    bytes_png(png, per_size)
    rows = [r for s, variants in zip(per_size, q8, strict=True) for r in s["rows"] + [v["rows"][1] for v in variants]]
    run.report.section(
        f"Bytes on the wire ({a.sites} sites, batch {a.batch_size}, all sites together)",
        rows,
        ["size", "scheme", "MB_per_step", "MB_per_epoch", "vs_raw"],
        [
            f"epoch = {b0['steps_per_epoch']} steps ({b0['epoch_definition']}); samples per site "
            f"{b0['samples_per_site']}.",
            *(
                f"{s['size']} px: G {s['generator']} {s['generator_params'] / 1e6:.2f} M params, "
                f"D {s['discriminator_params_per_site'] / 1e6:.2f} M params per site; FedAvg per step = "
                "per round / steps per epoch."
                for s in per_size
            ),
            f"Project bytes: serialized StepRequest + StepResponse of {b0['steps_measured']} real training steps "
            f"from initialisation (q8 gradients with the sites' error feedback); plot (default codecs): {png}.",
        ],
    )
    run.report.section(
        "Bytes per step by tensor",
        [r for s, variants in zip(per_size, q8, strict=True) for v in (s, *variants) for r in v["breakdown"]],
        ["size", "tensor", "codec", "raw_kB_per_step", "wire_kB_per_step", "ratio"],
    )
    for s, (grads_only, both) in zip(per_size, q8, strict=True):
        run.targets.append(target(f"wire / raw float32 per step ({s['size']} px)", s["wire_to_raw"], 0.4, False))
        if s["size"] == 64:
            run.targets.append(target("wire / raw, q8 gradients (64 px)", grads_only["wire_to_raw"], 0.15, False))
            run.targets.append(target("wire / raw, q8 fakes + gradients (64 px)", both["wire_to_raw"], 0.15, False))


def _distributed_runs(run: BenchRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(best in-process run per OpenMP policy, best distributed run per thread plan), interleaved rounds."""
    a = run.args
    plans = [ThreadPlan.parse(t, run.cores) for t in a.thread_plans.split(",") if t]
    policies = sorted({pl.passive for pl in plans})
    in_runs: list[list[dict[str, Any]]] = [[] for _ in policies]
    dist_runs: list[list[dict[str, Any]]] = [[] for _ in plans]
    for _ in range(a.dist_repeat):  # interleaved rounds, so a quiet or a busy spell hits every variant
        for runs, pv in zip(in_runs, policies, strict=True):
            runs.append(bench_in_process_subprocess(a.dist_size, a.batch_size, a.sites, a.steps, run.cores, pv))
        for runs, pl in zip(dist_runs, plans, strict=True):
            runs.append(bench_distributed(a.dist_size, a.batch_size, a.sites, a.steps, pl))
    return best_runs(in_runs), best_runs(dist_runs)


def _distributed_notes(cores: int, best: dict[str, Any]) -> list[str]:
    return [
        f"in-process: `asyndgan train-local --threads {cores}`; distributed: `asyndgan demo` "
        f"(each site and the generator its own process), both fresh processes, steady s/step.",
        f"best distributed plan {best['plan']}: throughput {best['throughput_vs_best_in_process']:.3f} "
        "x best in-process (target >= 0.95).",
        f"bytes on the wire per step (distributed run): {best['wire_bytes_per_step'] / 1e3:.1f} kB = "
        f"{best['wire_to_raw']:.3f} x raw float32 (target <= 0.4).",
        f"Threads on {cores} cores: GEN:SITE = torch threads of the generator and of each site. The "
        "generator's forward and backward run while every site waits, and the sites' D steps run "
        "together while the generator waits in the RPC, so the generator gets all cores and each site "
        "one thread (single-thread sites share the cores with no OpenMP barrier inside a process). "
        "passive = OMP_WAIT_POLICY=PASSIVE in every process (both modes): idle OpenMP threads sleep "
        "instead of spinning after a parallel region, so a waiting process leaves its cycles to a "
        "computing one.",
    ]


def distributed_section(run: BenchRun) -> None:
    a = run.args
    in_proc, dist = _distributed_runs(run)
    best_in = min(in_proc, key=lambda r: r["seconds_per_step"])
    for r in in_proc + dist:
        r["throughput_vs_best_in_process"] = best_in["seconds_per_step"] / r["seconds_per_step"]
    best = min(dist, key=lambda r: r["seconds_per_step"])
    run.results["distributed"] = {"in_process": in_proc, "distributed": dist, "best": best["plan"]}
    run.report.section(
        f"Distributed vs in-process ({a.dist_size} px, {a.sites} sites, batch {a.batch_size}, {run.cores} cores, "
        f"{a.steps} steps each, best of {a.dist_repeat} interleaved runs)",
        in_proc + dist,
        ["mode", "threads", "seconds_per_step", "runs_s_per_step", "throughput_vs_best_in_process"],
        _distributed_notes(run.cores, best),
    )
    value = best["throughput_vs_best_in_process"]
    run.targets.append(target("distributed / in-process throughput", value, 0.95, True))


def scaling_section(run: BenchRun) -> None:
    a = run.args
    torch.set_num_threads(a.scaling_threads or run.cores)
    common = (ints(a.scaling_sites), a.scaling_delay, a.scaling_steps, a.scaling_size, a.scaling_batch, a.scaling_ngf)
    rows = bench_scaling(*common, total_batch=a.scaling_total_batch)
    per_site_rows = bench_scaling(*common)
    run.results["scaling"] = {
        "delay_s": a.scaling_delay,
        "size": a.scaling_size,
        "total_batch": a.scaling_total_batch,
        "batch_per_site": a.scaling_batch,
        "generator": f"unet_{a.scaling_size} ngf {a.scaling_ngf}",
        "threads": torch.get_num_threads(),
        "rows": rows,
        "rows_fixed_batch_per_site": per_site_rows,
    }
    cols = ["sites", "batch_per_site", "seconds_per_step", "p90_seconds", "generator_compute_s", "overhead_s"]
    head = (
        f"{a.scaling_delay} s fixed site delay, {a.scaling_size} px, unet ngf {a.scaling_ngf}, median of "
        f"{a.scaling_steps} steps, {torch.get_num_threads()} torch thread(s) in the generator; all emulated "
        "sites in one other process"
    )
    run.report.section(
        f"Orchestration: generator step with N emulated sites, {a.scaling_total_batch} images per step "
        f"split over the sites ({head})",
        rows,
        [*cols, "ratio_to_n1"],
        [
            "G's batch is the same for every N, so the ratio measures the orchestration (fan-out, codecs, "
            "aggregation); overhead = step - site delay - generator compute (same batch, no network)."
        ],
    )
    run.report.section(
        f"Same, {a.scaling_batch} images per site (G's batch grows with N)",
        per_site_rows,
        [*cols, "ratio_to_n1"],
        ["Here the step also pays for G's larger forward and backward pass: not orchestration."],
    )
    last = rows[-1]
    name = f"step time N={last['sites']} / N={rows[0]['sites']} (same G batch)"
    run.targets.append(target(name, last["ratio_to_n1"], 1.1, False))  # issue 15: stays <= 1.1


_LINK_COLUMNS = [
    *("size", "link", "step", "rtt_ms", "seconds_per_step", "runs_s_per_step", "ratio_to_rtt0", "wire_bytes_per_step"),
    *("generator_own_s", "slowest_rpc_s", "site_handling_s", "in_flight_s"),
]


def link_section(run: BenchRun) -> None:
    a = run.args
    rtts = [float(v) for v in a.link_rtts.split(",") if v.strip()]
    piped = [float(v) for v in a.link_pipeline_rtts.split(",") if v.strip()]
    stale = [float(v) for v in a.link_stale_rtts.split(",") if v.strip()]
    per_size = [
        bench_link(
            s,
            rtts,
            a.link_bandwidth,
            a.sites,
            a.link_steps or None,
            repeat=a.link_repeat,
            pipeline_rtts_ms=piped,
            stale_rtts_ms=stale,
        )
        for s in ints(a.link_sizes)
    ]
    run.results["link"] = per_size
    s0 = per_size[0]
    run.report.section(
        f"Emulated links ({a.sites} sites, batch {s0['batch']}, {a.link_bandwidth:g} Mbit/s per site and direction, "
        f"dial-in through a loopback TCP proxy per site)",
        [{"size": s["size"], **r, **r["split_s"]} for s in per_size for r in s["rows"]],
        _LINK_COLUMNS,
        [
            f"`asyndgan.experiments.link_bench`: site processes and a generator process ({s0['threads']}), "
            "`--privacy none --subjects 0`, steady seconds per step, each row the fastest of "
            f"{a.link_repeat} interleaved rounds (`runs_s_per_step` in bench.json); each site's link adds the RTT "
            "(half each way) and serialises bytes at the bandwidth (`asyndgan.experiments.linkemu`). direct = no "
            "proxy.",
            "Split of a steady step (from the processes' Prometheus histograms): generator_own_s = G's forward, "
            "codecs, aggregation, backward and update; slowest_rpc_s = the slowest site's Step as the generator "
            "sees it; site_handling_s = that site's own handling; in_flight_s = the difference (network, gRPC).",
            "step: batched = the default (one forward and one backward pass for all sites); pipelined = "
            "`--pipeline` (per-site forward/send and backward on arrival; then generator_own_s = step - slowest RPC "
            "is no longer G's own time, part of it overlaps the RPCs); stale = `--stale` (the opt-in asynchronous "
            "variant: each batch's gradients applied one step late, G's backward overlapping the sites' work).",
        ],
    )
    for s in per_size:
        if s["size"] == 64:
            row = next(r for r in s["rows"] if r["rtt_ms"] == max(rtts) and r["step"] == "batched")
            name = f"step time at {max(rtts):g} ms RTT / RTT 0 (64 px)"
            run.targets.append(target(name, row["ratio_to_rtt0"], 1.25, False))


def synthesize_section(run: BenchRun) -> None:
    a = run.args
    synth_codecs = [c for c in a.synth_codecs.split(",") if c]
    policies = [p for p in a.synth_omp.split(",") if p]
    runs = [
        bench_synthesize_with_policy(
            p, run.cores, a.synth_size, a.synth_batch, a.synth_requests, a.synth_repeat, synth_codecs
        )
        for p in policies
    ]
    run.results["synthesize"] = runs
    res = runs[0]
    rows = [{"OMP_WAIT_POLICY": r["omp_wait_policy"], **row} for r in runs for row in r["rows"]]
    run.report.section(
        f"Synthesize ({res['size']} px, batch {res['batch']}, {res['requests']} requests, {res['generator']}, "
        f"{res['threads']} threads, {a.synth_repeat} rounds)",
        rows,
        ["OMP_WAIT_POLICY", "path", "images_per_s", "vs_forward", "vs_forward_min", "vs_forward_max"],
        [
            "real gRPC stream on loopback; the client in its own process (as a downstream job is) or in the "
            "generator service's process; images_per_s: the best round. vs_forward: per round, the G forward "
            "passes on a worker thread (as the service runs G) timed just before and after the path over the "
            "path's time; the median (and min, max) over rounds. The main-thread forward pass is a control: the "
            "same work, so its distance from 1 is the method's noise on this machine.",
            "OMP_WAIT_POLICY: the OpenMP wait policy of the processes (server, forward passes and clients alike, "
            "each policy a fresh process); the service image sets PASSIVE.",
        ],
    )
    # the first policy and the first codec, judged by the slower of its two clients
    first = [r["vs_forward"] for r in res["rows"] if r["path"].startswith(f"Synthesize stream ({synth_codecs[0]} ")]
    name = f"Synthesize / forward pass ({synth_codecs[0]}, slower client, OMP_WAIT_POLICY {policies[0]})"
    run.targets.append(target(name, min(first), 0.95, True))


# in the order they run
SECTIONS: dict[str, Callable[[BenchRun], None]] = {
    "codec": codec_section,
    "step": step_section,
    "bytes": bytes_section,
    "distributed": distributed_section,
    "scaling": scaling_section,
    "synthesize": synthesize_section,
    "link": link_section,
}
