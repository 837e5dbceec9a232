"""In-process reference trainer: the same site and generator steps as the services, in one process."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan.algorithm import Dropped, SiteTrainer, StepOutcome, TrainConfig, site_seed
from asyndgan.codec import LOSSLESS, Codec, roundtrip
from asyndgan.data import SiteData
from asyndgan.errors import BudgetExhausted
from asyndgan.generator import GeneratorTrainer
from asyndgan.io import write_json_atomic
from asyndgan.messages import StepAnswer
from asyndgan.nets import NetConfig
from asyndgan.report import Progress, heldout_l1, samples_png, steady_seconds
from asyndgan.sampling import Batch

__all__ = [
    "InProcessSites",
    "LocalResult",
    "LocalRun",
    "build_trainers",
    "evaluate_heldout",
    "run_steps",
    "sample_rows",
    "train_local",
    "union_modalities",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRun:
    iterations: int = 200
    batch_size: int = 8
    seed: int = 0
    eval_samples: int = 64
    stale: bool = False  # G applies each batch's gradients one step late (GeneratorTrainer.step)
    site_styles: bool = False  # G also takes the site whose scanner it renders (GeneratorTrainer, styles)


@dataclass
class LocalResult:
    summary: dict[str, Any]
    generator: GeneratorTrainer
    sites: list[SiteTrainer]


def union_modalities(sites: list[SiteData]) -> tuple[str, ...]:
    """G's output channels: every modality any site holds, in first-seen order."""
    out: list[str] = []
    for s in sites:
        out += [m for m in s.modalities if m not in out]
    return tuple(out)


def evaluate_heldout(gen: GeneratorTrainer, heldout: SiteData, limit: int) -> float:
    """Mean L1 between G(label) and the held-out real image, over G channels the held-out set has."""
    channels = [gen.modalities.index(m) for m in heldout.modalities if m in gen.modalities]
    keep = [m for m in heldout.modalities if m in gen.modalities]
    img_idx = [heldout.modalities.index(m) for m in keep]
    n = min(limit, len(heldout))
    idx = np.linspace(0, len(heldout) - 1, n).round().astype(int)
    return heldout_l1(gen.synthesize, heldout.labels[idx], heldout.images[idx][:, img_idx], channels)


def sample_rows(
    gen: GeneratorTrainer, last: dict[str, np.ndarray], heldout: SiteData | None
) -> list[tuple[str, list[np.ndarray]]]:
    """Figure rows: per site 'label | G(label) per modality'; held-out 'label | real | synthetic'."""
    rows: list[tuple[str, list[np.ndarray]]] = []
    for name, labels in last.items():
        fakes = gen.synthesize(torch.from_numpy(labels[:2]), gen.style_index(name) if gen.styles else None).numpy()
        panels: list[np.ndarray] = []
        for i in range(len(fakes)):
            panels += [labels[i], *fakes[i]]
        rows.append((f"{name}: label | synthetic {'/'.join(gen.modalities)}", panels))
    if heldout is not None:
        idx = np.linspace(0, len(heldout) - 1, min(3, len(heldout))).round().astype(int)
        fakes = gen.synthesize(torch.from_numpy(heldout.labels[idx])).numpy()
        panels = []
        for j, i in enumerate(idx):
            for k, m in enumerate(heldout.modalities):
                if m in gen.modalities:
                    panels += [heldout.labels[i], heldout.images[i, k], fakes[j, gen.modalities.index(m)]]
        rows.append(("held-out: label | real | synthetic", panels))
    return rows


def build_trainers(
    sites: list[SiteData], net: NetConfig, train: TrainConfig, run: LocalRun
) -> tuple[list[SiteTrainer], GeneratorTrainer]:
    """The sites' trainers and G, seeded exactly as the distributed services seed them."""
    modalities = union_modalities(sites)
    num_classes = sites[0].num_classes
    if any(s.num_classes != num_classes for s in sites):
        raise ValueError("sites disagree on the number of label classes")
    site_trainers = [
        SiteTrainer(s, net, train, batch_size=run.batch_size, seed=site_seed(run.seed, j)) for j, s in enumerate(sites)
    ]
    gen = GeneratorTrainer(
        net,
        train,
        num_classes=num_classes,
        modalities=modalities,
        seed=run.seed,
        image_size=min(sites[0].labels.shape[1:]),
        stale=run.stale,
        styles=[s.name for s in sites] if run.site_styles else (),
    )
    return site_trainers, gen


class InProcessSites:
    """The sites of an in-process run behind the same exchange surface as the network: asked for its answer, a
    site trains on its outstanding batch and draws its next one, as the discriminator service does. Lossy codecs
    round fakes and gradients as the wire would (the gradient with the sites' error feedback)."""

    def __init__(
        self,
        trainers: list[SiteTrainer],
        modalities: tuple[str, ...],
        image_codec: Codec = LOSSLESS,
        grad_codec: Codec = LOSSLESS,
    ) -> None:
        self.trainers = trainers
        self.modalities = modalities
        self.image_codec = image_codec
        self.grad_codec = grad_codec
        self.batches: list[Batch] = [t.next_batch() for t in trainers]
        self.sent: dict[int, torch.Tensor] = {}
        self.sizes = [len(t.data) for t in trainers]

    def labels(self) -> list[torch.Tensor]:
        return [b.labels for b in self.batches]

    def send(self, j: int, fakes: torch.Tensor) -> None:
        self.sent[j] = roundtrip(fakes, self.image_codec)

    def answer(self, j: int) -> StepAnswer | Dropped:
        t, b = self.trainers[j], self.batches[j]
        try:
            grad = t.step(b, self.sent.pop(j), self.modalities, self.grad_codec)
        except BudgetExhausted as e:  # as over the network: the site is finished, the others go on
            return Dropped("finished", str(e))
        self.batches[j] = nxt = t.next_batch()
        return StepAnswer(b.id, grad, list(t.last_losses), nxt.id, nxt.labels)


def run_steps(
    gen: GeneratorTrainer,
    sites: InProcessSites,
    steps: int,
    on_step: Callable[[int, float, StepOutcome], bool | None] | None = None,
) -> list[float]:
    """The in-process training loop (train-local and the evaluation): up to ``steps`` generator steps; after each,
    ``on_step(step, seconds_of_that_step, outcome)``, which ends the loop by returning True. Returns the seconds
    of each step (callbacks excluded)."""
    seconds: list[float] = []
    for it in range(1, steps + 1):
        t = time.perf_counter()
        outcome = gen.step(sites.labels(), sites.sizes, sites)
        seconds.append(time.perf_counter() - t)
        if on_step is not None and on_step(it, seconds[-1], outcome):
            break
    return seconds


def train_local(
    sites: list[SiteData],
    heldout: SiteData | None,
    net: NetConfig,
    train: TrainConfig,
    run: LocalRun,
    out: Path | None,
) -> LocalResult:
    """Train G against all sites in one process; write samples.png and summary.json under ``out``."""
    site_trainers, gen = build_trainers(sites, net, train, run)
    l1_start = evaluate_heldout(gen, heldout, run.eval_samples) if heldout else math.nan
    exchange = InProcessSites(site_trainers, gen.modalities)
    progress = Progress(run.iterations)
    losses = [math.nan]

    def on_step(it: int, _seconds: float, outcome: StepOutcome) -> None:
        losses.append(outcome.generator_loss)
        progress.update(it, g_loss=outcome.generator_loss)

    start = time.perf_counter()
    step_seconds = run_steps(gen, exchange, run.iterations, on_step)
    seconds = time.perf_counter() - start
    l1_end = evaluate_heldout(gen, heldout, run.eval_samples) if heldout else math.nan
    summary: dict[str, Any] = {
        "mode": "in-process",
        "iterations": run.iterations,
        "batch_size": run.batch_size,
        "sites": [{"name": s.name, "num_samples": len(s), "modalities": list(s.modalities)} for s in sites],
        "modalities": list(gen.modalities),
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(run.iterations, 1), 4),
        "seconds_per_step_steady": round(steady_seconds(step_seconds), 4),
        "generator_loss": losses[-1],
        "l1_heldout_start": l1_start,
        "l1_heldout": l1_end,
        "torch_threads": torch.get_num_threads(),
    }
    if out is not None:
        last = {s.name: b.labels.numpy() for s, b in zip(sites, exchange.batches, strict=True)}
        samples_png(out / "samples.png", sample_rows(gen, last, heldout))
        write_json_atomic(out / "summary.json", summary)
        log.info("wrote %s and %s", out / "samples.png", out / "summary.json")
    return LocalResult(summary, gen, site_trainers)
