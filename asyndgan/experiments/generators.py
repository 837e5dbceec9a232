"""The evaluation's generators: AsynDGAN G (the in-process trainer's exact loop, :func:`asyndgan.local.run_steps`)
and a centralised pix2pix (the same trainer with ONE site holding all sites' pooled real data), snapshotted at a
few steps. A run hands back synthetic images, never model weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asyndgan.algorithm import StepOutcome, TrainConfig
from asyndgan.codec import LOSSLESS, Codec
from asyndgan.data import SiteData
from asyndgan.experiments import eval_progress
from asyndgan.experiments.convergence import GStopRule
from asyndgan.experiments.datasets import pool_sites
from asyndgan.experiments.settings import Setting
from asyndgan.generator import GeneratorTrainer
from asyndgan.local import InProcessSites, LocalRun, build_trainers, run_steps
from asyndgan.nets import NetConfig

__all__ = ["GeneratorRun", "generator_task", "synthesize_all", "train_generator"]

log = logging.getLogger(__name__)


def train_generator(
    sites: list[SiteData],
    net: NetConfig,
    train: TrainConfig,
    run: LocalRun,
    snapshots: Iterable[int],
    on_snapshot: Callable[[int, float, GeneratorTrainer], None],
    image_codec: Codec = LOSSLESS,
    grad_codec: Codec = LOSSLESS,
    stop: GStopRule | None = None,
) -> GeneratorTrainer:
    """:func:`asyndgan.local.train_local`'s loop (same trainers, seeds and batch order, so G after k steps equals
    ``train_local(iterations=k)`` bit for bit), calling ``on_snapshot(step, train_seconds, gen)`` after each step
    listed in ``snapshots`` and after the step where ``stop`` ends training early. ``train_seconds`` excludes
    time spent inside the callbacks. Lossy codecs round fakes and gradients as the wire would."""
    site_trainers, gen = build_trainers(sites, net, train, run)
    wanted = set(snapshots)
    seconds = 0.0

    def on_step(it: int, step_seconds: float, outcome: StepOutcome) -> bool:
        nonlocal seconds
        seconds += step_seconds
        done = stop is not None and stop.observe(it, seconds, outcome)
        # a G that stops early has done its share of the planned work (the cap), as a segmenter does
        eval_progress.advance(eval_progress.GEN_STEP_UNITS * ((run.iterations - it + 1) if done else 1))
        if it % 50 == 0 or it == run.iterations or done:
            log.info(
                "G %s step %d/%d loss %.3f (%.1f s)%s",
                *(sites[0].name, it, run.iterations, outcome.generator_loss, seconds),
                f", stops: {stop.reason}" if done and stop is not None else "",
            )
        if it in wanted or done:
            on_snapshot(it, seconds, gen)
        return done

    exchange = InProcessSites(site_trainers, gen.modalities, image_codec, grad_codec)
    run_steps(gen, exchange, run.iterations, on_step)
    return gen


@torch.no_grad()
def synthesize_all(
    gen: GeneratorTrainer,
    labels: np.ndarray,
    channels: Sequence[int],
    batch: int = 32,
    styles: np.ndarray | None = None,
) -> np.ndarray:
    """G(labels) for every row, channels ``channels`` of G's outputs, float32 in [-1, 1]; a G with site styles
    renders row i in style ``styles[i]`` (None: every style in turn)."""
    out = []
    for i in range(0, len(labels), batch):
        rows = None if styles is None else torch.from_numpy(styles[i : i + batch])
        out.append(gen.synthesize(torch.from_numpy(labels[i : i + batch]), rows)[:, list(channels)])
    return torch.cat(out).clamp(-1, 1).numpy()


@dataclass
class GeneratorRun:
    """What one generator training hands back: synthetic images per snapshot, no model weights."""

    kind: str
    steps: list[int]
    seconds: list[float]
    synth_train: dict[int, np.ndarray]  # snapshot step -> G(all training label maps), site order
    synth_heldout: np.ndarray  # final G(held-out label maps)
    threads: int
    training: dict[str, Any] = field(default_factory=dict)  # how training ended (GStopRule.summary)

    @property
    def final(self) -> int:
        """The step G stopped at (its last snapshot)."""
        return self.steps[-1]


def generator_task(
    kind: str,
    sites: list[SiteData],
    heldout: SiteData,
    setting: Setting,
    seed: int,
    threads: int,
    all_labels: np.ndarray,
    heldout_sites: np.ndarray | None = None,
) -> GeneratorRun:
    """Train the ``kind`` ("asyndgan" or "centralised") generator with ``threads`` torch threads (a pool task).
    ``all_labels``: the sites' label maps in site order; ``heldout_sites``: per held-out row, the site whose
    style AsynDGAN G renders it in when the setting has site styles (None: every style in turn)."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _train_generator_run(kind, sites, heldout, setting, seed, all_labels, heldout_sites)
    finally:
        torch.set_num_threads(before)  # a pooled worker runs segmenters next, with its own thread budget


def _train_generator_run(
    kind: str,
    sites: list[SiteData],
    heldout: SiteData,
    setting: Setting,
    seed: int,
    all_labels: np.ndarray,
    heldout_sites: np.ndarray | None,
) -> GeneratorRun:
    net = NetConfig(generator=setting.generator, ngf=setting.ngf, ndf=setting.ndf)
    batch = setting.gen_batch * (len(sites) if kind == "centralised" else 1)
    train_sites = [pool_sites(sites)] if kind == "centralised" else sites
    snaps = setting.snapshot_steps() if kind == "asyndgan" else [setting.gen_steps]
    res = GeneratorRun(kind, [], [], {}, np.empty(0, np.float32), torch.get_num_threads())
    channels = list(range(len(sites[0].modalities)))
    budget = setting.gen_budget_minutes * 60 if setting.gen_budget_minutes else math.inf
    rule = GStopRule(patience=setting.gen_patience, budget_s=budget)
    styled = setting.site_styles and kind == "asyndgan"
    train_styles = np.repeat(np.arange(len(sites)), [len(s) for s in sites])  # all_labels' rows' sites

    def on_snapshot(step: int, seconds: float, gen: GeneratorTrainer) -> None:
        res.steps.append(step)
        res.seconds.append(round(seconds, 3))
        res.synth_train[step] = synthesize_all(gen, all_labels, channels, styles=train_styles)

    log.info("%s: training %s G for up to %d steps (batch %d)", setting.name, kind, setting.gen_steps, batch)
    gen = train_generator(
        train_sites,
        net,
        TrainConfig(ema=setting.gen_ema),
        LocalRun(setting.gen_steps, batch, seed, stale=setting.gen_stale and kind == "asyndgan", site_styles=styled),
        snaps,
        on_snapshot,
        *(
            (Codec.parse(setting.codec), Codec.parse(setting.grad_codec or setting.codec))
            if kind == "asyndgan"
            else (LOSSLESS, LOSSLESS)
        ),
        rule,
    )
    # G as it stopped (its last snapshot)
    res.synth_heldout = synthesize_all(gen, heldout.labels, channels, styles=heldout_sites)
    res.training = rule.summary(res.final)
    return res
