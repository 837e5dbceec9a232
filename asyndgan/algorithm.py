"""The AsynDGAN algorithm as plain code: one site step, one generator step. No gRPC here.

Site j (a hospital) keeps its real images. Per step it receives G's synthetic images for its label maps,
updates its own discriminator(s) on real vs synthetic, then returns only d(loss_G_j)/d(fakes), where
loss_G_j = lambda_G * (GAN(D_j(cond, fake)) + lambda_L1 * L1(fake, real)) uses the *updated* D_j.
The generator backpropagates sum_j w_j * grad_j (w_j = n_j / sum n over the sites that answered) through
the graph it kept and steps (:class:`asyndgan.generator.GeneratorTrainer`). Both the in-process trainer and
the gRPC services call these classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from asyndgan.codec import LOSSLESS, Codec, roundtrip
from asyndgan.data import SiteData
from asyndgan.errors import SiteStepError
from asyndgan.messages import LossTerm, StepAnswer, TrainingSettings
from asyndgan.nets import NetConfig, build_discriminator, gan_loss, one_hot
from asyndgan.sampling import Batch, BatchSampler

__all__ = [
    "Dropped",
    "Exchange",
    "LossTerm",
    "SiteStepError",
    "SiteTrainer",
    "StepOutcome",
    "TrainConfig",
    "site_seed",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters (pix2pix / AsynDGAN defaults)."""

    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_l1: float = 100.0
    lambda_g: float = 1.0
    lambda_d: float = 0.5
    flip: bool = True
    max_shift: int = 2
    ema: float = 0.0  # G serves an exponential moving average of its weights with this decay (0: G itself)

    def validate(self) -> None:
        for name in ("lr_g", "lr_d", "lambda_g", "lambda_d"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.lambda_l1 < 0 or self.max_shift < 0:
            raise ValueError("lambda_l1 and max_shift must be >= 0")
        if not 0 <= self.ema < 1:
            raise ValueError("ema (decay) must be in [0, 1)")


def site_seed(seed: int, site_index: int) -> int:
    """Seed for site ``site_index`` of a run seeded with ``seed`` (same in-process and distributed)."""
    return (seed * 1_000_003 + 7919 * (site_index + 1)) % (2**31 - 1)


def adam(params: Any, lr: float, cfg: TrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2))


class SiteGuard(Protocol):
    """Replaces the paper's site step by a privacy-preserving one (:class:`asyndgan.guard.PrivacyGuard`)."""

    def step(
        self,
        t: SiteTrainer,
        labels: torch.Tensor,
        cond: torch.Tensor,
        fake: torch.Tensor,
        pairs: list[tuple[str, int, int]],
    ) -> tuple[torch.Tensor, list[LossTerm]]: ...


class SiteTrainer:
    """A hospital's discriminator(s) (one per modality it holds) and their optimizers. Without a ``guard`` the
    step is the paper's (D on real vs fake, then GAN + L1 gradient); with one, the guard's."""

    def __init__(
        self,
        data: SiteData,
        net: NetConfig,
        train: TrainConfig,
        *,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        net.validate()
        train.validate()
        self.data = data
        self.net_cfg = net
        self.cfg = train
        self.device = torch.device(device)
        self.num_classes = data.num_classes
        self.modalities = tuple(data.modalities)
        self.discriminators = nn.ModuleDict(
            {
                m: build_discriminator(net, data.num_classes, 1, seed + 101 * k).to(self.device)
                for k, m in enumerate(self.modalities)
            }
        )
        self.optimizers = {m: adam(d.parameters(), train.lr_d, train) for m, d in self.discriminators.items()}
        self.sampler = BatchSampler(data, batch_size, seed, flip=train.flip, max_shift=train.max_shift)
        self.steps = 0
        self.last_losses: list[LossTerm] = []
        self.guard: SiteGuard | None = None
        # Error feedback: what the gradient codec rounded away last step, carried into the next gradient.
        self.residual: torch.Tensor | None = None

    def next_batch(self) -> Batch:
        return self.sampler.next()

    def check_fakes(self, batch: Batch, fakes: torch.Tensor, channels: Sequence[str]) -> None:
        """Raise SiteStepError unless ``fakes`` fits ``batch`` and names every modality this site holds."""
        b, h, w = batch.labels.shape
        if fakes.dim() != 4 or fakes.shape[0] != b or tuple(fakes.shape[2:]) != (h, w):
            raise SiteStepError(f"fakes have shape {tuple(fakes.shape)}, expected ({b}, C, {h}, {w})")
        if fakes.shape[1] != len(channels):
            raise SiteStepError(f"fakes have {fakes.shape[1]} channels but {len(channels)} modality names")
        if len(set(channels)) != len(channels):
            raise SiteStepError("duplicate modality names")
        missing = [m for m in self.modalities if m not in channels]
        if missing:
            raise SiteStepError(f"generator does not produce modalities this site holds: {missing}")
        if not bool(torch.isfinite(fakes).all()):
            raise SiteStepError("fakes contain NaN or Inf")

    def step(
        self, batch: Batch, fakes: torch.Tensor, channels: Sequence[str], grad_codec: Codec = LOSSLESS
    ) -> torch.Tensor:
        """D update(s), then d(G loss)/d(fakes) with the updated D(s); zeros for channels the site lacks.
        With a lossy ``grad_codec`` the result is exactly what that codec carries (:meth:`feed_back`)."""
        self.check_fakes(batch, fakes, channels)
        cond = one_hot(batch.labels.to(self.device), self.num_classes)
        fake = fakes.detach().to(self.device, torch.float32).requires_grad_(True)
        pairs = [(m, list(channels).index(m), k) for k, m in enumerate(self.modalities)]
        if self.guard is None:
            grad, losses = self._paper_step(batch, cond, fake, pairs)
        else:
            grad, losses = self.guard.step(self, batch.labels, cond, fake, pairs)
        self.steps += 1
        self.last_losses = losses
        return self.feed_back(grad.detach(), grad_codec)

    def feed_back(self, grad: torch.Tensor, grad_codec: Codec) -> torch.Tensor:
        """Error feedback: send ``roundtrip(grad + residual)`` and keep what the codec rounds away for the next
        step, so over the steps G receives the gradients' sum, not their rounded sum. The residual lives in image
        space: image i's residual goes to image i mod B of the next batch (a changed batch size keeps its sum)."""
        if grad_codec.lossless:
            self.residual = None
            return grad
        total = grad
        r = self.residual
        if r is not None and r.shape[1:] == grad.shape[1:]:
            index = torch.arange(r.shape[0], device=r.device) % grad.shape[0]
            total = grad.index_add(0, index.to(grad.device), r.to(grad.device))
        sent = roundtrip(total, grad_codec)
        self.residual = total - sent
        return sent

    def _paper_step(
        self, batch: Batch, cond: torch.Tensor, fake: torch.Tensor, pairs: list[tuple[str, int, int]]
    ) -> tuple[torch.Tensor, list[LossTerm]]:
        """AsynDGAN as published: D on (real, fake), then lambda_G * (GAN + lambda_L1 * L1(fake, real))."""
        cfg, mode = self.cfg, self.net_cfg.gan_mode
        real = batch.real.to(self.device)
        losses: list[LossTerm] = []
        for m, c, k in pairs:
            d, opt = self.discriminators[m], self.optimizers[m]
            opt.zero_grad(set_to_none=True)
            loss_real = gan_loss(d(torch.cat([cond, real[:, k : k + 1]], 1)), True, mode)
            loss_fake = gan_loss(d(torch.cat([cond, fake[:, c : c + 1].detach()], 1)), False, mode)
            loss_d = cfg.lambda_d * (loss_real + loss_fake)
            loss_d.backward()
            opt.step()
            losses += [LossTerm("D", m, "real", loss_real.item()), LossTerm("D", m, "fake", loss_fake.item())]
        total = fake.new_zeros(())
        for m, c, k in pairs:
            fake_m = fake[:, c : c + 1]
            loss_gan = gan_loss(self.discriminators[m](torch.cat([cond, fake_m], 1)), True, mode)
            loss_l1 = F.l1_loss(fake_m, real[:, k : k + 1])
            total = total + cfg.lambda_g * (loss_gan + cfg.lambda_l1 * loss_l1)
            losses += [LossTerm("G", m, "gan", loss_gan.item()), LossTerm("G", m, "l1", loss_l1.item())]
        (grad,) = torch.autograd.grad(total, fake)
        losses.append(LossTerm("G", "", "total", total.item()))
        return grad, losses

    def state_dict(self) -> dict[str, Any]:
        return {
            "discriminators": self.discriminators.state_dict(),
            "optimizers": {m: o.state_dict() for m, o in self.optimizers.items()},
            "sampler": self.sampler.state_dict(),
            "steps": self.steps,
            "modalities": list(self.modalities),
            "residual": self.residual,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["modalities"]) != list(self.modalities):
            raise ValueError(f"checkpoint holds modalities {state['modalities']}, site has {self.modalities}")
        self.discriminators.load_state_dict(state["discriminators"])
        for m, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][m])
        self.sampler.load_state_dict(state["sampler"])
        self.steps = int(state["steps"])
        residual = state.get("residual")  # absent in checkpoints from before error feedback
        self.residual = None if residual is None else residual.to(self.device)


def training_settings(net: NetConfig, train: TrainConfig) -> TrainingSettings:
    """What a site reports (Describe) and the generator requires of every site."""
    return TrainingSettings(
        net.gan_mode, train.lambda_l1, train.lambda_g, train.lr_d, net.discriminator, net.ndf, net.norm
    )


@dataclass(frozen=True)
class Dropped:
    """Why a site is left out of a step: ``reason`` is a short label (deadline, unavailable, error, bad_reply,
    bad_gradient, finished), ``detail`` a readable line."""

    reason: str
    detail: str = ""


class Exchange(Protocol):
    """One step's round trip with the sites, in two halves so that G works while sites answer: ``send(j, fakes)``
    hands site j its images and returns at once; ``answer(j)`` waits for site j's answer, or says why it has none.
    G sends to every site (in site order) before it asks for the first answer."""

    def send(self, j: int, fakes: torch.Tensor) -> None: ...

    def answer(self, j: int) -> StepAnswer | Dropped: ...


@dataclass
class StepOutcome:
    """What one generator step did: per site its answer or why it was left out, the weights, G's loss."""

    step: int
    results: list[StepAnswer | Dropped]
    weights: list[float]
    generator_loss: float = math.nan

    @property
    def answered(self) -> list[bool]:
        """Per site: its gradient counted in this step."""
        return [isinstance(r, StepAnswer) for r in self.results]
