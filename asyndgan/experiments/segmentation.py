"""Segmentation utility: the training sets compared (conditions (a)-(e)), one segmenter per condition and seed
(optionally in a pool of worker processes), and Dice summaries per condition."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asyndgan.data import SiteData
from asyndgan.experiments import eval_progress
from asyndgan.experiments.datasets import pool_sites, synthetic_sites
from asyndgan.experiments.generators import GeneratorRun
from asyndgan.experiments.segmenter import SegConfig, evaluate_dice, train_segmenter

__all__ = [
    "SMALL_CLASS_SHARE",
    "Conditions",
    "SegTask",
    "class_shares",
    "condition_entry",
    "main_classes",
    "make_pool",
    "ratio",
    "run_segmenters",
    "seg_task",
    "small_classes",
    "training_conditions",
]

log = logging.getLogger(__name__)

# condition key -> (readable label, training set); keys "a", "b<j>", "c", "d", "e<j>", and "c@<step>" for the curve
Conditions = dict[str, tuple[str, SiteData]]


@dataclass(frozen=True)
class SegTask:
    setting: str
    condition: str
    seed: int
    train: SiteData
    heldout: SiteData
    cfg: SegConfig
    shifted: SiteData | None = None


def _init_worker(threads: int, log_level: int, progress: Any = None) -> None:
    """Worker process entry: its torch thread budget, log lines in the parent's format on stderr, and the queue
    that takes its progress reports (:mod:`.eval_progress`)."""
    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s", force=True)
    if progress is not None:
        eval_progress.init_worker(progress)


def make_pool(jobs: int, threads: int, progress: Any = None) -> cf.Executor | None:
    """``jobs`` spawned worker processes sharing ``threads`` torch threads, or None for ``jobs`` <= 1; they report
    progress to the queue ``progress`` (:attr:`.eval_progress.EvalProgress.queue`) when given."""
    if jobs <= 1:
        return None
    return cf.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(max(1, threads // jobs), logging.getLogger().getEffectiveLevel(), progress),
    )


SegResult = tuple[list[float], list[float] | None, dict[str, Any]]


def seg_task(task: SegTask) -> SegResult:
    """Train one segmenter; its Dice per class on the held-out set (and on the shifted set, if any) and how its
    training ended (:class:`SegFit` as a dict)."""
    t = time.perf_counter()
    channels = list(range(len(task.train.modalities)))
    model, fit = train_segmenter(task.train, channels, task.cfg, task.seed)
    dice = [float(d) for d in evaluate_dice(model, task.heldout, channels)]
    shifted = [float(d) for d in evaluate_dice(model, task.shifted, channels)] if task.shifted is not None else None
    log.info(
        "%s %s seed %d: Dice %s%s (%d steps, %s, %.1f s)",
        task.setting,
        task.condition,
        task.seed,
        " ".join(f"{d:.3f}" for d in dice),
        f"; shifted {np.mean(shifted):.3f}" if shifted is not None else "",
        fit.steps,
        "converged" if fit.converged else "NOT converged",
        time.perf_counter() - t,
    )
    eval_progress.advance(task.cfg.steps)
    return dice, shifted, dataclasses.asdict(fit)


def training_conditions(
    sites: list[SiteData],
    syn_async: list[SiteData],
    syn_central: list[SiteData],
    g_async: GeneratorRun,
    final: int,
    augment: str,
) -> Conditions:
    """(a) pooled real, (b) each site alone, (c) AsynDGAN synthetic ``syn_async``, (d) centralised synthetic
    ``syn_central``, (e) one site's real data + AsynDGAN synthetic for the others (every site, or the first with
    ``augment`` "first"), and (c) at every earlier snapshot of ``g_async`` (``final`` = its last step)."""
    n_sites = len(sites)
    conditions: Conditions = {"a": ("pooled real data, all sites", pool_sites(sites))}
    for j, s in enumerate(sites):
        conditions[f"b{j}"] = (f"real data of {s.name} only", s)
    conditions["c"] = ("AsynDGAN synthetic images, all sites' label maps", pool_sites(syn_async))
    conditions["d"] = ("centralised pix2pix synthetic images, all sites' label maps", pool_sites(syn_central))
    aug_sites = range(n_sites) if augment == "all" else range(1)
    if n_sites > 1:
        for j in aug_sites:
            mix = [sites[i] if i == j else syn_async[i] for i in range(n_sites)]
            conditions[f"e{j}"] = (
                f"real data of {sites[j].name} + AsynDGAN synthetic for the other sites",
                pool_sites(mix),
            )
    for step in g_async.steps:
        if step != final:
            syn = synthetic_sites(sites, g_async.synth_train[step], f"asyndgan{step}")
            conditions[f"c@{step}"] = (f"AsynDGAN synthetic after {step} G steps", pool_sites(syn))
    return conditions


def run_segmenters(
    setting: str,
    conditions: Conditions,
    seeds: Sequence[int],
    heldout: SiteData,
    cfg: SegConfig,
    shifted: SiteData | None,
    pool: cf.Executor | None,
) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]], dict[str, list[dict[str, Any]]]]:
    """One segmenter per condition and seed: per condition, Dice per class per seed on the held-out set and on
    the shifted set (snapshot conditions "c@k" are not scored on the shifted set), and each training's end."""
    tasks = [
        SegTask(setting, key, seed, train, heldout, cfg, None if "@" in key else shifted)
        for key, (_label, train) in conditions.items()
        for seed in seeds
    ]
    results = list(pool.map(seg_task, tasks)) if pool is not None else [seg_task(t) for t in tasks]
    by_key: dict[str, list[list[float]]] = {}
    shifted_by_key: dict[str, list[list[float]]] = {}
    fits: dict[str, list[dict[str, Any]]] = {}
    for task, (res, sh, fit) in zip(tasks, results, strict=True):
        by_key.setdefault(task.condition, []).append(res)
        fits.setdefault(task.condition, []).append(fit)
        if sh is not None:
            shifted_by_key.setdefault(task.condition, []).append(sh)
    return by_key, shifted_by_key, fits


SMALL_CLASS_SHARE = 0.02  # a foreground class under this share of the held-out foreground pixels is "small"


def class_shares(labels: np.ndarray, num_classes: int) -> list[float]:
    """Share of each foreground class (1..K-1) in the foreground pixels of ``labels``."""
    counts = np.bincount(labels.ravel(), minlength=num_classes)[1:num_classes].astype(np.float64)
    return list(map(float, counts / max(counts.sum(), 1.0)))


def main_classes(shares: Sequence[float]) -> list[int]:
    """Indices (into 1..K-1) of the classes that count in the mean Dice: all but the small ones (all if every
    class is small)."""
    main = [i for i, s in enumerate(shares) if s >= SMALL_CLASS_SHARE]
    return main or list(range(len(shares)))


def small_classes(num: int, main: Sequence[int]) -> list[int]:
    """Indices (into 1..K-1, ``num`` of them) of the classes that are not ``main``."""
    return [i for i in range(num) if i not in main]


def ratio(x: float, y: float) -> float:
    return float(x) / float(y) if y > 0 else 0.0


def condition_entry(
    label: str,
    n_train: int,
    per_seed: list[list[float]],
    seeds: Sequence[int],
    shifted: list[list[float]] | None,
    main: Sequence[int] | None = None,
    fits: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A condition's JSON entry: Dice per seed and class, mean and std over seeds (and on the shifted set).
    Means are over the ``main`` classes (indices into 1..K-1; None: all); the small classes are reported apart."""
    arr = np.asarray(per_seed, dtype=np.float64)  # (seeds, classes)
    main = range(arr.shape[1]) if main is None else main
    means = arr[:, list(main)].mean(1)
    small = small_classes(arr.shape[1], main)
    extra: dict[str, Any] = {"small_classes": {str(i + 1): float(arr[:, i].mean()) for i in small}}
    if fits:
        extra["training"] = {
            "converged": all(f["converged"] for f in fits),
            "per_seed": [{k: f[k] for k in ("steps", "converged", "stopped_early", "best_val")} for f in fits],
        }
    if shifted is not None:
        sm = np.asarray(shifted, dtype=np.float64)[:, list(main)].mean(1)
        extra["shifted"] = {
            "per_seed_mean": list(map(float, sm)),
            "mean": float(sm.mean()),
            "std": float(sm.std(ddof=1)) if len(sm) > 1 else 0.0,
        }
    return {
        "label": label,
        "train_images": n_train,
        "per_seed": [
            {"seed": s, "per_class": list(map(float, r)), "mean": float(m)}
            for s, r, m in zip(seeds, arr, means, strict=True)
        ],
        "mean": float(means.mean()),
        "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
        "per_class_mean": list(map(float, arr.mean(0))),
        "per_class_std": list(map(float, arr.std(0, ddof=1))) if len(arr) > 1 else [0.0] * arr.shape[1],
        **extra,
    }
