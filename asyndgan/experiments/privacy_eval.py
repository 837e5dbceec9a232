"""Privacy evaluation (issue 11; ``make eval-privacy``, ``python -m asyndgan.experiments.privacy_eval``).

On the population setting (3 sites of virtual subjects, :mod:`.privacy_common`), for the paper's unguarded
exchange ("none") and the site-side guard at each epsilon (all planned for the same number of G steps):

1. utility: (c)/(a) Dice ratio (segmenter on G's images vs on pooled real, tested on held-out subjects) and G's
   L1/PSNR/SSIM on held-out subjects (:mod:`.privacy_tasks`);
2. passive reconstruction by an honest-but-curious generator, from what the same training run handed it about
   site 0 (:mod:`.privacy_passive`);
3. active reconstruction against a real discriminator process (:mod:`.privacy_active`);
4. membership inference on the trained G (ROC AUC);
5. the memorisation audit's nearest-is-own-source share, training vs non-member label maps;
6. G step time with and without the guard, interleaved, same thread budget.

Writes ``OUT/privacy.json`` and ``OUT/privacy.md`` (:mod:`.privacy_report`) and logs each target as MET or
MISSED. The work runs as tasks on ``--jobs`` worker processes (one torch thread each by default); the log shows
each phase's progress with elapsed time and an ETA.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyndgan.data import DataError
from asyndgan.experiments.privacy_active import active_task
from asyndgan.experiments.privacy_common import (
    PrivacyOptions,
    active_spec,
    finite,
    heldout_specs,
    mode_key,
    nonmember_specs,
    quick_options,
    site_specs,
)
from asyndgan.experiments.privacy_report import judge, markdown_report, summary_lines
from asyndgan.experiments.privacy_tasks import mode_task, real_segmenter_task, step_bench
from asyndgan.experiments.segmentation import condition_entry, make_pool, ratio
from asyndgan.io import write_bytes_atomic, write_json_atomic

__all__ = ["main", "run_privacy_eval"]

log = logging.getLogger(__name__)

DESCRIPTION = "privacy evaluation: guard vs none, attacks, membership, memorisation, utility (docs/evaluation.md)"


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    weight: float  # estimated seconds, for the ETA


def _area(o: PrivacyOptions) -> float:
    return (o.size / 64) ** 2


def _mode_weight(o: PrivacyOptions, mode: str) -> float:
    """Seconds of one core for a mode task, from the medium run on this machine (64 px, one thread each, two
    workers): G step 0.58 s unguarded / 0.72 s guarded (3 sites, batch 8, ngf 32), memorisation ~1 s per query
    image (3 x memo_limit queries), segmenter 0.107 s per step, ~40 s of data, synthesis and scoring."""
    g = o.steps * (0.58 if mode == "none" else 0.72) + 40
    g *= _area(o) * (o.batch / 8) * (o.sites / 3) * (o.ngf / 32)
    return g + _area(o) * (3 * o.memo_limit * 1.0 + len(o.seeds) * o.seg.steps * 0.107)


def plan(o: PrivacyOptions) -> list[Task]:
    """The pool tasks, longest first (weights: estimated seconds of one core, for the ETA)."""
    tasks = [Task(f"mode {mode_key(m)}", mode_task, (o, m), _mode_weight(o, m)) for m in o.modes]
    tasks += [
        Task(f"active {mode_key(m)}", active_task, (o, m), 10 + (0.25 if m == "none" else 0.35) * o.active_steps)
        for m in o.modes
    ]
    tasks += [
        Task(f"segmenter (a) seed {seed}", real_segmenter_task, (o, seed), _area(o) * o.seg.steps * 0.107)
        for seed in o.seeds
    ]
    return tasks


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _bench_mode(o: PrivacyOptions) -> str | None:
    guarded = o.guarded_modes
    return None if not guarded else ("8" if "8" in guarded else guarded[0])


class _Eta:
    def __init__(self, total: float, count: int) -> None:
        self.total, self.count, self.done, self.n = total, count, 0.0, 0
        self.start = time.perf_counter()

    def finished(self, task: Task) -> None:
        self.done += task.weight
        self.n += 1
        el = time.perf_counter() - self.start
        eta = el / max(self.done, 1e-9) * (self.total - self.done)
        log.info("tasks: %d/%d done (%s), %.0f s elapsed, ETA %.0f s", self.n, self.count, task.name, el, eta)


def _run_one(t: Task, results: dict[str, Any], failed: dict[str, str], get: Callable[[], Any]) -> None:
    try:
        results[t.name] = get()
    except Exception as e:  # one failed task must not lose the others' hours of work
        log.error("task %s failed: %s: %s", t.name, type(e).__name__, e)
        failed[t.name] = f"{type(e).__name__}: {e}"


def run_tasks(
    tasks: Sequence[Task], pool: cf.Executor | None, workers: int = 1
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run every task (in the pool, or here one after the other): (results by task name, errors by task name)."""
    eta = _Eta(sum(t.weight for t in tasks), len(tasks))
    log.info(
        "%d tasks (%s): estimated %.0f s of one core, ~%.0f s on %d worker(s)",
        len(tasks),
        ", ".join(t.name for t in tasks),
        eta.total,
        eta.total / max(1, workers),
        workers,
    )
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    if pool is None:
        for t in tasks:
            _run_one(t, results, failed, functools.partial(t.fn, *t.args))
            eta.finished(t)
        return results, failed
    futures = {pool.submit(t.fn, *t.args): t for t in tasks}
    for f in cf.as_completed(futures):
        _run_one(futures[f], results, failed, f.result)
        eta.finished(futures[f])
    return results, failed


def _utility(o: PrivacyOptions, results: dict[str, Any], n_train: int) -> dict[str, Any]:
    a_seeds = [results[f"segmenter (a) seed {s}"] for s in o.seeds]
    a = condition_entry("pooled real data, all sites", n_train, a_seeds, o.seeds, None)
    return {"a": a}


def _mode_entry(o: PrivacyOptions, m: str, results: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    r = dict(results[f"mode {mode_key(m)}"])
    n_train = r["membership"]["members"]
    c = condition_entry(f"AsynDGAN synthetic images, mode {mode_key(m)}", n_train, r.pop("dice_c"), o.seeds, None)
    r["utility"] = {
        "c": c,
        "c_over_a": finite(ratio(c["mean"], a["mean"])),
        "c_over_a_per_seed": [
            finite(ratio(x["mean"], y["mean"])) for x, y in zip(c["per_seed"], a["per_seed"], strict=True)
        ],
    }
    r["active"] = results[f"active {mode_key(m)}"]
    return r


def _config(o: PrivacyOptions) -> dict[str, Any]:
    return dataclasses.asdict(o) | {
        "modes": list(o.modes),
        "seeds": list(o.seeds),
        "site_specs": site_specs(o),
        "heldout_specs": heldout_specs(o),
        "nonmember_specs": nonmember_specs(o),
        "active_spec": active_spec(o),
    }


def assemble(
    o: PrivacyOptions, results: dict[str, Any], bench: dict[str, Any] | None, argv: Sequence[str]
) -> dict[str, Any]:
    """The privacy.json report from the tasks' results; targets judged."""
    n_train = results[f"mode {mode_key(o.modes[0])}"]["membership"]["members"]
    utility = _utility(o, results, n_train)
    report: dict[str, Any] = {
        "version": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": list(argv),
        "quick": o.quick,
        "jobs": o.jobs,
        "threads": o.threads,
        "torch_version": torch.__version__,
        "config": _config(o),
        "utility": utility,
        "modes": {mode_key(m): _mode_entry(o, m, results, utility["a"]) for m in o.modes},
        "step_time": bench,
    }
    report["targets"] = judge(report)
    return report


def run_privacy_eval(o: PrivacyOptions, out: Path | None, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run the evaluation; write ``privacy.json`` and ``privacy.md`` under ``out``."""
    o.validate()
    start = time.perf_counter()
    pool = make_pool(o.jobs, o.threads)
    if pool is None:
        torch.set_num_threads(max(1, o.threads))
    try:
        results, failed = run_tasks(plan(o), pool, o.jobs if pool is not None else 1)
        if failed:
            if out is not None:  # keep what did finish
                write_json_atomic(out / "privacy-partial.json", {"results": results, "failed": failed})
            raise RuntimeError(f"{len(failed)} task(s) failed: {'; '.join(f'{k}: {v}' for k, v in failed.items())}")
        bench_mode, bench = _bench_mode(o), None
        if bench_mode is not None:  # alone on the machine: every other task has finished
            log.info("step-time benchmark: unguarded vs %s", mode_key(bench_mode))
            bench = pool.submit(step_bench, o, bench_mode).result() if pool is not None else step_bench(o, bench_mode)
    finally:
        if pool is not None:
            pool.shutdown()
    report = assemble(o, results, bench, argv)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if out is not None:
        write_json_atomic(out / "privacy.json", report)
        write_bytes_atomic(out / "privacy.md", markdown_report(report).encode())
        log.info("wrote %s and %s", out / "privacy.json", out / "privacy.md")
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asyndgan.experiments.privacy_eval", description=DESCRIPTION)
    p.add_argument("--out", default="results", help="directory for privacy.json and privacy.md")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (32 px, 4 steps, one seed)")
    p.add_argument("--modes", help="comma-separated: none and/or epsilons (default none,8,3,1; quick none,8)")
    p.add_argument("--steps", type=int, help="G steps of every mode (the guard's planned steps)")
    p.add_argument("--subjects", type=int, help="virtual subjects per site")
    p.add_argument("--size", type=int, help="slice size (px)")
    p.add_argument("--seeds", type=int, help="segmenter seeds 0..N-1")
    p.add_argument("--seg-steps", type=int, help="segmenter steps")
    p.add_argument("--active-steps", type=int, help="Steps of the active attack")
    p.add_argument("--memo-limit", type=int, help="images per memorisation-audit group")
    p.add_argument("--jobs", type=int, help="worker processes (1 = everything in this process)")
    p.add_argument("--threads", type=int, help="torch threads in all (split across --jobs workers)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from_args(a: argparse.Namespace) -> PrivacyOptions:
    o = quick_options() if a.quick else PrivacyOptions()
    over: dict[str, Any] = {
        k: v
        for k, v in {
            "steps": a.steps,
            "subjects": a.subjects,
            "size": a.size,
            "active_steps": a.active_steps,
            "memo_limit": a.memo_limit,
            "jobs": a.jobs,
            "threads": a.threads,
        }.items()
        if v is not None
    }
    if a.modes:
        over["modes"] = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if a.seeds is not None:
        over["seeds"] = tuple(range(a.seeds))
    if a.seg_steps is not None:
        over["seg"] = dataclasses.replace(o.seg, steps=a.seg_steps)
    o = dataclasses.replace(o, **over)
    o.validate()
    return o


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format=LOG_FORMAT,
        stream=sys.stderr,
        force=True,  # opacus configures the root logger when it is imported
    )
    try:
        o = options_from_args(a)
        report = run_privacy_eval(o, Path(a.out), ["python", "-m", "asyndgan.experiments.privacy_eval", *args])
    except (DataError, ValueError, OSError, RuntimeError) as e:
        print(f"privacy evaluation: error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(report):
        log.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
