"""``make bench``: measured numbers for the codec, the training step, bytes on the wire, the distributed overhead,
the orchestration's scaling with the number of sites, and Synthesize throughput.

Every figure printed here is measured on this machine when the command runs; nothing is hard-coded.
Sizes are flags, so a quick run (``--quick``) and the full run share one code path. The printed tables are
also written to ``--out`` (JSON), to the same path with ``.md`` (Markdown) and a bar chart ``bytes.png``
beside it. ``python -m asyndgan.experiments.bench --help`` lists the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from asyndgan.demo import is_omp_wait_policy
from asyndgan.experiments.bench_sections import SECTIONS, BenchRun
from asyndgan.experiments.timing import clock, cores
from asyndgan.io import write_bytes_atomic, write_json_atomic
from asyndgan.report import Progress

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

PROG = "python -m asyndgan.experiments.bench"
# Seconds each section took in the reference full run (results/bench.json): the weights of the progress line's ETA.
SECTION_WEIGHTS = {
    **{"codec": 2, "step": 67, "bytes": 28, "distributed": 510, "scaling": 78, "synthesize": 190},
    "link": 1022,
}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--out", default="results/bench.json", help="JSON results; .md and bytes.png go beside it")
    p.add_argument("--quick", action="store_true", help="small sizes and few steps, for a smoke run (< 2 min)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--steps", type=_positive, default=40, help="steps of the in-process and distributed runs (3 warm-up)"
    )
    p.add_argument("--sites", type=_positive, default=3)
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--step-sizes", default="64,128", help="image sizes of the in-process step section")
    p.add_argument("--bytes-sizes", default="64,128", help="image sizes of the bytes section")
    p.add_argument("--bytes-steps", type=_positive, default=5, help="training steps whose messages are measured")
    p.add_argument("--dist-size", type=_positive, default=64, help="image size of the distributed run")
    p.add_argument(
        "--dist-repeat",
        type=_positive,
        default=4,
        help="interleaved rounds of in-process and distributed runs (best of)",
    )
    p.add_argument(
        "--thread-plans",
        default="0:1,0:1:passive",
        help="distributed thread plans GEN:SITE[:passive] (0 = all cores; passive = OMP_WAIT_POLICY=PASSIVE)",
    )
    p.add_argument("--scaling-sites", default="1,2,4,8,16")
    p.add_argument("--scaling-delay", type=float, default=0.2, help="emulated site compute per step (s)")
    p.add_argument("--scaling-steps", type=_positive, default=20)
    p.add_argument("--scaling-size", type=_positive, default=32)
    p.add_argument(
        "--scaling-batch", type=_positive, default=2, help="batch per emulated site (fixed-per-site variant)"
    )
    p.add_argument(
        "--scaling-total-batch",
        type=_positive,
        default=16,
        help="images per step split over the N sites (target variant)",
    )
    p.add_argument("--scaling-ngf", type=_positive, default=8)
    p.add_argument(
        "--scaling-threads", type=int, default=1, help="torch threads of the generator (tiny G: 1 is fastest)"
    )
    p.add_argument("--synth-size", type=_positive, default=64)
    p.add_argument("--synth-batch", type=_positive, default=16)
    p.add_argument("--synth-requests", type=_positive, default=16)
    p.add_argument(
        "--synth-repeat", type=_positive, default=7, help="Synthesize rounds, each stream between forward passes"
    )
    p.add_argument("--synth-codecs", default="f32,bf16+zstd", help="image codecs the Synthesize client asks for")
    p.add_argument(
        "--synth-omp",
        default="PASSIVE,default",
        help="OpenMP wait policies to run Synthesize under, each in a fresh process; the first (the service "
        "image's) is judged",
    )
    p.add_argument("--link-sizes", default="64,128", help="image sizes of the emulated-link section")
    p.add_argument("--link-rtts", default="0,20,100", help="round-trip times (ms) of the emulated links")
    p.add_argument("--link-pipeline-rtts", default="0,100", help="RTTs (ms) run again with the generator's --pipeline")
    p.add_argument("--link-stale-rtts", default="0,100", help="RTTs (ms) run again with the generator's --stale")
    p.add_argument("--link-bandwidth", type=float, default=100.0, help="Mbit/s per site and direction")
    p.add_argument("--link-steps", type=int, default=0, help="steps per link run (0: 30 at 64 px, 20 above)")
    p.add_argument("--link-repeat", type=_positive, default=2, help="interleaved rounds per link variant (best of)")
    return p


def _apply_quick(a: argparse.Namespace) -> None:
    a.steps, a.bytes_steps, a.scaling_steps, a.synth_requests, a.synth_repeat = 5, 3, 5, 4, 1
    a.step_sizes = a.bytes_sizes = "32"
    a.dist_size, a.synth_size = 32, 32
    a.link_sizes, a.link_rtts, a.link_steps, a.link_pipeline_rtts = "32", "0,50", 6, "50"
    a.link_stale_rtts = "50"
    a.scaling_sites, a.thread_plans, a.dist_repeat, a.link_repeat = "1,4,16", "0:1", 1, 1


def _machine(n_cores: int) -> dict[str, Any]:
    return {
        "cpus": n_cores,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def _finish(run: BenchRun, t_start: float) -> None:
    """Targets and run-time tables, then ``--out`` (JSON) and the Markdown beside it."""
    results, out = run.results, run.out
    results["targets"] = run.targets
    results["sections"] = run.timing
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    if run.targets:
        run.report.section("Targets", run.targets, ["target", "value", "goal", "status"])
    run.report.section(
        "Run time per section",
        run.timing,
        ["section", "seconds", "other_processes_cpu_share"],
        [
            "other_processes_cpu_share: CPU time used by processes other than this benchmark and its children, "
            "as a share of all cores over the section (0 = the machine was otherwise idle)."
        ],
    )
    m = results["machine"]
    header = [
        "# asyndgan benchmark",
        "",
        f"`{results['command']}` on {m['cpus']} CPUs ({m['platform']}), Python {m['python']}, torch {m['torch']}; "
        f"{results['seconds']} s; load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end; OMP_WAIT_POLICY of this process: {m['omp_wait_policy']}. "
        f"Every number is measured by the command; see `{out.name}` and the run time table at the end.",
        "",
    ]
    write_json_atomic(out, results)
    write_bytes_atomic(out.with_suffix(".md"), "\n".join(header + run.report.md).encode())
    log.info("wrote %s and %s in %.0f s", out, out.with_suffix(".md"), results["seconds"])


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("asyndgan.services").setLevel(logging.WARNING)  # per-site connect lines of the runs
    if a.quick:
        _apply_quick(a)
    sections = set(a.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    policies = [v for v in a.synth_omp.split(",") if v]
    if not policies or not all(is_omp_wait_policy(v) for v in policies):
        p.error(f"--synth-omp takes PASSIVE, ACTIVE or default, comma-separated; got {a.synth_omp!r}")
    n_cores = cores()
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": _machine(n_cores),
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
    }
    run = BenchRun(a, n_cores, Path(a.out), results)
    _run_sections(run, [name for name in SECTIONS if name in sections])
    _finish(run, t_start)
    return 0


def _run_sections(run: BenchRun, chosen: list[str]) -> None:
    """The chosen sections in order, with a progress line (share of the work done, ETA) as each starts and ends."""
    weights = [SECTION_WEIGHTS.get(name, 10) for name in chosen]
    progress = Progress(sum(weights), what="bench", unit="units", bar=False)
    for i, name in enumerate(chosen):
        progress.update(sum(weights[:i]), phase=f"section {i + 1}/{len(chosen)}: {name}")
        with clock(run.timing, name):
            SECTIONS[name](run)
    progress.update(progress.total, phase=f"{len(chosen)} sections done")


if __name__ == "__main__":
    sys.exit(main())
