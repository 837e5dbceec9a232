"""The site's privacy guard (``--privacy dp``): what leaves the site is a function of the label maps
(declared public), a differentially private discriminator and the generator's own images.

Per step, for each modality's discriminator D:

1. The ledger is charged first (write-ahead): a step that would exceed the hospital's (epsilon, delta) raises
   :class:`~asyndgan.errors.BudgetExhausted` and nothing is computed.
2. D's loss on real images uses a Poisson sample of *subjects* (rate q, from an unpredictable source), one
   augmented example per sampled subject, drawn apart from the label maps sent to the generator; its gradient is
   DP-SGD: per-sample clipping to C, Gaussian noise N(0, sigma^2 C^2), divided by the expected batch q*n.
   D's loss on the generator's fakes uses no private data and is added as is.
3. The gradient returned to the generator is that of the GAN term with the updated D only (no L1 against the real
   image, no loss on real data): post-processing of D, so it costs no further budget.

The losses reported are D's on the fakes and G's GAN term; nothing computed on real images leaves the site.
One step of one D is one Poisson-subsampled Gaussian mechanism; the accountant (RDP, add/remove one subject)
composes them. See docs/privacy.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from asyndgan.algorithm import SiteTrainer, TrainConfig, augment
from asyndgan.data import SiteData
from asyndgan.errors import BudgetExhausted
from asyndgan.messages import LossTerm, PrivacyState
from asyndgan.nets import gan_loss, one_hot
from asyndgan.privacy.accountant import calibrate_sigma
from asyndgan.privacy.dpsgd import accumulate_grads, dp_sgd_gradients, gan_real_loss
from asyndgan.privacy.ledger import PrivacyLedger
from asyndgan.privacy.sampling import PoissonSubjectSampler, secure_generator, secure_rng

__all__ = ["LEDGER_FILE", "MODES", "PrivacyConfig", "PrivacyGuard"]

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
        self.sigma = cfg.noise_multiplier or calibrate_sigma(self.q, cfg.planned_steps, cfg.epsilon, cfg.delta)
        seed = cfg.insecure_seed
        self.sampler = PoissonSubjectSampler(data.subjects, self.q, secure_rng(seed))
        self.aug_rng = secure_rng(None if seed is None else seed + 1)
        self.noise = secure_generator(None if seed is None else seed + 2, device)
        self.ledger = PrivacyLedger.open(ledger, site_id, cfg.epsilon, cfg.delta)
        self.exhausted = False
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
        self, t: SiteTrainer, cond: torch.Tensor, fake: torch.Tensor, pairs: list[tuple[str, int, int]]
    ) -> tuple[torch.Tensor, list[LossTerm]]:
        """The guarded site step (module docstring): charge, DP update of each D, GAN-only gradient."""
        self.charge(len(pairs))
        labels, images = self.real_sample(t.cfg.flip, t.cfg.max_shift)
        cond_real, real = one_hot(labels.to(t.device), t.num_classes), images.to(t.device)
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
        for m, c, _k in pairs:
            loss_gan = gan_loss(t.discriminators[m](torch.cat([cond, fake[:, c : c + 1]], 1)), True, mode)
            total = total + t.cfg.lambda_g * loss_gan
            losses.append(LossTerm("G", m, "gan", loss_gan.item()))
        (grad,) = torch.autograd.grad(total, fake)
        losses.append(LossTerm("G", "", "total", total.item()))
        return grad, losses
