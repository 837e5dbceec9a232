"""The site's privacy guard (``--privacy dp``): what leaves the site is a function of the label maps
(declared public), a differentially private discriminator and the generator's own images.

Per step, for each modality's discriminator D:

1. The ledger is charged first (write-ahead): a step that would exceed the hospital's (epsilon, delta) raises
   :class:`~asyndgan.errors.BudgetExhausted` and nothing is computed.
2. D's loss on real images uses a Poisson sample of *subjects* (rate q, from an unpredictable source), one
   augmented example per sampled subject, drawn apart from the label maps sent to the generator; its gradient is
   DP-SGD: per-sample clipping to C, Gaussian noise N(0, sigma^2 C^2), divided by the expected batch q*n.
   D's loss on the generator's fakes uses no private data and is added as is.
3. The gradient returned to the generator is that of lambda_G * (GAN + anchor_weight * L1(fake, anchor)) with the
   updated D. The *anchor* is the label map painted with per-class mean intensities that the site released once
   under DP (a Gaussian mechanism on per-subject class means, kept in the ledger so a restart reuses it): no L1
   against the real image, no loss on real data. The gradient is post-processing of DP components and costs no
   further budget.

The losses reported are D's on the fakes and G's GAN and anchor terms; nothing computed on real images leaves the
site unnoised. One step of one D is one Poisson-subsampled Gaussian mechanism, the class means one Gaussian
mechanism; the accountant (RDP, add/remove one subject) composes them. See docs/privacy.md.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from asyndgan.algorithm import SiteTrainer, TrainConfig
from asyndgan.data import SiteData
from asyndgan.errors import BudgetExhausted
from asyndgan.messages import LossTerm, PrivacyState
from asyndgan.nets import gan_loss, one_hot
from asyndgan.privacy.accountant import Segment, epsilon
from asyndgan.privacy.dpsgd import accumulate_grads, dp_sgd_gradients, gan_real_loss
from asyndgan.privacy.ledger import PrivacyLedger
from asyndgan.privacy.sampling import PoissonSubjectSampler, secure_generator, secure_rng
from asyndgan.sampling import augment

__all__ = ["LEDGER_FILE", "MODES", "PrivacyConfig", "PrivacyGuard", "calibrate_after", "class_means"]

log = logging.getLogger(__name__)

MODES = ("dp", "none")
LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class PrivacyConfig:
    """A hospital's privacy settings. ``noise_multiplier`` 0 = the smallest sigma that lets ``planned_steps``
    steps fit the budget; ``sample_size`` 0 = the site's batch size (expected subjects per D step)."""

    mode: str = "dp"
    epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    planned_steps: int = 1000
    clip: float = 1.0
    sample_size: int = 0
    anchor_weight: float = 10.0  # weight of L1(fake, DP class-mean anchor) in the returned gradient; 0 = GAN only
    stats_noise: float = 10.0  # noise multiplier of the one-off class-mean release
    ledger: Path | None = None  # default: privacy-ledger.json beside the site's checkpoint
    insecure_seed: int | None = None  # tests only: makes sampling and noise reproducible (and predictable)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--privacy must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "none":
            return
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError("--privacy-epsilon must be a finite number > 0")
        if not 0 < self.delta < 1:
            raise ValueError("--privacy-delta must be in (0, 1)")
        if self.noise_multiplier < 0 or self.planned_steps < 1 or self.clip <= 0 or self.sample_size < 0:
            raise ValueError("privacy noise must be >= 0, planned steps >= 1, clip > 0 and sample size >= 0")
        if self.anchor_weight < 0 or self.stats_noise <= 0:
            raise ValueError("the anchor weight must be >= 0 and the statistics' noise > 0")

    @property
    def guarded(self) -> bool:
        return self.mode != "none"


class PrivacyGuard:
    """DP-SGD for a site's discriminators and the write-ahead budget ledger; see the module docstring."""

    def __init__(
        self, cfg: PrivacyConfig, data: SiteData, site_id: str, batch_size: int, ledger: Path, device: torch.device
    ) -> None:
        cfg.validate()
        n = data.num_subjects
        if cfg.delta >= 1 / n:
            raise ValueError(f"--privacy-delta {cfg.delta:g} must be below 1/n = 1/{n} subjects")
        expected = cfg.sample_size or batch_size
        if expected >= n:
            raise ValueError(f"the DP sample ({expected} subjects per step) must be smaller than the {n} subjects")
        self.cfg, self.data = cfg, data
        self.q = expected / n
        release: Segment = (1.0, cfg.stats_noise, 1)
        self.sigma = cfg.noise_multiplier or calibrate_after(release, self.q, cfg.planned_steps, cfg.epsilon, cfg.delta)
        seed = cfg.insecure_seed
        self.sampler = PoissonSubjectSampler(data.subjects, self.q, secure_rng(seed))
        self.aug_rng = secure_rng(None if seed is None else seed + 1)
        self.noise = secure_generator(None if seed is None else seed + 2, device)
        self.ledger = PrivacyLedger.open(ledger, site_id, cfg.epsilon, cfg.delta)
        try:
            self.class_means = self._release_class_means(seed, device)
        except BaseException:
            self.ledger.close()
            raise
        self.exhausted = self.ledger.remaining_steps(self.q, self.sigma) < len(data.modalities)
        if seed is not None:
            log.warning("privacy guard seeded with --privacy-insecure-seed: noise and sampling are predictable")
        log.info(
            "privacy guard: DP-SGD on %d subjects, q=%.4g, sigma=%.3g, clip %g; epsilon %.3g of %g spent (delta %g)",
            n,
            self.q,
            self.sigma,
            cfg.clip,
            self.ledger.spent(),
            cfg.epsilon,
            cfg.delta,
        )

    def _release_class_means(self, seed: int | None, device: torch.device) -> torch.Tensor:
        """The (K, M) class-mean table: released once under DP and kept in the ledger (reused on restart)."""
        data, noise = self.data, self.cfg.stats_noise
        k, m = data.num_classes, len(data.modalities)
        rng = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed + 3)
        means = self.ledger.release("class_means", noise, lambda: class_means(data, noise, rng))
        if len(means) != k * m:
            raise ValueError(
                f"privacy ledger {self.ledger.path} holds class means for another data layout "
                f"({len(means)} values, this site has {k} classes x {m} modalities)"
            )
        return torch.tensor(means, dtype=torch.float32, device=device).reshape(k, m)

    def anchor(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, M, H, W): each pixel painted with its class's released mean intensity, per modality."""
        return self.class_means[labels.long()].permute(0, 3, 1, 2)

    def state(self) -> PrivacyState:
        c = self.cfg
        return PrivacyState("dp", c.epsilon, c.delta, self.ledger.spent(), self.exhausted)

    def charge(self, mechanisms: int) -> None:
        """Record ``mechanisms`` steps durably before anything is computed, or raise BudgetExhausted."""
        if self.ledger.remaining_steps(self.q, self.sigma) < mechanisms:
            self.exhausted = True
            raise BudgetExhausted(
                f"epsilon spent {self.ledger.spent():.3g} of {self.cfg.epsilon:g} (delta {self.cfg.delta:g}); "
                "this site answers no further steps"
            )
        for _ in range(mechanisms):
            self.ledger.charge(self.q, self.sigma)

    def real_sample(self, flip: bool, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, images) of one Poisson sample of subjects, augmented (possibly empty)."""
        idx = self.sampler.sample()
        return augment(self.data.labels[idx], self.data.images[idx], self.aug_rng, flip, max_shift)

    def d_real_gradients(self, d: nn.Module, real_inputs: torch.Tensor, train: TrainConfig, mode: str) -> None:
        """Accumulate the DP-SGD gradient of lambda_D * D's loss on ``real_inputs`` into D's ``.grad``."""
        real_loss = gan_real_loss(mode)
        grads = dp_sgd_gradients(
            d,
            lambda pred: train.lambda_d * real_loss(pred),
            (real_inputs,),
            self.cfg.clip,
            self.sigma,
            self.q * self.data.num_subjects,
            self.noise,
        )
        accumulate_grads(d, grads)

    def step(
        self,
        t: SiteTrainer,
        labels: torch.Tensor,
        cond: torch.Tensor,
        fake: torch.Tensor,
        pairs: list[tuple[str, int, int]],
    ) -> tuple[torch.Tensor, list[LossTerm]]:
        """The guarded site step (module docstring): charge, DP update of each D, gradient from DP parts only."""
        self.charge(len(pairs))
        real_labels, real_images = self.real_sample(t.cfg.flip, t.cfg.max_shift)
        cond_real, real = one_hot(real_labels.to(t.device), t.num_classes), real_images.to(t.device)
        mode = t.net_cfg.gan_mode
        losses: list[LossTerm] = []
        for m, c, k in pairs:
            d, opt = t.discriminators[m], t.optimizers[m]
            opt.zero_grad(set_to_none=True)
            self.d_real_gradients(d, torch.cat([cond_real, real[:, k : k + 1]], 1), t.cfg, mode)
            loss_fake = gan_loss(d(torch.cat([cond, fake[:, c : c + 1].detach()], 1)), False, mode)
            (t.cfg.lambda_d * loss_fake).backward()
            opt.step()
            losses.append(LossTerm("D", m, "fake", loss_fake.item()))
        total = fake.new_zeros(())
        anchor = self.anchor(labels.to(t.device))
        for m, c, k in pairs:
            loss_gan = gan_loss(t.discriminators[m](torch.cat([cond, fake[:, c : c + 1]], 1)), True, mode)
            loss_anchor = F.l1_loss(fake[:, c : c + 1], anchor[:, k : k + 1])
            total = total + t.cfg.lambda_g * (loss_gan + self.cfg.anchor_weight * loss_anchor)
            losses += [LossTerm("G", m, "gan", loss_gan.item()), LossTerm("G", m, "anchor", loss_anchor.item())]
        (grad,) = torch.autograd.grad(total, fake)
        losses.append(LossTerm("G", "", "total", total.item()))
        return grad, losses


def calibrate_after(prefix: Segment, q: float, steps: int, target: float, delta: float) -> float:
    """The smallest noise multiplier (to 1e-3) with which ``steps`` DP-SGD steps at rate ``q`` after the ``prefix``
    mechanism stay within epsilon ``target``."""
    if epsilon([prefix], delta) >= target:
        raise ValueError(f"the class-mean release alone spends more than epsilon {target:g}: raise --privacy-epsilon")
    lo, hi = 0.05, 1.0
    while epsilon([prefix, (q, hi, steps)], delta) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise level fits {steps} steps in epsilon {target:g}")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon([prefix, (q, mid, steps)], delta) > target else (lo, mid)
    return hi


def class_means(data: SiteData, noise: float, rng: torch.Generator) -> list[float]:
    """Per (class, modality) mean intensity over subjects, released with the Gaussian mechanism.

    Each subject contributes its own per-class mean (0 where it has no pixel of that class), each in [-1, 1], so
    adding or removing one subject moves the sum by at most sqrt(K * M) in L2; noise N(0, (noise * sqrt(K*M))^2)
    is added to the sum, which is then divided by the (public) number of subjects."""
    k, m = data.num_classes, len(data.modalities)
    ids, inverse = np.unique(data.subjects, return_inverse=True)
    labels = torch.from_numpy(data.labels).long().reshape(len(data), -1)
    images = torch.from_numpy(data.images).reshape(len(data), m, -1).clamp(-1, 1)
    onehot = torch.nn.functional.one_hot(labels, k).double()  # (N, P, K)
    sums = torch.einsum("npk,nmp->nkm", onehot, images.double())  # per example, per class and modality
    counts = onehot.sum(1)  # (N, K)
    subj = torch.from_numpy(inverse)
    s_sum = torch.zeros(len(ids), k, m, dtype=torch.float64).index_add_(0, subj, sums)
    s_cnt = torch.zeros(len(ids), k, dtype=torch.float64).index_add_(0, subj, counts)
    per_subject = torch.where(s_cnt[..., None] > 0, s_sum / s_cnt.clamp(min=1)[..., None], 0.0)
    total = per_subject.sum(0) + torch.randn(k, m, generator=rng, dtype=torch.float64) * noise * math.sqrt(k * m)
    return (total / len(ids)).clamp(-1, 1).flatten().tolist()
