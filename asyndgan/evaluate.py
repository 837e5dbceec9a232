"""Evaluation of the paper's claim: does a segmenter trained on AsynDGAN's synthetic images do as well as one
trained on all hospitals' real images pooled, and better than one trained on any single hospital?

For each *setting* (a set of site data specs + a held-out set), this module

1. trains the AsynDGAN generator G against all sites (the in-process trainer's exact loop, which a test shows
   is bit-for-bit the distributed gRPC run with a lossless codec), snapshotting G at a few steps, and a
   centralised pix2pix (the same trainer with ONE site holding all sites' pooled real data);
2. trains the same small U-Net segmenter (:mod:`asyndgan.segment`), per seed, on
   (a) pooled real data, (b) each single site's real data, (c) AsynDGAN synthetic images for all sites' label
   maps, (d) centralised-pix2pix synthetic images for the same label maps, (e) one site's real data plus AsynDGAN
   synthetic images for the other sites' label maps; and scores Dice per foreground class on held-out REAL slices;
3. measures image similarity (L1, PSNR, SSIM) of G(held-out label) vs the held-out real image;
4. plots (c)/(a) against G's training time (snapshots);
5. audits memorisation: distance from each synthetic image to its nearest real training image (L2, SSIM),
   against the same distance for real held-out images.

Results go to ``OUT/eval.json``, ``OUT/eval.md`` and ``OUT/eval.png`` (``asyndgan eval`` or
``python -m asyndgan.evaluate``; ``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import io
import logging
import math
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from asyndgan.algorithm import Batch, GeneratorTrainer, LossTerm, TrainConfig
from asyndgan.data import DataError, SiteData, load_site
from asyndgan.io import write_bytes_atomic, write_json_atomic
from asyndgan.local import LocalRun, build_trainers
from asyndgan.nets import NetConfig
from asyndgan.report import label_rgb
from asyndgan.segment import SegConfig, evaluate_dice, train_segmenter

__all__ = [
    "EvalOptions",
    "GeneratorRun",
    "Setting",
    "add_eval_flags",
    "cmd_eval",
    "default_settings",
    "image_similarity",
    "main",
    "memorisation_audit",
    "nearest_training",
    "pool_sites",
    "psnr",
    "run_evaluation",
    "split_contiguous",
    "ssim",
    "train_generator",
]

log = logging.getLogger(__name__)

EMBEDDED = "embedded:icbm152"
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Setting:
    """One evaluation setting: where the sites' data come from and how hard G and the segmenter train."""

    name: str
    description: str
    site_specs: tuple[str, ...]
    heldout_specs: tuple[str, ...]  # pooled; empty: cut a contiguous block out of every site (holdout_fraction, _gap)
    size: int | None = None
    gen_steps: int = 300
    gen_batch: int = 4  # per site per step; the centralised pix2pix draws gen_batch x n_sites per step
    ngf: int = 32
    ndf: int = 32
    generator: str = "auto"
    curve_points: int = 4
    seg: SegConfig = field(default_factory=SegConfig)
    holdout_fraction: float = 0.15
    holdout_gap: int = 4
    shifted_specs: tuple[str, ...] = ()  # optional second test set from a domain no site has (Dice only)

    def validate(self) -> None:
        if not self.site_specs:
            raise ValueError(f"setting {self.name}: no site specs")
        if self.gen_steps < 1 or self.gen_batch < 1 or self.curve_points < 1:
            raise ValueError(f"setting {self.name}: gen_steps, gen_batch and curve_points must be >= 1")
        if not 0 < self.holdout_fraction < 1 or self.holdout_gap < 0:
            raise ValueError(f"setting {self.name}: holdout fraction must be in (0, 1) and gap >= 0")
        self.seg.validate()

    def snapshot_steps(self) -> list[int]:
        k = min(self.curve_points, self.gen_steps)
        return sorted({max(1, round(self.gen_steps * i / k)) for i in range(1, k + 1)})


@dataclass(frozen=True)
class EvalOptions:
    seeds: tuple[int, ...] = (0, 1, 2)
    gen_seed: int = 0
    jobs: int = 2  # worker processes (1 = in-process); each worker runs torch with threads // jobs threads
    threads: int = 2
    augment: str = "all"  # (e) for "all" sites or only the "first"
    audit_limit: int = 0  # 0 = every synthetic image; else at most this many per group
    quick: bool = False


def embedded_setting(name: str, description: str, of: int, size: int, orient: str | None, **kw: Any) -> Setting:
    """An embedded-data setting. Held-out: the held-out block imaged by every site's scanner, pooled (a test set
    from the sites' own distribution); shifted: the same block from a reference scanner that no site has."""
    extra = f"&size={size}" + (f"&orient={orient}" if orient else "")
    return Setting(
        name,
        description,
        tuple(f"{EMBEDDED}?site={j}&of={of}{extra}" for j in range(of)),
        tuple(f"{EMBEDDED}?split=heldout&scanner={j}&of={of}{extra}" for j in range(of)),
        shifted_specs=(f"{EMBEDDED}?split=heldout&scanner=reference&of={of}{extra}",),
        **kw,
    )


def default_settings(quick: bool = False, sites: int = 3) -> dict[str, Setting]:
    """``easy`` (64 px, axial only) and ``hard`` (128 px, three orientations); ``quick`` shrinks both to 32 px."""
    if quick:
        seg = SegConfig(base=8, depth=2, steps=30, batch_size=8, lr=3e-3)
        common: dict[str, Any] = {"gen_steps": 4, "gen_batch": 2, "ngf": 8, "ndf": 8, "curve_points": 2, "seg": seg}
        return {
            "easy": embedded_setting("easy", "quick: 32 px, axial only", sites, 32, "axial", **common),
            "hard": embedded_setting("hard", "quick: 32 px, three orientations", sites, 32, None, **common),
        }
    return {
        "easy": embedded_setting(
            "easy",
            "64 px, axial slices only; held-out block imaged by every site's scanner",
            sites,
            64,
            "axial",
            gen_steps=600,
            gen_batch=4,
            ngf=32,
            ndf=32,
            curve_points=4,
            seg=SegConfig(),
        ),
        "hard": embedded_setting(
            "hard",
            "128 px, axial + coronal + sagittal slices; held-out block imaged by every site's scanner",
            sites,
            128,
            None,
            gen_steps=800,
            gen_batch=4,
            ngf=16,
            ndf=16,
            curve_points=4,
            seg=SegConfig(crop=64),
        ),
    }


# ----------------------------------------------------------------------------------------------------------------
# data helpers


def restrict(site: SiteData, modalities: Sequence[str], name: str | None = None) -> SiteData:
    """``site`` with only ``modalities`` (in that order) and optionally a new name."""
    idx = [site.modalities.index(m) for m in modalities]
    images = site.images if idx == list(range(len(site.modalities))) else site.images[:, idx]
    return SiteData(name or site.name, site.labels, np.ascontiguousarray(images), tuple(modalities), site.num_classes)


def pool_sites(sites: Sequence[SiteData], name: str = "pooled") -> SiteData:
    """All sites' samples in one :class:`SiteData` (same modalities, classes and plane size required)."""
    first = sites[0]
    for s in sites[1:]:
        if s.modalities != first.modalities or s.num_classes != first.num_classes:
            raise DataError(f"cannot pool {s.name!r} with {first.name!r}: modalities or classes differ")
    return SiteData(
        name,
        np.concatenate([s.labels for s in sites]),
        np.concatenate([s.images for s in sites]),
        first.modalities,
        first.num_classes,
    )


def split_contiguous(site: SiteData, fraction: float, gap: int) -> tuple[SiteData, SiteData]:
    """Cut the centred contiguous block of ``fraction`` of the rows out as held-out, dropping ``gap`` rows
    on each side of it (rows are assumed to be in slice order, as every loader returns them).

    A contiguous block with a gap, not interleaved rows: a generator (or segmenter) could otherwise score well
    on held-out slices by remembering their immediate neighbours.
    """
    n = len(site)
    h = max(1, round(n * fraction))
    start = (n - h) // 2
    keep = np.r_[0 : max(0, start - gap), min(n, start + h + gap) : n].astype(np.int64)
    if len(keep) == 0:
        raise DataError(
            f"site {site.name!r}: {n} slices leave no training slices after a held-out block of {h} and gap {gap}"
        )
    held = SiteData(
        f"{site.name}-heldout",
        site.labels[start : start + h],
        site.images[start : start + h],
        site.modalities,
        site.num_classes,
    )
    train = SiteData(site.name, site.labels[keep], site.images[keep], site.modalities, site.num_classes)
    return train, held


@dataclass
class LoadedSetting:
    sites: list[SiteData]
    heldout: SiteData
    modalities: tuple[str, ...]
    num_classes: int
    shifted: SiteData | None = None


def _load_pooled(specs: Sequence[str], size: int | None, name: str) -> SiteData:
    parts = [load_site(spec, size=size) for spec in specs]
    mods = _common_modalities(parts)
    return pool_sites([restrict(p, mods) for p in parts], name)


def load_setting(s: Setting) -> LoadedSetting:
    """Load and check a setting's sites and held-out set(s); keep only the modalities all of them hold."""
    raw = [load_site(spec, size=s.size) for spec in s.site_specs]
    if s.heldout_specs:
        held_raw = _load_pooled(s.heldout_specs, s.size, "heldout")
    else:
        cut = [split_contiguous(r, s.holdout_fraction, s.holdout_gap) for r in raw]
        raw = [c[0] for c in cut]
        held_raw = pool_sites([restrict(c[1], _common_modalities([c[1] for c in cut])) for c in cut], "heldout")
    shifted_raw = _load_pooled(s.shifted_specs, s.size, "shifted") if s.shifted_specs else None
    everyone = [*raw, held_raw, *([shifted_raw] if shifted_raw is not None else [])]
    common = _common_modalities(everyone)
    num_classes = {d.num_classes for d in everyone}
    if len(num_classes) != 1:
        raise DataError(f"sites and held-out set disagree on the number of classes: {sorted(num_classes)}")
    shapes = {d.labels.shape[1:] for d in everyone}
    if len(shapes) != 1:
        raise DataError(f"sites and held-out set have different slice sizes {sorted(shapes)}; pass --size")
    sites = [restrict(r, common, f"hospital-{j}") for j, r in enumerate(raw)]
    heldout = restrict(held_raw, common, "heldout")
    shifted = restrict(shifted_raw, common, "shifted") if shifted_raw is not None else None
    return LoadedSetting(sites, heldout, common, num_classes.pop(), shifted)


def _common_modalities(data: Sequence[SiteData]) -> tuple[str, ...]:
    common = [m for m in data[0].modalities if all(m in d.modalities for d in data[1:])]
    if not common:
        raise DataError("the sites and the held-out set share no modality; the segmenter needs a common input")
    return tuple(common)


# ----------------------------------------------------------------------------------------------------------------
# generator training (the in-process trainer's loop, with snapshots)


def train_generator(
    sites: list[SiteData],
    net: NetConfig,
    train: TrainConfig,
    run: LocalRun,
    snapshots: Iterable[int],
    on_snapshot: Callable[[int, float, GeneratorTrainer], None],
) -> GeneratorTrainer:
    """Exactly :func:`asyndgan.local.train_local`'s loop (same trainers, seeds and batch order, so G after k
    steps equals ``train_local(iterations=k)`` bit for bit), calling ``on_snapshot(step, train_seconds, gen)``
    after each step listed in ``snapshots``. ``train_seconds`` excludes time spent inside the callbacks."""
    site_trainers, gen = build_trainers(sites, net, train, run)
    modalities = gen.modalities
    sizes = [len(s) for s in sites]
    batches: list[Batch] = [st.next_batch() for st in site_trainers]

    def exchange(parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[LossTerm]] | None]:
        return [
            (st.step(b, p, modalities), st.last_losses) for st, b, p in zip(site_trainers, batches, parts, strict=True)
        ]

    wanted = set(snapshots)
    seconds = 0.0
    for it in range(1, run.iterations + 1):
        t = time.perf_counter()
        outcome = gen.step([b.labels for b in batches], sizes, exchange)
        batches = [st.next_batch() for st in site_trainers]
        seconds += time.perf_counter() - t
        if it % 50 == 0 or it == run.iterations:
            log.info(
                "G %s step %d/%d loss %.3f (%.1f s)", sites[0].name, it, run.iterations, outcome.generator_loss, seconds
            )
        if it in wanted:
            on_snapshot(it, seconds, gen)
    return gen


@torch.no_grad()
def synthesize_all(gen: GeneratorTrainer, labels: np.ndarray, channels: Sequence[int], batch: int = 32) -> np.ndarray:
    """G(labels) for every row, channels ``channels`` of G's outputs, float32 in [-1, 1]."""
    out = [
        gen.synthesize(torch.from_numpy(labels[i : i + batch]))[:, list(channels)] for i in range(0, len(labels), batch)
    ]
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


def _generator_task(
    kind: str,
    sites: list[SiteData],
    heldout: SiteData,
    setting: Setting,
    seed: int,
    threads: int,
    all_labels: np.ndarray,
) -> GeneratorRun:
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _train_generator_run(kind, sites, heldout, setting, seed, all_labels)
    finally:
        torch.set_num_threads(before)  # a pooled worker runs segmenters next, with its own thread budget


def _train_generator_run(
    kind: str, sites: list[SiteData], heldout: SiteData, setting: Setting, seed: int, all_labels: np.ndarray
) -> GeneratorRun:
    net = NetConfig(generator=setting.generator, ngf=setting.ngf, ndf=setting.ndf)
    batch = setting.gen_batch * (len(sites) if kind == "centralised" else 1)
    train_sites = [pool_sites(sites)] if kind == "centralised" else sites
    snaps = setting.snapshot_steps() if kind == "asyndgan" else [setting.gen_steps]
    res = GeneratorRun(kind, [], [], {}, np.empty(0, np.float32), torch.get_num_threads())
    channels = list(range(len(sites[0].modalities)))

    def on_snapshot(step: int, seconds: float, gen: GeneratorTrainer) -> None:
        res.steps.append(step)
        res.seconds.append(round(seconds, 3))
        res.synth_train[step] = synthesize_all(gen, all_labels, channels)
        if step == setting.gen_steps:
            res.synth_heldout = synthesize_all(gen, heldout.labels, channels)

    log.info("%s: training %s G for %d steps (batch %d)", setting.name, kind, setting.gen_steps, batch)
    train_generator(
        train_sites,
        net,
        TrainConfig(),
        LocalRun(iterations=setting.gen_steps, batch_size=batch, seed=seed),
        snaps,
        on_snapshot,
    )
    return res


# ----------------------------------------------------------------------------------------------------------------
# image similarity


def _gauss_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region, per channel: (N, C, H, W) -> (N, C, H-k+1, W-k+1)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03), averaged
    over channels. ``x`` and ``y`` are (N, C, H, W) (broadcastable in N) with values spanning ``data_range``."""
    x = x.double()
    y = y.double()
    win = min(win, x.shape[-1], x.shape[-2])
    g = _gauss_1d(win, sigma).double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mu_x**2
    syy = _blur(y * y, g) - mu_y**2
    sxy = _blur(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean((1, 2, 3)).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR per image in dB, peak = ``data_range`` (images in [-1, 1] -> 2)."""
    mse = ((x.double() - y.double()) ** 2).mean((1, 2, 3))
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))).float()


def image_similarity(fake: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Mean L1, PSNR (dB) and SSIM between paired (N, C, H, W) images in [-1, 1]."""
    f, r = torch.from_numpy(fake), torch.from_numpy(real)
    return {
        "l1": float((f - r).abs().mean()),
        "psnr": float(psnr(f, r).mean()),
        "ssim": float(ssim(f, r).mean()),
        "n": len(fake),
    }


# ----------------------------------------------------------------------------------------------------------------
# memorisation audit


def nearest_training(
    queries: np.ndarray, train: np.ndarray, ssim_candidates: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every query image: (min RMS L2 distance, its index, max SSIM, its index) over ``train`` images.

    Pixel space, images in [-1, 1]; RMS L2 = sqrt(mean squared difference) (0.1 = a typical pixel is off by 5 %
    of the range). L2 is exact over all training images; the SSIM maximum too by default, or searched among the
    ``ssim_candidates`` L2-nearest training images only (faster, but the SSIM-nearest image of a noisy real
    slice is not always among its L2-nearest).
    """
    q = torch.from_numpy(queries).float()
    t = torch.from_numpy(train).float()
    d = q[0].numel()
    l2 = torch.cdist(q.flatten(1).double(), t.flatten(1).double()) / math.sqrt(d)
    l2_min, l2_idx = l2.min(1)
    k = len(t) if ssim_candidates <= 0 else min(ssim_candidates, len(t))
    cands = l2.topk(k, dim=1, largest=False).indices
    win = min(11, t.shape[-1], t.shape[-2])
    g = _gauss_1d(win, 1.5)
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    mu_t = _blur(t, g)  # the training set's local statistics, once
    s_tt = _blur(t * t, g) - mu_t**2
    best = torch.empty(len(q), dtype=torch.float64)
    best_idx = torch.empty(len(q), dtype=torch.int64)
    for i in range(len(q)):
        y = q[i : i + 1]
        mu_q = _blur(y, g)
        s_qq = _blur(y * y, g) - mu_q**2
        c = cands[i]
        mu_c = mu_t[c]
        s_qt = _blur(t[c] * y, g) - mu_c * mu_q
        m = ((2 * mu_c * mu_q + c1) * (2 * s_qt + c2)) / ((mu_c**2 + mu_q**2 + c1) * (s_tt[c] + s_qq + c2))
        v = m.mean((1, 2, 3))
        top = int(v.argmax())
        best[i], best_idx[i] = float(v[top]), int(c[top])
    return l2_min.numpy(), l2_idx.numpy(), best.numpy(), best_idx.numpy()


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"p{round(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES} | {"mean": float(np.mean(x))}


def _subsample(n: int, limit: int) -> np.ndarray:
    if limit <= 0 or n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


def memorisation_audit(
    train_real: np.ndarray,
    heldout_real: np.ndarray,
    synth_heldout: np.ndarray,
    synth_train: np.ndarray,
    limit: int = 0,
) -> dict[str, Any]:
    """Nearest real training image (any site) for synthetic and real held-out images; see module docs.

    ``synth_train[i]`` is G(label map of ``train_real[i]``) and ``synth_heldout[i]`` is G(label map of
    ``heldout_real[i]``): the distance to that *own* real image is reported too, with the share of synthetic
    images nearer to some training image than to their own (for training label maps the own image is itself a
    training image, so there the share is of a *different* training image being nearer), and for training
    label maps the share whose nearest training image is their own source. Main shares: fraction of synthetic
    images nearer to a training image than EVERY real held-out image is (L2 below the held-out minimum; SSIM
    above the held-out maximum), and nearer than the median real held-out image.
    """
    groups: dict[str, Any] = {}
    ref = nearest_training(heldout_real, train_real)
    ref_l2, ref_ssim = ref[0], ref[2]
    groups["real_heldout"] = {"n": len(ref_l2), "l2": _quantiles(ref_l2), "ssim": _quantiles(ref_ssim)}
    pairs = (
        ("synthetic_heldout_labels", synth_heldout, heldout_real),
        ("synthetic_training_labels", synth_train, train_real),
    )
    for name, imgs, sources in pairs:
        idx = _subsample(len(imgs), limit)
        l2, l2_i, ss, ss_i = nearest_training(imgs[idx], train_real)
        fake, src = torch.from_numpy(imgs[idx]).double(), torch.from_numpy(sources[idx]).double()
        own_l2 = ((fake - src) ** 2).flatten(1).mean(1).sqrt().numpy()
        own_ssim = ssim(fake, src).numpy()
        if name == "synthetic_training_labels":  # the own image is a training image: compare indices, exactly
            nearer_l2, nearer_ssim = l2_i != idx, ss_i != idx
        else:  # tolerances cover float32 vs float64 rounding
            nearer_l2, nearer_ssim = l2 < own_l2 - 1e-6, ss > own_ssim + 1e-4
        g: dict[str, Any] = {
            "n": len(idx),
            "l2": _quantiles(l2),
            "ssim": _quantiles(ss),
            "share_closer_than_every_real_heldout_l2": float(np.mean(l2 < ref_l2.min())),
            "share_closer_than_every_real_heldout_ssim": float(np.mean(ss > ref_ssim.max())),
            "share_closer_than_median_real_heldout_l2": float(np.mean(l2 < np.median(ref_l2))),
            "share_closer_than_median_real_heldout_ssim": float(np.mean(ss > np.median(ref_ssim))),
            # the real image whose label map G was given (held-out: the real held-out slice; training: the source)
            "own_l2": _quantiles(own_l2),
            "own_ssim": _quantiles(own_ssim),
            "share_nearer_a_training_image_than_own_l2": float(np.mean(nearer_l2)),
            "share_nearer_a_training_image_than_own_ssim": float(np.mean(nearer_ssim)),
        }
        if name == "synthetic_training_labels":
            g["share_nearest_is_own_source_l2"] = float(np.mean(l2_i == idx))
            g["share_nearest_is_own_source_ssim"] = float(np.mean(ss_i == idx))
        groups[name] = g
    return {
        "reference_set": "real training images of all sites",
        "l2": "RMS pixel difference to the nearest training image, images in [-1, 1] (lower = closer)",
        "ssim": "highest SSIM with any training image (higher = closer)",
        "groups": groups,
    }


# ----------------------------------------------------------------------------------------------------------------
# segmentation runs


@dataclass(frozen=True)
class SegTask:
    setting: str
    condition: str
    seed: int
    train: SiteData
    heldout: SiteData
    cfg: SegConfig
    shifted: SiteData | None = None


def _init_worker(threads: int, log_level: int) -> None:
    """Worker process entry: its torch thread budget, and log lines in the parent's format on stderr."""
    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")


def _seg_task(task: SegTask) -> tuple[list[float], list[float] | None]:
    """Train one segmenter; its Dice per class on the held-out set (and on the shifted set, if any)."""
    t = time.perf_counter()
    channels = list(range(len(task.train.modalities)))
    model = train_segmenter(task.train, channels, task.cfg, task.seed)
    dice = [float(d) for d in evaluate_dice(model, task.heldout, channels)]
    shifted = [float(d) for d in evaluate_dice(model, task.shifted, channels)] if task.shifted is not None else None
    log.info(
        "%s %s seed %d: Dice %s%s (%.1f s)",
        task.setting,
        task.condition,
        task.seed,
        " ".join(f"{d:.3f}" for d in dice),
        f"; shifted {np.mean(shifted):.3f}" if shifted is not None else "",
        time.perf_counter() - t,
    )
    return dice, shifted


def _pool(jobs: int, threads: int) -> cf.Executor | None:
    if jobs <= 1:
        return None
    return cf.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(max(1, threads // jobs), logging.getLogger().getEffectiveLevel()),
    )


def _ratio(x: float, y: float) -> float:
    return float(x) / float(y) if y > 0 else 0.0


def _condition_entry(
    label: str, n_train: int, per_seed: list[list[float]], seeds: Sequence[int], shifted: list[list[float]] | None
) -> dict[str, Any]:
    arr = np.asarray(per_seed, dtype=np.float64)  # (seeds, classes)
    means = arr.mean(1)
    extra: dict[str, Any] = {}
    if shifted is not None:
        sm = np.asarray(shifted, dtype=np.float64).mean(1)
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


# ----------------------------------------------------------------------------------------------------------------
# one setting


def _synthetic_sites(sites: list[SiteData], synth: np.ndarray, tag: str) -> list[SiteData]:
    out, start = [], 0
    for s in sites:
        n = len(s)
        out.append(
            SiteData(
                f"{s.name}-{tag}", s.labels, np.ascontiguousarray(synth[start : start + n]), s.modalities, s.num_classes
            )
        )
        start += n
    return out


def evaluate_setting(
    setting: Setting, opts: EvalOptions, pool: cf.Executor | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one setting; returns (its JSON entry, figure material)."""
    setting.validate()
    t0 = time.perf_counter()
    data = load_setting(setting)
    sites, heldout = data.sites, data.heldout
    n_sites = len(sites)
    all_labels = np.concatenate([s.labels for s in sites])
    log.info(
        "%s: %d sites (%s), %d held-out slices, %s px, modalities %s",
        setting.name,
        n_sites,
        ", ".join(str(len(s)) for s in sites),
        len(heldout),
        "x".join(map(str, heldout.labels.shape[1:])),
        ",".join(data.modalities),
    )
    # 1. the two generators (in parallel when there are workers)
    g_threads = max(1, opts.threads // 2) if pool is not None else opts.threads
    args = (sites, heldout, setting, opts.gen_seed, g_threads, all_labels)
    if pool is not None:
        futs = [pool.submit(_generator_task, kind, *args) for kind in ("asyndgan", "centralised")]
        g_async, g_central = (f.result() for f in futs)
    else:
        g_async = _generator_task("asyndgan", *args)
        g_central = _generator_task("centralised", *args)
    gen_wall = time.perf_counter() - t0

    # 2. training sets and segmentation runs
    final = setting.gen_steps
    syn_async = _synthetic_sites(sites, g_async.synth_train[final], "asyndgan")
    syn_central = _synthetic_sites(sites, g_central.synth_train[final], "centralised")
    pooled = pool_sites(sites)
    conditions: dict[str, tuple[str, SiteData]] = {"a": ("pooled real data, all sites", pooled)}
    for j, s in enumerate(sites):
        conditions[f"b{j}"] = (f"real data of {s.name} only", s)
    conditions["c"] = ("AsynDGAN synthetic images, all sites' label maps", pool_sites(syn_async))
    conditions["d"] = ("centralised pix2pix synthetic images, all sites' label maps", pool_sites(syn_central))
    aug_sites = range(n_sites) if opts.augment == "all" else range(1)
    if n_sites > 1:
        for j in aug_sites:
            mix = [sites[i] if i == j else syn_async[i] for i in range(n_sites)]
            conditions[f"e{j}"] = (
                f"real data of {sites[j].name} + AsynDGAN synthetic for the other sites",
                pool_sites(mix),
            )
    for step in g_async.steps:
        if step != final:
            syn = _synthetic_sites(sites, g_async.synth_train[step], f"asyndgan{step}")
            conditions[f"c@{step}"] = (f"AsynDGAN synthetic after {step} G steps", pool_sites(syn))
    tasks = [
        SegTask(setting.name, key, seed, train, heldout, setting.seg, None if "@" in key else data.shifted)
        for key, (_label, train) in conditions.items()
        for seed in opts.seeds
    ]
    t1 = time.perf_counter()
    results = list(pool.map(_seg_task, tasks)) if pool is not None else [_seg_task(t) for t in tasks]
    seg_wall = time.perf_counter() - t1
    by_key: dict[str, list[list[float]]] = {}
    shifted_by_key: dict[str, list[list[float]]] = {}
    for task, (res, shifted) in zip(tasks, results, strict=True):
        by_key.setdefault(task.condition, []).append(res)
        if shifted is not None:
            shifted_by_key.setdefault(task.condition, []).append(shifted)
    cond_json = {
        key: _condition_entry(label, len(train), by_key[key], opts.seeds, shifted_by_key.get(key))
        for key, (label, train) in conditions.items()
        if "@" not in key
    }

    # 3. targets
    a = np.asarray([r["mean"] for r in cond_json["a"]["per_seed"]])
    c = np.asarray([r["mean"] for r in cond_json["c"]["per_seed"]])
    b_means = {k: v["mean"] for k, v in cond_json.items() if k.startswith("b")}
    e_means = {k: v["mean"] for k, v in cond_json.items() if k.startswith("e")}
    a_mean, c_mean = float(a.mean()), float(c.mean())
    targets: dict[str, Any] = {
        "c_over_a": {
            "target": ">= 0.98",
            "value": _ratio(c_mean, a_mean),
            "per_seed": [_ratio(x, y) for x, y in zip(c, a, strict=True)],
            "met": bool(c_mean >= 0.98 * a_mean),
        },
        "c_gt_every_b": {
            "target": "(c) > every (b)",
            "c": c_mean,
            "best_b": max(b_means.values()),
            "met": bool(all(c_mean > v for v in b_means.values())),
        },
    }
    if e_means:
        targets["e_ge_a"] = {
            "target": "(e) >= (a), each choice of the real site",
            "a": a_mean,
            "e": e_means,
            "e_mean": float(np.mean(list(e_means.values()))),
            "met": bool(all(v >= a_mean for v in e_means.values())),
        }

    # 4. curve of (c)/(a) against G training time
    curve = []
    for step, secs in zip(g_async.steps, g_async.seconds, strict=True):
        key = "c" if step == final else f"c@{step}"
        cs = np.asarray([np.mean(r) for r in by_key[key]])
        ratio = np.asarray([_ratio(x, y) for x, y in zip(cs, a, strict=True)])
        curve.append(
            {
                "step": step,
                "generator_seconds": secs,
                "c_mean": float(cs.mean()),
                "c_std": float(cs.std(ddof=1)) if len(cs) > 1 else 0.0,
                "ratio_to_a": float(ratio.mean()),
                "ratio_std": float(ratio.std(ddof=1)) if len(ratio) > 1 else 0.0,
            }
        )

    # 5. image similarity and memorisation
    similarity = {
        "asyndgan": image_similarity(g_async.synth_heldout, heldout.images),
        "centralised": image_similarity(g_central.synth_heldout, heldout.images),
    }
    t2 = time.perf_counter()
    audit_args = {
        g.kind: (pooled.images, heldout.images, g.synth_heldout, g.synth_train[final], opts.audit_limit)
        for g in (g_async, g_central)
    }
    if pool is not None:
        futures = {k: pool.submit(memorisation_audit, *v) for k, v in audit_args.items()}
        memo = {k: f.result() for k, f in futures.items()}
    else:
        memo = {k: memorisation_audit(*v) for k, v in audit_args.items()}
    audit_wall = time.perf_counter() - t2
    entry: dict[str, Any] = {
        "description": setting.description,
        "config": {
            **{k: v for k, v in dataclasses.asdict(setting).items() if k not in ("seg", "site_specs")},
            "site_specs": list(setting.site_specs),
            "segmenter": dataclasses.asdict(setting.seg),
            "centralised_batch": setting.gen_batch * n_sites,
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
            g.kind: {"steps": setting.gen_steps, "seconds": g.seconds[-1], "torch_threads": g.threads}
            for g in (g_async, g_central)
        },
        "conditions": cond_json,
        "targets": targets,
        "curve": curve,
        "similarity": similarity,
        "memorisation": memo,
        "wall_seconds": {
            "generators": round(gen_wall, 1),
            "segmenters": round(seg_wall, 1),
            "audit": round(audit_wall, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    figure = {
        "sites": sites,
        "heldout": heldout,
        "syn_async": syn_async,
        "syn_central": syn_central,
        "held_async": g_async.synth_heldout,
        "held_central": g_central.synth_heldout,
    }
    return entry, figure


# ----------------------------------------------------------------------------------------------------------------
# whole evaluation + reports


def run_evaluation(
    settings: Sequence[Setting], opts: EvalOptions, out: Path | None, argv: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluate every setting; write ``eval.json``, ``eval.md`` and ``eval.png`` under ``out``."""
    if not opts.seeds:
        raise ValueError("at least one seed")
    if opts.augment not in ("all", "first"):
        raise ValueError("augment must be 'all' or 'first'")
    start = time.perf_counter()
    report: dict[str, Any] = {
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
        "with the lossless f32 codec); centralised pix2pix = same trainer, one site holding all sites' pooled data, "
        "batch = per-site batch x number of sites",
        "settings": {},
    }
    figures: dict[str, dict[str, Any]] = {}
    pool = _pool(opts.jobs, opts.threads)
    try:
        for s in settings:
            entry, fig = evaluate_setting(s, opts, pool)
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


def _q(d: dict[str, float]) -> str:
    return f"{d['p50']:.3f} [{d['p5']:.3f}, {d['p95']:.3f}]"


def _pm(d: dict[str, Any], digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _heldout_note(cfg: dict[str, Any]) -> str:
    n = len(cfg.get("heldout_specs") or ())
    return f"pooled from {n} held-out spec(s)" if n else "a contiguous block cut from every site"


def markdown_report(r: dict[str, Any]) -> str:
    """The tables of ``eval.md``."""
    lines = [
        "# Evaluation: segmentation from synthetic vs real training data",
        "",
        f"Generated {r['created']} by `{' '.join(r['command']) or 'asyndgan eval'}` "
        f"({r['seconds']:.0f} s, torch {r['torch_version']}, {r['torch_threads']} threads, {r['jobs']} worker(s)"
        f"{', QUICK smoke-test sizes' if r['quick'] else ''}).",
        "",
        f"Dice: {r['dice']}. Segmenter seeds: {r['seeds']}.",
        "",
        f"Generators: {r['generator_note']}.",
        "",
    ]
    for name, s in r["settings"].items():
        cfg, data = s["config"], s["data"]
        classes = [f"class {k}" for k in range(1, data["num_classes"])]
        seg = cfg["segmenter"]
        site_list = ", ".join(f"{x['name']} ({x['slices']} slices)" for x in data["sites"])
        lines += [
            f"## Setting `{name}`: {s['description']}",
            "",
            f"Sites: {site_list}; held-out: "
            f"{data['heldout_slices']} real slices ({_heldout_note(cfg)}); "
            f"{'x'.join(map(str, data['slice_size']))} px; modalities {', '.join(data['modalities'])}.",
            f"G: {cfg['generator']} ngf={cfg['ngf']}, D ndf={cfg['ndf']}, {cfg['gen_steps']} steps, batch "
            f"{cfg['gen_batch']} per site (centralised: {cfg['centralised_batch']}); AsynDGAN G trained "
            f"{s['generators']['asyndgan']['seconds']:.0f} s, centralised "
            f"{s['generators']['centralised']['seconds']:.0f} s ({s['generators']['asyndgan']['torch_threads']} "
            "thread(s) each).",
            f"Segmenter: U-Net base {seg['base']}, depth {seg['depth']}, {seg['steps']} Adam steps, batch "
            f"{seg['batch_size']}, lr {seg['lr']}, CE + {seg['dice_weight']} x soft Dice. Wall time: "
            f"{s['wall_seconds']['total']:.0f} s.",
            "",
        ]
        shifted = data.get("shifted_slices", 0) > 0
        extra_head, extra_rule = (" mean Dice, unseen scanner |", "---:|") if shifted else ("", "")
        lines += [
            f"| | training data | images | mean Dice | {' | '.join(classes)} |{extra_head}",
            f"|---|---|---:|---:|{'---:|' * len(classes)}{extra_rule}",
        ]
        for key, c in s["conditions"].items():
            per = " | ".join(
                f"{m:.3f} ± {sd:.3f}" for m, sd in zip(c["per_class_mean"], c["per_class_std"], strict=True)
            )
            extra = f" {_pm(c['shifted'])} |" if shifted else ""
            lines.append(f"| ({key}) | {c['label']} | {c['train_images']} | **{_pm(c)}** | {per} |{extra}")
        if shifted:
            lines += [
                "",
                f"Unseen scanner: the same segmenters on {data['shifted_slices']} held-out slices imaged by a "
                "reference scanner that no site has (a domain shift; the targets are judged on the held-out set "
                "above).",
            ]
        t = s["targets"]
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines.append(
            f"| (c) >= 0.98 x (a) | (c)/(a) = {t['c_over_a']['value']:.4f} | "
            f"{'yes' if t['c_over_a']['met'] else '**no**'} |"
        )
        lines.append(
            f"| (c) > every (b) | (c) = {t['c_gt_every_b']['c']:.4f}, best (b) = {t['c_gt_every_b']['best_b']:.4f} | "
            f"{'yes' if t['c_gt_every_b']['met'] else '**no**'} |"
        )
        if "e_ge_a" in t:
            e = ", ".join(f"({k}) {v:.4f}" for k, v in t["e_ge_a"]["e"].items())
            lines.append(
                f"| (e) >= (a) | (a) = {t['e_ge_a']['a']:.4f}; {e} | {'yes' if t['e_ge_a']['met'] else '**no**'} |"
            )
        sim = s["similarity"]
        lines += [
            "",
            "Image similarity, G(held-out label map) vs the real held-out image (images in [-1, 1]; PSNR peak 2):",
            "",
            "| generator | L1 | PSNR (dB) | SSIM |",
            "|---|---:|---:|---:|",
        ]
        for g, v in sim.items():
            lines.append(f"| {g} | {v['l1']:.4f} | {v['psnr']:.2f} | {v['ssim']:.4f} |")
        lines += [
            "",
            "(c)/(a) against AsynDGAN G training time:",
            "",
            "| G steps | G seconds | (c) mean Dice | (c)/(a) |",
            "|---:|---:|---:|---:|",
        ]
        for p in s["curve"]:
            lines.append(
                f"| {p['step']} | {p['generator_seconds']:.0f} | {p['c_mean']:.4f} ± {p['c_std']:.4f} | "
                f"{p['ratio_to_a']:.4f} ± {p['ratio_std']:.4f} |"
            )
        lines += [
            "",
            "Memorisation audit: distance from each image to its nearest real TRAINING image of any site "
            "(L2 = RMS pixel difference, images in [-1, 1], lower = closer; SSIM higher = closer); median "
            "[5 %, 95 %]. *Own* = the real image whose label map G was given (the held-out slice, or the training "
            "source).",
            "",
            "| generator | images | n | nearest-training L2 | nearest-training SSIM | closer than every real "
            "held-out (L2 / SSIM) | closer than the median real held-out (L2 / SSIM) | own L2 | own SSIM |",
            "|---|---|---:|---|---|---|---|---|---|",
        ]
        for g, m in s["memorisation"].items():
            groups = m["groups"]
            for gname in ("real_heldout", "synthetic_heldout_labels", "synthetic_training_labels"):
                if g != "asyndgan" and gname == "real_heldout":
                    continue  # the same row for every generator
                x = groups[gname]
                share = share_m = own_l2 = own_ss = "—"
                if gname != "real_heldout":
                    share = (
                        f"{x['share_closer_than_every_real_heldout_l2']:.0%} / "
                        f"{x['share_closer_than_every_real_heldout_ssim']:.0%}"
                    )
                    share_m = (
                        f"{x['share_closer_than_median_real_heldout_l2']:.0%} / "
                        f"{x['share_closer_than_median_real_heldout_ssim']:.0%}"
                    )
                    own_l2, own_ss = _q(x["own_l2"]), _q(x["own_ssim"])
                who = g if gname != "real_heldout" else "(real)"
                lines.append(
                    f"| {who} | {gname.replace('_', ' ')} | {x['n']} | {_q(x['l2'])} | {_q(x['ssim'])} | "
                    f"{share} | {share_m} | {own_l2} | {own_ss} |"
                )
        for g, m in s["memorisation"].items():
            tr = m["groups"]["synthetic_training_labels"]
            he = m["groups"]["synthetic_heldout_labels"]
            lines += [
                "",
                f"{g}: on training label maps the nearest training image is the very image whose label map G was "
                f"given for {tr['share_nearest_is_own_source_l2']:.0%} (L2) / "
                f"{tr['share_nearest_is_own_source_ssim']:.0%} (SSIM) of them; on held-out label maps "
                f"{he['share_nearer_a_training_image_than_own_l2']:.0%} (L2) / "
                f"{he['share_nearer_a_training_image_than_own_ssim']:.0%} (SSIM) of the synthetic images are nearer to "
                "some training image than to the real held-out slice they depict.",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


# ---- figure (PIL only)

_TILE = 96


def _tile(img: np.ndarray) -> Image.Image:
    if img.dtype == np.uint8:
        rgb = label_rgb(img)
    else:
        g = ((np.clip(img, -1, 1) + 1) * 127.5).round().astype(np.uint8)
        rgb = np.repeat(g[..., None], 3, axis=2)
    return Image.fromarray(rgb).resize(
        (_TILE, _TILE), Image.Resampling.BILINEAR if img.dtype != np.uint8 else Image.Resampling.NEAREST
    )


def _bars(s: dict[str, Any], width: int, height: int) -> Image.Image:
    """Mean Dice ± std per condition, y axis zoomed to the data."""
    im = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(im)
    conds = s["conditions"]
    keys = list(conds)
    lo_data = min(c["mean"] - c["std"] for c in conds.values())
    y0 = max(0.0, math.floor((lo_data - 0.05) * 10) / 10)
    left, right, top, bottom = 40, width - 10, 20, height - 30
    colours = {"a": (60, 60, 60), "b": (150, 150, 150), "c": (40, 110, 200), "d": (220, 130, 40), "e": (90, 170, 90)}

    def ypix(v: float) -> float:
        return bottom - (min(max(v, y0), 1.0) - y0) / (1.0 - y0) * (bottom - top)

    for k in range(11):
        v = y0 + (1 - y0) * k / 10
        y = ypix(v)
        dr.line([(left, y), (right, y)], fill=(230, 230, 230))
        dr.text((2, y - 6), f"{v:.2f}", fill=(0, 0, 0))
    a_y = ypix(conds["a"]["mean"])
    slot = (right - left) / len(keys)
    for i, k in enumerate(keys):
        c = conds[k]
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        dr.rectangle([x0, ypix(c["mean"]), x1, bottom], fill=colours.get(k[0], (0, 0, 0)))
        xm = (x0 + x1) / 2
        dr.line([(xm, ypix(c["mean"] - c["std"])), (xm, ypix(c["mean"] + c["std"]))], fill=(0, 0, 0), width=2)
        dr.text((x0, bottom + 3), f"({k})", fill=(0, 0, 0))
        dr.text((x0 - 2, bottom + 15), f"{c['mean']:.3f}", fill=(0, 0, 0))
    dr.line([(left, a_y), (right, a_y)], fill=(200, 0, 0))
    dr.text((left + 4, 4), "mean Dice on held-out real slices (+- std over seeds); red line: (a)", fill=(0, 0, 0))
    return im


def _curve(s: dict[str, Any], width: int, height: int) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    dr = ImageDraw.Draw(im)
    pts = s["curve"]
    left, right, top, bottom = 40, width - 10, 20, height - 30
    xmax = max(p["generator_seconds"] for p in pts) or 1.0
    lo = min(min(p["ratio_to_a"] for p in pts) - 0.02, 0.95)
    y0 = max(0.0, math.floor(lo * 20) / 20)
    y1 = max(1.02, max(p["ratio_to_a"] for p in pts) + 0.01)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x / xmax * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for v in (0.98, 1.0):
        dr.line([xy(0, v), xy(xmax, v)], fill=(200, 0, 0) if v == 0.98 else (200, 200, 200))
        dr.text((2 if v == 0.98 else 20, xy(0, v)[1] - 6), f"{v:.2f}", fill=(0, 0, 0))
    dr.text((2, xy(0, y0)[1] - 6), f"{y0:.2f}", fill=(0, 0, 0))
    prev = None
    for p in pts:
        q = xy(p["generator_seconds"], p["ratio_to_a"])
        if prev:
            dr.line([prev, q], fill=(40, 110, 200), width=2)
        dr.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=(40, 110, 200))
        dr.text((min(q[0] - 10, width - 34), bottom + 3), f"{p['generator_seconds']:.0f}s", fill=(0, 0, 0))
        prev = q
    dr.text((left + 4, 4), "(c)/(a) vs AsynDGAN G training seconds; red: 0.98", fill=(0, 0, 0))
    return im


def figure_png(report: dict[str, Any], figures: dict[str, dict[str, Any]]) -> bytes:
    """Per setting: per site 2 examples of label | real | AsynDGAN | centralised, the same for held-out
    slices, then the Dice bars and the (c)/(a) curve."""
    blocks: list[Image.Image] = []
    for name, fig in figures.items():
        s = report["settings"][name]
        rows: list[tuple[str, list[np.ndarray]]] = []
        for j, site in enumerate(fig["sites"]):
            idx = np.linspace(0, len(site) - 1, 4).round().astype(int)[1:3]
            panels: list[np.ndarray] = []
            for i in idx:
                panels += [
                    site.labels[i],
                    site.images[i, 0],
                    fig["syn_async"][j].images[i, 0],
                    fig["syn_central"][j].images[i, 0],
                ]
            rows.append((f"{site.name} (training): label | real | AsynDGAN | centralised  x2", panels))
        held = fig["heldout"]
        idx = np.linspace(0, len(held) - 1, 4).round().astype(int)[1:3]
        panels = []
        for i in idx:
            panels += [held.labels[i], held.images[i, 0], fig["held_async"][i, 0], fig["held_central"][i, 0]]
        rows.append(("held-out (never trained on): label | real | AsynDGAN | centralised  x2", panels))
        width = 8 * _TILE
        title_h = 14
        head = 18
        bars_h = 220
        height = head + sum(title_h + _TILE for _ in rows) + bars_h
        block = Image.new("RGB", (width, height), "white")
        dr = ImageDraw.Draw(block)
        dr.text((4, 3), f"setting {name}: {s['description']}", fill=(0, 0, 0))
        y = head
        for title, pans in rows:
            dr.text((4, y + 1), title, fill=(0, 0, 0))
            y += title_h
            for k, p in enumerate(pans):
                block.paste(_tile(p), (k * _TILE, y))
            y += _TILE
        block.paste(_bars(s, width // 2 + 64, bars_h), (0, y))
        block.paste(_curve(s, width // 2 - 64, bars_h), (width // 2 + 64, y))
        blocks.append(block)
    canvas = Image.new(
        "RGB", (sum(b.width for b in blocks) + 10 * (len(blocks) - 1), max(b.height for b in blocks)), "white"
    )
    x = 0
    for b in blocks:
        canvas.paste(b, (x, 0))
        x += b.width + 10
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# command line


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``asyndgan eval`` (the caller adds --threads/--seed/-v or not)."""
    p.add_argument("--setting", action="append", choices=["easy", "hard"], help="embedded settings (default: both)")
    p.add_argument("--sites", type=int, default=3, help="simulated hospitals in the embedded settings")
    p.add_argument(
        "--site", action="append", help="site data spec, repeat per site (custom setting instead of easy/hard)"
    )
    p.add_argument(
        "--heldout",
        action="append",
        help="held-out data spec for --site, repeat to pool several (default: cut a contiguous block from every site)",
    )
    p.add_argument(
        "--shifted",
        action="append",
        help="with --site: a second test set from a domain no site has (e.g. another scanner); Dice only",
    )
    p.add_argument("--holdout-fraction", type=float, default=0.15, help="without --heldout: held-out share per site")
    p.add_argument("--holdout-gap", type=int, default=4, help="without --heldout: slices dropped on each side")
    p.add_argument("--size", type=int, default=None, help="slice size for --site data (embedded settings fix theirs)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (32 px, few steps, one seed)")
    p.add_argument("--seeds", type=int, default=None, help="segmenter seeds 0..N-1 (default 3; quick 1)")
    p.add_argument("--generator-seed", type=int, default=0)
    p.add_argument("--gen-steps", type=int, help="override: generator steps")
    p.add_argument("--gen-batch", type=int, help="override: generator batch per site")
    p.add_argument("--ngf", type=int, help="override: generator width")
    p.add_argument("--ndf", type=int, help="override: discriminator width")
    p.add_argument("--curve-points", type=int, help="override: G snapshots on the (c)/(a) curve")
    p.add_argument("--seg-steps", type=int, help="override: segmenter steps")
    p.add_argument("--seg-batch", type=int, help="override: segmenter batch")
    p.add_argument("--seg-base", type=int, help="override: segmenter width")
    p.add_argument(
        "--augment",
        choices=["all", "first"],
        default=None,
        help="(e) for every site or the first (default all; quick first)",
    )
    p.add_argument("--audit-limit", type=int, default=0, help="at most this many synthetic images per audit group")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (1 = everything in this process)")
    p.add_argument("--out", default="results", help="directory for eval.json, eval.md, eval.png")


def settings_from_args(a: argparse.Namespace) -> list[Setting]:
    if a.site:
        base = Setting(
            "custom",
            f"{len(a.site)} sites from --site specs",
            tuple(a.site),
            tuple(a.heldout or ()),
            size=a.size,
            shifted_specs=tuple(a.shifted or ()),
            holdout_fraction=a.holdout_fraction,
            holdout_gap=a.holdout_gap,
        )
        if a.quick:
            q = default_settings(quick=True)["easy"]
            base = dataclasses.replace(
                base,
                gen_steps=q.gen_steps,
                gen_batch=q.gen_batch,
                ngf=q.ngf,
                ndf=q.ndf,
                curve_points=q.curve_points,
                seg=q.seg,
            )
        chosen = [base]
    else:
        if a.heldout or a.shifted:
            raise ValueError("--heldout and --shifted go with --site")
        defaults = default_settings(quick=a.quick, sites=a.sites)
        chosen = [defaults[n] for n in (a.setting or ["easy", "hard"])]
    out = []
    for s in chosen:
        over: dict[str, Any] = {
            k: v
            for k, v in {
                "gen_steps": a.gen_steps,
                "gen_batch": a.gen_batch,
                "ngf": a.ngf,
                "ndf": a.ndf,
                "curve_points": a.curve_points,
            }.items()
            if v is not None
        }
        seg_over = {
            k: v
            for k, v in {"steps": a.seg_steps, "batch_size": a.seg_batch, "base": a.seg_base}.items()
            if v is not None
        }
        if seg_over:
            over["seg"] = dataclasses.replace(s.seg, **seg_over)
        s = dataclasses.replace(s, **over)
        s.validate()
        out.append(s)
    return out


def cmd_eval(a: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    threads = getattr(a, "threads", 0) or 2
    torch.set_num_threads(threads)
    n_seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    if n_seeds < 1:
        raise ValueError("--seeds must be >= 1")
    opts = EvalOptions(
        seeds=tuple(range(n_seeds)),
        gen_seed=a.generator_seed,
        jobs=a.jobs,
        threads=threads,
        augment=a.augment or ("first" if a.quick else "all"),
        audit_limit=a.audit_limit,
        quick=a.quick,
    )
    report = run_evaluation(settings_from_args(a), opts, Path(a.out), argv)
    for name, s in report["settings"].items():
        t = s["targets"]
        log.info(
            "%s: (a) %s  (c) %s  (d) %s  (c)/(a) %.4f  targets: c>=0.98a %s, c>every b %s, e>=a %s",
            name,
            _pm(s["conditions"]["a"]),
            _pm(s["conditions"]["c"]),
            _pm(s["conditions"]["d"]),
            t["c_over_a"]["value"],
            t["c_over_a"]["met"],
            t["c_gt_every_b"]["met"],
            t.get("e_ge_a", {}).get("met"),
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyndgan.evaluate", description=__doc__.split("\n")[0])
    add_eval_flags(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (split across --jobs workers)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(args)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return cmd_eval(a, ["python", "-m", "asyndgan.evaluate", *args])
    except (DataError, ValueError, OSError) as e:
        print(f"asyndgan eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
