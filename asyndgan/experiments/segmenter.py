"""A small U-Net segmenter (image -> class logits) and Dice, for the evaluation (:mod:`.evaluation`).

The segmenter is the measuring instrument of the paper's claim: the same network, trained with the same
seeded schedule on different training sets (real, synthetic, mixed), is scored on held-out *real* slices.
Training draws batches with :class:`asyndgan.sampling.BatchSampler` (seeded; flip and shift applied to
label map and image together; optionally random contrast on chosen channels, :func:`random_contrast`),
loss = cross-entropy + ``dice_weight`` x soft Dice over the foreground classes.
Stop rule: every ``val_every`` steps the mean Dice on a validation part of its own training set (every k-th
slice, not trained on) is measured; training stops once ``patience`` checks in a row gained less than ``tol``
over the best so far, or at ``steps``; the best-validated weights are kept. :class:`SegFit` says which.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from asyndgan.data import SiteData
from asyndgan.sampling import BatchSampler

__all__ = [
    "CONTRAST_RANGES",
    "SegConfig",
    "SegFit",
    "SegUNet",
    "class_weights",
    "dice_per_class",
    "evaluate_dice",
    "predict",
    "random_contrast",
    "soft_dice_loss",
    "split_validation",
    "train_segmenter",
]


@dataclass(frozen=True)
class SegConfig:
    """Segmenter size and training schedule (the same for every training set it is compared on)."""

    base: int = 8  # channels at full resolution; doubled per level
    depth: int = 3  # resolution levels (2 halvings at depth 3)
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    dice_weight: float = 1.0
    flip: bool = True
    max_shift: int = 4
    crop: int = 0  # train on random crop x crop patches (0 = whole slices); evaluation always uses whole slices
    intensity: tuple[int, ...] = ()  # positions in ``channels`` given random contrast (:func:`random_contrast`)
    contrast: bool = False  # random contrast on every channel (overrides ``intensity``)
    dropout: float = 0.0  # chance that a sample's augmented channels are zeroed instead (modality dropout)
    norm: str = "batch"  # "batch", "group" (GroupNorm, 4 channels per group) or "instance"
    class_weighting: bool = True  # cross-entropy weights 1/sqrt(class frequency in the training set), mean 1
    val_every: int = 50  # validation Dice every this many steps (0: no validation, train ``steps`` steps)
    val_fraction: float = 0.1  # share of the training slices held back for validation (at least one)
    patience: int = 3  # stop after this many checks in a row without a gain of ``tol``
    tol: float = 0.002  # mean validation Dice

    def validate(self) -> None:
        if self.base < 1 or self.depth < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("segmenter base, depth, steps and batch_size must be >= 1")
        if self.val_every < 0 or not 0 < self.val_fraction < 0.5 or self.patience < 1 or self.tol < 0:
            raise ValueError("segmenter val_every >= 0, val_fraction in (0, 0.5), patience >= 1, tol >= 0")
        if not self.lr > 0 or self.dice_weight < 0 or self.max_shift < 0 or self.crop < 0:
            raise ValueError("segmenter lr must be > 0, dice_weight, max_shift and crop >= 0")
        if any(c < 0 for c in self.intensity) or not 0 <= self.dropout < 1:
            raise ValueError("segmenter intensity channels must be positions >= 0, dropout in [0, 1)")
        if self.norm not in _NORMS:
            raise ValueError(f"unknown segmenter norm {self.norm!r}; choose one of {sorted(_NORMS)}")

    @staticmethod
    def for_task(num_classes: int, size: int, images: int) -> SegConfig:
        """Sized from the task: one more level above 64 px, twice the width above 4 classes, and room for 40
        epochs (600 to 3000 steps at batch 8); the stop rule ends it earlier once validation Dice is flat."""
        steps = min(3000, max(600, math.ceil(40 * images / 8)))
        return SegConfig(base=8 if num_classes <= 4 else 16, depth=3 if size <= 64 else 4, steps=steps)


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "group": lambda c: nn.GroupNorm(max(1, c // 4), c),
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
}


def _double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    nl = _NORMS[norm]
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nl(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nl(cout),
        nn.ReLU(inplace=True),
    )


class SegUNet(nn.Module):
    """Plain U-Net: ``depth`` levels of two 3x3 conv-BN-ReLU, max-pool down, transposed-conv up, skips."""

    def __init__(self, in_ch: int, num_classes: int, base: int = 8, depth: int = 3, norm: str = "batch") -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        prev = in_ch
        for c in chans:
            self.down.append(_double_conv(prev, c, norm))
            prev = c
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(prev, c, 2, stride=2))
            self.merge.append(_double_conv(2 * c, c, norm))
            prev = c
        self.head = nn.Conv2d(prev, num_classes, 1)
        self.halvings = depth - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.halvings
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:  # any input size: pad to a multiple of 2**halvings, crop the logits back
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)[..., :h, :w]


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes 1..K-1 (batch-level sums)."""
    prob = logits.softmax(1)[:, 1:]
    target = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    inter = (prob * target).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + target.sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """1 / sqrt(frequency) per class (absent classes get the largest weight seen), normalised to mean 1."""
    counts = np.bincount(labels.ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    freq = counts / counts.sum()
    w = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-12)), 0.0)
    w[freq == 0] = w.max() if w.max() > 0 else 1.0
    return torch.from_numpy(w / w.mean()).float()


@dataclass
class SegFit:
    """How a segmenter's training ended: steps taken, whether its validation Dice had levelled off (the stop rule
    fired, or its last ``patience`` checks gained less than ``tol``), the best validation Dice and the curve."""

    steps: int = 0
    converged: bool = False
    stopped_early: bool = False
    best_val: float = math.nan
    curve: list[tuple[int, float]] = field(default_factory=list)


def split_validation(data: SiteData, fraction: float) -> tuple[SiteData, SiteData | None]:
    """(training part, validation part): every k-th slice (k = round(1 / fraction)) is held back; None for a
    set of fewer than 4 slices."""
    if len(data) < 4:
        return data, None
    k = max(2, round(1 / fraction))
    val = np.zeros(len(data), bool)
    val[k // 2 :: k] = True

    def part(mask: np.ndarray, tag: str) -> SiteData:
        images = np.ascontiguousarray(data.images[mask])
        return SiteData(f"{data.name}-{tag}", data.labels[mask], images, data.modalities, data.num_classes)

    return part(~val, "train"), part(val, "val")


def _crop(x: torch.Tensor, y: torch.Tensor, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``crop`` x ``crop`` patches (per sample) of images ``x`` and labels ``y``."""
    h, w = y.shape[1:]
    if not crop or (crop >= h and crop >= w):
        return x, y
    ch, cw = min(crop, h), min(crop, w)
    oy, ox = rng.integers(0, h - ch + 1, size=len(y)), rng.integers(0, w - cw + 1, size=len(y))
    at = list(zip(oy, ox, strict=True))
    return (
        torch.stack([x[i, :, a : a + ch, b : b + cw] for i, (a, b) in enumerate(at)]),
        torch.stack([y[i, a : a + ch, b : b + cw] for i, (a, b) in enumerate(at)]),
    )


GAMMA = (0.7, 1.5)  # nnU-Net's gamma augmentation range
BRIGHTNESS = (0.75, 1.25)  # and its multiplicative brightness range
CONTRAST_RANGES = f"gamma {GAMMA[0]}-{GAMMA[1]}, brightness x{BRIGHTNESS[0]}-{BRIGHTNESS[1]}"  # for reports


def random_contrast(
    x: torch.Tensor, chans: Sequence[int], rng: np.random.Generator, dropout: float = 0.0
) -> torch.Tensor:
    """Random scanner contrast on channels ``chans`` of images ``x`` in [-1, 1], drawn per sample and channel:
    ``(x01 ** gamma) * brightness`` on intensities mapped to [0, 1] (log-uniform gamma in :data:`GAMMA`,
    uniform brightness in :data:`BRIGHTNESS`), clipped back to [-1, 1]; with chance ``dropout`` per sample
    those channels are zero instead (as a missing modality is given). Stands in for the contrast of scanners
    the segmenter has not seen (e.g. a modality that G learnt from other hospitals), and keeps it from leaning
    on such a channel alone."""
    if not chans:
        return x
    n, k = len(x), len(chans)
    gamma = np.exp(rng.uniform(np.log(GAMMA[0]), np.log(GAMMA[1]), (n, k)))
    gain = rng.uniform(*BRIGHTNESS, (n, k))
    idx = list(chans)
    x01 = ((x[:, idx] + 1) / 2).clamp(0, 1) ** torch.from_numpy(gamma).float()[..., None, None]
    new = (x01 * torch.from_numpy(gain).float()[..., None, None] * 2 - 1).clamp(-1, 1)
    if dropout:
        new = new * torch.from_numpy(rng.random(n) >= dropout).float()[:, None, None, None]
    out = x.clone()
    out[:, idx] = new
    return out


def train_segmenter(data: SiteData, channels: Sequence[int], cfg: SegConfig, seed: int) -> tuple[SegUNet, SegFit]:
    """Train a fresh :class:`SegUNet` on ``data`` (image channels ``channels``) with Adam, up to ``cfg.steps``
    steps under the stop rule (module docstring); with ``cfg.val_every`` 0 on all of ``data`` for ``cfg.steps``.

    Seeded: the same (data, channels, cfg, seed) gives the same network (on one thread count).
    """
    cfg.validate()
    train, val = split_validation(data, cfg.val_fraction) if cfg.val_every else (data, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegUNet(len(channels), data.num_classes, cfg.base, cfg.depth, cfg.norm)
    sampler = BatchSampler(train, cfg.batch_size, seed, flip=cfg.flip, max_shift=cfg.max_shift)
    weight = class_weights(train.labels, data.num_classes) if cfg.class_weighting else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr * 0.05)
    chan, crop_rng = list(channels), np.random.Generator(np.random.PCG64(seed + 1))
    aug = tuple(range(len(chan))) if cfg.contrast else cfg.intensity
    fit, best_state, ref, flat = SegFit(), None, -math.inf, 0
    model.train()
    for step in range(1, cfg.steps + 1):
        batch = sampler.next()
        x = random_contrast(batch.real[:, chan], aug, crop_rng, cfg.dropout)
        x, y = _crop(x, batch.labels.long(), cfg.crop, crop_rng)
        logits = model(x)
        loss = F.cross_entropy(logits, y, weight=weight)
        if cfg.dice_weight:
            loss = loss + cfg.dice_weight * soft_dice_loss(logits, y, data.num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        fit.steps = step
        if val is None or (step % cfg.val_every and step != cfg.steps):
            continue
        score = float(evaluate_dice(model, val, chan).mean())
        model.train()
        fit.curve.append((step, score))
        if not score <= fit.best_val:  # first check, or a better one: keep these weights
            fit.best_val, best_state = score, copy.deepcopy(model.state_dict())
        ref, flat = (score, 0) if score > ref + cfg.tol else (ref, flat + 1)
        if flat >= cfg.patience:
            fit.converged, fit.stopped_early = True, step < cfg.steps
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, fit


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, C, H, W) float images -> (N, H, W) uint8 predicted classes."""
    model.eval()
    out = [
        model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).argmax(1).to(torch.uint8)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy()


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dataset-level Dice for classes 1..K-1: 2|P∩T| / (|P| + |T|) over all slices; 1.0 where both are empty."""
    out = np.empty(num_classes - 1, dtype=np.float64)
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        denom = int(p.sum()) + int(t.sum())
        out[k - 1] = 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


def evaluate_dice(model: nn.Module, data: SiteData, channels: Sequence[int]) -> np.ndarray:
    """Dice per foreground class of ``model`` on ``data`` (held-out real slices)."""
    pred = predict(model, data.images[:, list(channels)])
    return dice_per_class(pred, data.labels, data.num_classes)
