"""Evaluation of the paper's claim: does a segmenter trained on AsynDGAN's synthetic images do as well as one
trained on all hospitals' real images pooled, and better than one trained on any single hospital?

For each *setting* (a set of site data specs + a held-out set), :func:`evaluate_setting`

1. trains the AsynDGAN generator G against all sites (the in-process trainer's exact loop, which a test shows
   is bit-for-bit the distributed gRPC run with a lossless codec), snapshotting G at a few steps, and a
   centralised pix2pix (the same trainer with ONE site holding all sites' pooled real data) (:mod:`.generators`);
2. trains the same small U-Net segmenter (:mod:`.segmenter`), per seed, on
   (a) pooled real data, (b) each single site's real data, (c) AsynDGAN synthetic images for all sites' label
   maps, (d) centralised-pix2pix synthetic images for the same label maps, (e) one site's real data plus AsynDGAN
   synthetic images for the other sites' label maps; and scores Dice per foreground class on held-out REAL slices
   (:mod:`.segmentation`);
3. measures image similarity (L1, PSNR, SSIM) of G(held-out label) vs the held-out real image
   (:mod:`.image_metrics`);
4. plots (c)/(a) against G's training time (snapshots);
5. audits memorisation: distance from each synthetic image to its nearest real training image (L2, SSIM),
   against the same distance for real held-out images (:mod:`.memorisation`).

:func:`run_evaluation` writes ``OUT/eval.json``, ``OUT/eval.md`` (:mod:`.eval_report`) and ``OUT/eval.png``
(:mod:`.figures`) (``asyndgan eval`` or ``python -m asyndgan.experiments.evaluate``; ``docs/evaluation.md``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as _dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan.data import SiteData
from asyndgan.experiments.datasets import LoadedSetting, load_setting, synthetic_sites
from asyndgan.experiments.eval_progress import EvalProgress
from asyndgan.experiments.eval_report import markdown_report
from asyndgan.experiments.figures import figure_png
from asyndgan.experiments.generators import GeneratorRun, generator_task
from asyndgan.experiments.image_metrics import image_similarity
from asyndgan.experiments.memorisation import memorisation_audit
from asyndgan.experiments.segmentation import (
    SMALL_CLASS_SHARE,
    class_shares,
    condition_entry,
    main_classes,
    make_pool,
    ratio,
    run_segmenters,
    small_classes,
    training_conditions,
)
from asyndgan.experiments.segmenter import SegConfig
from asyndgan.experiments.settings import EvalOptions, Setting
from asyndgan.io import write_bytes_atomic, write_json_atomic

__all__ = ["evaluate_setting", "run_evaluation"]

log = logging.getLogger(__name__)


def _train_generators(
    setting: Setting, opts: EvalOptions, pool: cf.Executor | None, data: LoadedSetting, all_labels: np.ndarray
) -> tuple[GeneratorRun, GeneratorRun]:
    """The AsynDGAN and the centralised generator (in parallel when there are workers)."""
    g_threads = max(1, opts.threads // 2) if pool is not None else opts.threads
    args = (data.sites, data.heldout, setting, opts.gen_seed, g_threads, all_labels, data.heldout_sites)
    if pool is not None:
        futs = [pool.submit(generator_task, kind, *args) for kind in ("asyndgan", "centralised")]
        g_async, g_central = (f.result() for f in futs)
        return g_async, g_central
    return generator_task("asyndgan", *args), generator_task("centralised", *args)


def _targets(cond_json: dict[str, Any]) -> dict[str, Any]:
    """The claim's targets: (c) >= 0.98 x (a), (c) > every (b), and (e) >= (a) where there is an (e)."""
    a = np.asarray([r["mean"] for r in cond_json["a"]["per_seed"]])
    c = np.asarray([r["mean"] for r in cond_json["c"]["per_seed"]])
    b_means = {k: v["mean"] for k, v in cond_json.items() if k.startswith("b")}
    e_means = {k: v["mean"] for k, v in cond_json.items() if k.startswith("e")}
    a_mean, c_mean = float(a.mean()), float(c.mean())
    targets: dict[str, Any] = {
        "c_over_a": {
            "target": ">= 0.98",
            "value": ratio(c_mean, a_mean),
            "per_seed": [ratio(x, y) for x, y in zip(c, a, strict=True)],
            "met": bool(c_mean >= 0.98 * a_mean),
        },
        "c_gt_every_b": {
            "target": "(c) > every (b)",
            "c": c_mean,
            "best_b": max(b_means.values()),
            "met": bool(all(c_mean > v for v in b_means.values())),
        },
    }
    a_training = cond_json["a"].get("training")
    if a_training is not None:
        targets["a_converged"] = {
            "target": "(a) converged (validation Dice flat within the segmenter's budget, every seed)",
            "met": bool(a_training["converged"]),
        }
    if e_means:
        targets["e_ge_a"] = {
            "target": "(e) >= (a), each choice of the real site",
            "a": a_mean,
            "e": e_means,
            "e_mean": float(np.mean(list(e_means.values()))),
            "met": bool(all(v >= a_mean for v in e_means.values())),
        }
    return targets


def _curve(
    g_async: GeneratorRun,
    by_key: dict[str, list[list[float]]],
    cond_json: dict[str, Any],
    final: int,
    main: Sequence[int],
) -> list[dict[str, Any]]:
    """(c)/(a) at every AsynDGAN G snapshot, against G's training seconds."""
    a = np.asarray([r["mean"] for r in cond_json["a"]["per_seed"]])
    curve = []
    for step, secs in zip(g_async.steps, g_async.seconds, strict=True):
        key = "c" if step == final else f"c@{step}"
        cs = np.asarray([np.mean(np.asarray(r)[list(main)]) for r in by_key[key]])
        r = np.asarray([ratio(x, y) for x, y in zip(cs, a, strict=True)])
        curve.append(
            {
                "step": step,
                "generator_seconds": secs,
                "c_mean": float(cs.mean()),
                "c_std": float(cs.std(ddof=1)) if len(cs) > 1 else 0.0,
                "ratio_to_a": float(r.mean()),
                "ratio_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
            }
        )
    return curve


def _audits(
    gens: Sequence[GeneratorRun],
    train_real: np.ndarray,
    heldout_real: np.ndarray,
    opts: EvalOptions,
    pool: cf.Executor | None,
) -> dict[str, Any]:
    """The memorisation audit of every generator (in the workers when there are some)."""
    args = {g.kind: (train_real, heldout_real, g.synth_heldout, g.synth_train[g.final], opts.audit_limit) for g in gens}
    if pool is not None:
        futures = {k: pool.submit(memorisation_audit, *v) for k, v in args.items()}
        return {k: f.result() for k, f in futures.items()}
    return {k: memorisation_audit(*v) for k, v in args.items()}


def _describe(setting: Setting, data: LoadedSetting, gens: Sequence[GeneratorRun]) -> dict[str, Any]:
    """The head of a setting's JSON entry: its description, configuration, data and generators."""
    sites, heldout = data.sites, data.heldout
    return {
        "description": setting.description,
        "config": {
            **{k: v for k, v in dataclasses.asdict(setting).items() if k not in ("seg", "site_specs")},
            "site_specs": list(setting.site_specs),
            "segmenter": dataclasses.asdict(setting.seg),
            "centralised_batch": setting.gen_batch * len(sites),
        },
        "data": {
            "sites": [
                {"name": s.name, "spec": spec, "slices": len(s)}
                for s, spec in zip(sites, setting.site_specs, strict=True)
            ],
            "heldout_slices": len(heldout),
            "shifted_slices": len(data.shifted) if data.shifted is not None else 0,
            "slice_size": list(heldout.labels.shape[1:]),
            "num_classes": data.num_classes,
            "modalities": list(data.modalities),
        },
        "generators": {
            g.kind: {"seconds": g.seconds[-1], "torch_threads": g.threads, "max_steps": setting.gen_steps, **g.training}
            for g in gens
        },
    }


def _log_setting(setting: Setting, data: LoadedSetting) -> None:
    log.info(
        "%s: %d sites (%s), %d held-out slices, %s px, modalities %s",
        setting.name,
        len(data.sites),
        ", ".join(str(len(s)) for s in data.sites),
        len(data.heldout),
        "x".join(map(str, data.heldout.labels.shape[1:])),
        ",".join(data.modalities),
    )


def _sized(setting: Setting, data: LoadedSetting) -> Setting:
    """``setting``, its segmenter sized from the loaded data when it asks for that (custom sites)."""
    if not setting.seg_from_task:
        return setting
    size = max(data.heldout.labels.shape[1:])
    seg = SegConfig.for_task(data.num_classes, size, sum(len(s) for s in data.sites))
    seg = dataclasses.replace(seg, contrast=setting.seg.contrast)  # the training recipe stays the user's
    log.info("%s: segmenter sized from the task: %s", setting.name, seg)
    return dataclasses.replace(setting, seg=seg)


def _classes(heldout: SiteData) -> tuple[list[int], dict[str, Any]]:
    """(the classes that count in the mean Dice, the classes' entry in eval.json: pixel shares, small ones)."""
    shares = class_shares(heldout.labels, heldout.num_classes)
    main = main_classes(shares)
    small = [i + 1 for i in small_classes(len(shares), main)]
    return main, {"heldout_pixel_share": shares, "small_share": SMALL_CLASS_SHARE, "small": small}


def evaluate_setting(
    setting: Setting, opts: EvalOptions, pool: cf.Executor | None, progress: EvalProgress | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one setting; returns (its JSON entry, figure material). ``progress``: the phases are reported there."""
    phase = progress.phase if progress is not None else lambda _name: None
    setting.validate()
    t0 = time.perf_counter()
    phase(f"{setting.name}: data")
    data = load_setting(setting)
    sites, heldout = data.sites, data.heldout
    setting = _sized(setting, data)
    _log_setting(setting, data)
    if progress is not None:
        progress.data_loaded(setting, sum(len(s) for s in sites), len(heldout), heldout.labels[0].size)
    phase(f"{setting.name}: generators")
    g_async, g_central = _train_generators(setting, opts, pool, data, np.concatenate([s.labels for s in sites]))
    gen_wall = time.perf_counter() - t0

    final = g_async.final
    syn_async = synthetic_sites(sites, g_async.synth_train[final], "asyndgan")
    syn_central = synthetic_sites(sites, g_central.synth_train[g_central.final], "centralised")
    conditions = training_conditions(sites, syn_async, syn_central, g_async, final, opts.augment)
    t1 = time.perf_counter()
    phase(f"{setting.name}: segmenters")
    by_key, shifted_by_key, fits = run_segmenters(
        setting.name, conditions, opts.seeds, heldout, setting.seg, data.shifted, pool
    )
    seg_wall = time.perf_counter() - t1
    main, classes = _classes(heldout)
    cond_json = {
        key: condition_entry(label, len(train), by_key[key], opts.seeds, shifted_by_key.get(key), main, fits[key])
        for key, (label, train) in conditions.items()
        if "@" not in key
    }
    t2 = time.perf_counter()
    phase(f"{setting.name}: memorisation audit")
    memo = _audits((g_async, g_central), conditions["a"][1].images, heldout.images, opts, pool)
    audit_wall = time.perf_counter() - t2
    if progress is not None:
        progress.audits_done(setting)
    entry: dict[str, Any] = {
        **_describe(setting, data, (g_async, g_central)),
        "conditions": cond_json,
        "classes": classes,
        "targets": _targets(cond_json),
        "curve": _curve(g_async, by_key, cond_json, final, main),
        "similarity": {g.kind: image_similarity(g.synth_heldout, heldout.images) for g in (g_async, g_central)},
        "memorisation": memo,
        "wall_seconds": {
            "generators": round(gen_wall, 1),
            "segmenters": round(seg_wall, 1),
            "audit": round(audit_wall, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    figure = {"sites": sites, "heldout": heldout, "syn_async": syn_async, "syn_central": syn_central}
    return entry, {**figure, "held_async": g_async.synth_heldout, "held_central": g_central.synth_heldout}


def _report_head(opts: EvalOptions, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "version": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": list(argv),
        "quick": opts.quick,
        "seeds": list(opts.seeds),
        "generator_seed": opts.gen_seed,
        "jobs": opts.jobs,
        "torch_threads": opts.threads,
        "torch_version": torch.__version__,
        "dice": "dataset-level Dice per foreground class (1..K-1) on held-out REAL slices; 'mean' = mean over those "
        "classes; mean +- std over segmenter seeds (the generators are trained once, seed generator_seed)",
        "generator_note": "AsynDGAN G = asyndgan.local's in-process loop (bit-for-bit the distributed gRPC run "
        "with the lossless f32 codec; a setting's lossy codec rounds fakes and gradients as the wire does, with the "
        "sites' error feedback); centralised pix2pix = same trainer, one site holding all sites' pooled data, "
        "batch = per-site batch x number of sites",
        "settings": {},
    }


def run_evaluation(
    settings: Sequence[Setting], opts: EvalOptions, out: Path | None, argv: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluate every setting; write ``eval.json``, ``eval.md`` and ``eval.png`` under ``out``."""
    if not opts.seeds:
        raise ValueError("at least one seed")
    if opts.augment not in ("all", "first"):
        raise ValueError("augment must be 'all' or 'first'")
    start = time.perf_counter()
    report = _report_head(opts, argv)
    figures: dict[str, dict[str, Any]] = {}
    with EvalProgress(settings, opts) as progress:
        pool = make_pool(opts.jobs, opts.threads, progress.queue)
        try:
            for s in settings:
                entry, fig = evaluate_setting(s, opts, pool, progress)
                report["settings"][s.name] = entry
                figures[s.name] = fig
                if out is not None:  # keep partial results if a later setting fails
                    write_json_atomic(out / "eval.json", report)
        finally:
            if pool is not None:
                pool.shutdown()
    report["seconds"] = round(time.perf_counter() - start, 1)
    if out is not None:
        write_json_atomic(out / "eval.json", report)
        write_bytes_atomic(out / "eval.md", markdown_report(report).encode())
        write_bytes_atomic(out / "eval.png", figure_png(report, figures))
        log.info("wrote %s, %s and %s", out / "eval.json", out / "eval.md", out / "eval.png")
    return report
