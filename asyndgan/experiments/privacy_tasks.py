"""The privacy evaluation's in-process work, one pool task per piece (:mod:`.privacy_eval` orchestrates):

* :func:`mode_task` -- one mode ("none" or an epsilon): train G against the sites (guarded at every site or
  not) with :class:`~.privacy_passive.RecordingSites`, then the passive attack on site 0, G's image
  similarity on held-out subjects, membership inference, the memorisation audit and the (c) segmenters;
* :func:`real_segmenter_task` -- the (a) segmenter on the sites' pooled real data, per seed;
* :func:`step_bench` -- G step time with and without the guard, interleaved, same thread budget.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan.algorithm import SiteTrainer, StepOutcome, TrainConfig
from asyndgan.clients.audit import LEAK_AUC, reconstruction_errors, roc_auc
from asyndgan.data import SiteData
from asyndgan.experiments.datasets import pool_sites, synthetic_sites
from asyndgan.experiments.generators import synthesize_all
from asyndgan.experiments.image_metrics import image_similarity
from asyndgan.experiments.memorisation import memorisation_audit
from asyndgan.experiments.privacy_common import (
    PhaseClock,
    PrivacyOptions,
    finite,
    heldout_specs,
    load_cached,
    load_pooled,
    mode_epsilon,
    mode_key,
    nonmember_specs,
    site_specs,
)
from asyndgan.experiments.privacy_passive import RecordingSites, passive_attack, passive_report
from asyndgan.experiments.segmentation import SegTask, seg_task
from asyndgan.generator import GeneratorTrainer
from asyndgan.guard import PrivacyConfig, PrivacyGuard
from asyndgan.local import InProcessSites, LocalRun, build_trainers, run_steps
from asyndgan.nets import NetConfig
from asyndgan.report import WARMUP_STEPS

__all__ = ["mode_task", "real_segmenter_task", "step_bench"]

log = logging.getLogger(__name__)


def _guard(
    trainers: list[SiteTrainer], sites: list[SiteData], o: PrivacyOptions, eps: float, planned: int, ledgers: Path
) -> None:
    """Put the site-side guard (the CLI's --privacy dp, --privacy-steps ``planned``) on every site."""
    for j, (t, s) in enumerate(zip(trainers, sites, strict=True)):
        cfg = PrivacyConfig(mode="dp", epsilon=eps, delta=o.delta, planned_steps=planned)
        t.guard = PrivacyGuard(cfg, s, f"site-{j}", o.batch, ledgers / f"site-{j}.json", torch.device("cpu"))


@contextlib.contextmanager
def _trainers(
    o: PrivacyOptions, mode: str, planned: int = 0
) -> Iterator[tuple[list[SiteTrainer], GeneratorTrainer, list[SiteData]]]:
    """The sites' trainers (guarded in a DP mode, budget planned for ``planned`` or o.steps steps) and G."""
    sites = [load_cached(s) for s in site_specs(o)]
    net = NetConfig(ngf=o.ngf, ndf=o.ndf)
    trainers, gen = build_trainers(sites, net, TrainConfig(), LocalRun(batch_size=o.batch, seed=o.gen_seed))
    eps = mode_epsilon(mode)
    with tempfile.TemporaryDirectory(prefix="asyndgan-privacy-") as tmp:
        try:
            if eps is not None:
                _guard(trainers, sites, o, eps, planned or o.steps, Path(tmp))
            yield trainers, gen, sites
        finally:
            for t in trainers:
                if isinstance(t.guard, PrivacyGuard):
                    t.guard.ledger.close()


def _train(o: PrivacyOptions, mode: str) -> tuple[GeneratorTrainer, RecordingSites, dict[str, Any], list[SiteData]]:
    """G trained for o.steps steps in mode ``mode``, the recorded exchange and the training summary."""
    with _trainers(o, mode) as (trainers, gen, sites):
        exchange = RecordingSites(trainers, gen.modalities, watch=0)
        clock = PhaseClock(f"G {mode_key(mode)}", o.steps, every=max(1, o.steps // 6))
        answered = [0] * len(sites)

        def on_step(it: int, _s: float, outcome: StepOutcome) -> None:
            answered[:] = [a + int(ok) for a, ok in zip(answered, outcome.answered, strict=True)]
            clock.update(it, f", G loss {outcome.generator_loss:.3f}")

        seconds = run_steps(gen, exchange, o.steps, on_step)
        guards = [t.guard for t in trainers if isinstance(t.guard, PrivacyGuard)]
        summary = {
            "steps": o.steps,
            "seconds": round(sum(seconds), 2),
            "step_seconds_median": finite(float(np.median(seconds[WARMUP_STEPS:] or seconds))),
            "answers_per_site": answered,
            "torch_threads": torch.get_num_threads(),
            "noise_multiplier": finite(guards[0].sigma) if guards else None,
            "sample_rate": finite(guards[0].q, 6) if guards else None,
            "epsilon_spent": [finite(g.ledger.spent()) for g in guards] if guards else None,
        }
    return gen, exchange, summary, sites


def _membership(errors_member: np.ndarray, errors_non: np.ndarray, errors_held: np.ndarray) -> dict[str, Any]:
    """ROC AUC of "lower reconstruction error => member" (members = the positive class)."""
    auc = roc_auc(-errors_member, -errors_non)
    return {
        "auc": finite(auc),
        "positive_class": "member: a training slice of one of the sites",
        "score": "-MSE(G(label map), real image); lower error => member",
        "members": len(errors_member),
        "nonmembers": len(errors_non),
        "member_mse_median": finite(float(np.median(errors_member)), 6),
        "nonmember_mse_median": finite(float(np.median(errors_non)), 6),
        "nonmembers_from": "other virtual people from the same slab, imaged by the same scanner (population seed 1)",
        "auc_vs_heldout_block": finite(roc_auc(-errors_member, -errors_held)),
        "heldout_block_note": "held-out subjects from the held-out block: other slice positions as well as other "
        "people, so this AUC mixes position with membership",
        "leaks": bool(auc > LEAK_AUC),
    }


def _memorisation(o: PrivacyOptions, site: SiteData, synth: np.ndarray, gen: GeneratorTrainer) -> dict[str, Any]:
    """The memorisation audit on site 0: G(training label maps) vs G(non-member label maps), reference set =
    site 0's real training images; nearest-is-own-source for both groups."""
    non = load_cached(nonmember_specs(o)[0])
    idx = np.linspace(0, len(non) - 1, min(o.memo_limit, len(non))).round().astype(np.int64)
    synth_non = synthesize_all(gen, non.labels[idx], _channels(gen, site))
    audit = memorisation_audit(site.images, non.images[idx], synth_non, synth, limit=o.memo_limit)
    train_g, non_g = audit["groups"]["synthetic_training_labels"], audit["groups"]["synthetic_heldout_labels"]
    own = {
        f"{who}_{m}": finite(v)
        for m in ("l2", "ssim")
        for who, v in (
            ("training", train_g[f"share_nearest_is_own_source_{m}"]),
            ("nonmember", 1.0 - non_g[f"share_nearer_a_training_image_than_own_{m}"]),
        )
    }
    return {
        "reference_set": f"{site.name}: its {len(site)} real training images",
        "n_training": train_g["n"],
        "n_nonmember": non_g["n"],
        "nearest_is_own_source": own,
        "note": "training: share of G(training label map) whose nearest training image is its own source; "
        "nonmember: share of G(non-member label map) nearer to its own real image than to every training image",
        "audit": audit,
    }


def _channels(gen: GeneratorTrainer, data: SiteData) -> list[int]:
    return [gen.modalities.index(m) for m in data.modalities]


def _synthetic_segmenters(o: PrivacyOptions, mode: str, sites: list[SiteData], synth: np.ndarray) -> list[list[float]]:
    """(c): the segmenter trained on G's images for all sites' training label maps, per seed, Dice per class."""
    train = pool_sites(synthetic_sites(sites, synth, mode_key(mode)), f"synthetic-{mode_key(mode)}")
    held = load_pooled(heldout_specs(o), "heldout")
    return [seg_task(SegTask("privacy", f"c/{mode_key(mode)}", s, train, held, o.seg))[0] for s in o.seeds]


def _membership_attack(
    o: PrivacyOptions,
    gen: GeneratorTrainer,
    sites: list[SiteData],
    synth: np.ndarray,
    held: SiteData,
    synth_held: np.ndarray,
) -> dict[str, Any]:
    """Reconstruction errors of G for members (every site's training slices), same-slab non-members and
    held-out-block subjects, and the AUCs."""
    non = load_pooled(nonmember_specs(o), "nonmembers")
    members = reconstruction_errors(synth, np.concatenate([s.images for s in sites]))
    nonmembers = reconstruction_errors(synthesize_all(gen, non.labels, _channels(gen, non)), non.images)
    out = _membership(members, nonmembers, reconstruction_errors(synth_held, held.images))
    log.info("membership AUC %.3f (held-out block %.3f)", out["auc"], out["auc_vs_heldout_block"])
    return out


def mode_task(o: PrivacyOptions, mode: str) -> dict[str, Any]:
    """Everything measured on G trained in mode ``mode`` (a pool task; returns numbers only)."""
    t0 = time.perf_counter()
    gen, exchange, training, sites = _train(o, mode)
    t_train = time.perf_counter() - t0
    passive = passive_report(passive_attack(exchange.records, sites[0], sites[0].name), sites[0])
    exchange.records.clear()
    synth = synthesize_all(gen, np.concatenate([s.labels for s in sites]), _channels(gen, sites[0]))
    held = load_pooled(heldout_specs(o), "heldout")
    synth_held = synthesize_all(gen, held.labels, _channels(gen, held))
    similarity = image_similarity(synth_held, held.images)
    membership = _membership_attack(o, gen, sites, synth, held, synth_held)
    memo = _memorisation(o, sites[0], synth[: len(sites[0])], gen)
    log.info("%s: nearest-is-own-source %s", mode_key(mode), memo["nearest_is_own_source"])
    return {
        "mode": mode,
        "epsilon": mode_epsilon(mode),
        "training": training,
        "similarity_heldout": {k: finite(v) if isinstance(v, float) else v for k, v in similarity.items()},
        "passive": passive,
        "membership": membership,
        "memorisation": memo,
        "dice_c": _synthetic_segmenters(o, mode, sites, synth),
        "wall_seconds": {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)},
    }


def real_segmenter_task(o: PrivacyOptions, seed: int) -> list[float]:
    """(a): the segmenter on the sites' pooled real training images; Dice per class on held-out subjects."""
    train = load_pooled(site_specs(o), "pooled-real")
    return seg_task(SegTask("privacy", "a", seed, train, load_pooled(heldout_specs(o), "heldout"), o.seg))[0]


def step_bench(o: PrivacyOptions, mode: str) -> dict[str, Any]:
    """Seconds per G step (3 sites in-process), unguarded vs guarded in ``mode``, in interleaved rounds of
    ``bench_steps`` steps each (so a change in machine load hits both); medians without each round's first step."""
    times: dict[str, list[float]] = {"none": [], mode: []}
    planned = max(o.steps, o.bench_rounds * o.bench_steps)
    with _trainers(o, "none") as (t_none, g_none, _), _trainers(o, mode, planned) as (t_dp, g_dp, _):
        runs = {
            "none": (g_none, InProcessSites(t_none, g_none.modalities)),
            mode: (g_dp, InProcessSites(t_dp, g_dp.modalities)),
        }
        clock = PhaseClock("step-time benchmark", o.bench_rounds, every=1)
        for r in range(1, o.bench_rounds + 1):
            for m, (gen, ex) in runs.items():
                times[m] += run_steps(gen, ex, o.bench_steps)[1:]
            clock.update(r)
    none, dp = float(np.median(times["none"])), float(np.median(times[mode]))
    return {
        "guarded_mode": mode_key(mode),
        "torch_threads": torch.get_num_threads(),
        "steps_each": len(times["none"]),
        "unguarded_median_s": finite(none),
        "guarded_median_s": finite(dp),
        "ratio": finite(dp / none) if none > 0 else None,
        "batch_per_site": o.batch,
        "sites": o.sites,
    }
