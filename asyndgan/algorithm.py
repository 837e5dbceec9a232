"""The AsynDGAN algorithm as plain code: one site step, one generator step. No gRPC here.

Site j (a hospital) keeps its real images. Per step it receives G's synthetic images for its label maps,
updates its own discriminator(s) on real vs synthetic, then returns only d(loss_G_j)/d(fakes), where
loss_G_j = lambda_G * (GAN(D_j(cond, fake)) + lambda_L1 * L1(fake, real)) uses the *updated* D_j.
The generator backpropagates sum_j w_j * grad_j (w_j = n_j / sum n over the sites that answered) through
the graph it kept and steps. Both the in-process trainer and the gRPC services call these classes.
"""

from __future__ import annotations

import copy
import math
import threading
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
from asyndgan.nets import NetConfig, build_discriminator, build_generator, gan_loss, one_hot
from asyndgan.sampling import Batch, BatchSampler

__all__ = [
    "Dropped",
    "Exchange",
    "GeneratorTrainer",
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


def _adam(params: Any, lr: float, cfg: TrainConfig) -> torch.optim.Adam:
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
        self.optimizers = {m: _adam(d.parameters(), train.lr_d, train) for m, d in self.discriminators.items()}
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


def _total_loss(losses: Sequence[LossTerm]) -> float:
    return next((t.value for t in losses if t.network == "G" and t.term == "total"), math.nan)


class GeneratorTrainer:
    """The central generator G and its optimizer; one call to :meth:`step` is one AsynDGAN G step."""

    def __init__(
        self,
        net: NetConfig,
        train: TrainConfig,
        *,
        num_classes: int,
        modalities: Sequence[str],
        seed: int,
        image_size: int = 64,
        device: torch.device | str = "cpu",
        max_grad_norm: float = math.inf,
        pipeline: bool = False,
        stale: bool = False,
    ) -> None:
        net.validate()
        train.validate()
        if pipeline and stale:
            raise ValueError("choose the pipelined or the stale step, not both")
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.modalities = tuple(modalities)
        self.G = build_generator(net, num_classes, len(self.modalities), seed, image_size).to(self.device)
        self.opt = _adam(self.G.parameters(), train.lr_g, train)
        self.ema = train.ema
        # What synthesize() serves: G, or a moving average of G's weights (not trained, never sent to a site).
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False) if self.ema else None
        self.max_grad_norm = max_grad_norm
        self.pipeline = pipeline
        self.stale = stale
        # stale step: the last batch's labels, site sizes and gradients (None: left out), applied at the next step
        self._held: tuple[list[torch.Tensor], list[int], list[torch.Tensor | None]] | None = None
        self.steps = 0
        # Held for a whole step (forward, exchange, backward) and by readers of G (Synthesize, checkpoints).
        self.lock = threading.RLock()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """G(one_hot(labels)); the autograd graph is kept for :meth:`step`."""
        return self._run(self.G, labels)

    def _run(self, net: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        return net(one_hot(labels.to(self.device), self.num_classes))

    @torch.no_grad()
    def synthesize(self, labels: torch.Tensor) -> torch.Tensor:
        """Images for downstream use: from the weight average when ``ema`` is set, else from G."""
        with self.lock:
            served = self.G_ema if self.G_ema is not None else self.G
            return self._run(served, labels).cpu()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """G_ema <- d * G_ema + (1 - d) * G, with d ramped up as min(ema, (1 + t) / (10 + t)) so that the
        average is not dominated by the random initial weights in a short run."""
        if self.G_ema is None:
            return
        d = min(self.ema, (1 + self.steps) / (10 + self.steps))
        for avg, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            avg.lerp_(p, 1 - d)
        for buf, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            buf.copy_(b)

    def grad_ok(self, grad: torch.Tensor, like: torch.Tensor) -> bool:
        """A site's gradient is usable: right shape, finite, norm within ``max_grad_norm``."""
        if grad.shape != like.shape or not bool(torch.isfinite(grad).all()):
            return False
        return float(torch.linalg.vector_norm(grad)) <= self.max_grad_norm

    def _usable(self, reply: StepAnswer | Dropped, like: torch.Tensor) -> StepAnswer | Dropped:
        if isinstance(reply, StepAnswer) and not self.grad_ok(reply.grad, like):
            return Dropped("bad_gradient", "non-finite, mis-shaped or larger than --max-grad-norm")
        return reply

    def step(self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange) -> StepOutcome:
        """One G step: forward, send every site its images, take the answers, backpropagate
        sum_j w_j * grad_j, step. ``sizes`` are the sites' sample counts n_j. A site whose gradient is unusable
        is left out (``Dropped("bad_gradient")``). Aggregation runs in site order, never arrival order.

        By default one forward and one backward pass cover all sites. With ``pipeline`` G forwards and sends
        each site in turn (site j computes while G forwards site j+1) and backpropagates each gradient, weighted
        n_j, as soon as it is there; the sum is divided by the n of the sites that answered. Per-sample G
        (instance norm, no dropout) makes that the same step; it trades G's batch efficiency for overlap.

        With ``stale`` (opt-in; it changes the algorithm) G applies each batch's gradients one step late: it
        sends this batch's images, then backpropagates the previous batch's gradients through G's current
        weights and steps while the sites work, and holds this batch's answers for the next step."""
        with self.lock:
            if self.stale:
                results, total = self._stale(labels, sizes, exchange)
            elif self.pipeline:
                results, total = self._pipelined(labels, sizes, exchange)
            else:
                results, total = self._batched(labels, sizes, exchange)
            weights = [n / total if isinstance(r, StepAnswer) else 0.0 for n, r in zip(sizes, results, strict=True)]
            outcome = StepOutcome(self.steps, results, weights)
            if total == 0:
                return outcome
            self.steps += 1
            if not self.stale:  # the stale step has already stepped, for the batch before
                self._optimizer_step()
            outcome.generator_loss = sum(
                w * _total_loss(r.losses) for r, w in zip(results, weights, strict=True) if isinstance(r, StepAnswer)
            )
            return outcome

    def _optimizer_step(self) -> None:
        self.opt.step()
        self._update_ema()

    def _backward(
        self,
        fakes: torch.Tensor,
        labels: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        sizes: Sequence[int],
    ) -> int:
        """Backpropagate sum_j n_j * grad_j / sum n_j over the sites with a gradient (None: left out) through
        ``fakes`` (G of the sites' ``labels``, concatenated); returns that sum of n_j (0: nothing done)."""
        total = sum(n for n, g in zip(sizes, grads, strict=True) if g is not None)
        if total:
            parts = fakes.split([int(t.shape[0]) for t in labels])
            weighted = [
                torch.zeros_like(p) if g is None else g.to(self.device, torch.float32) * (n / total)
                for g, p, n in zip(grads, parts, sizes, strict=True)
            ]
            self.opt.zero_grad(set_to_none=True)
            fakes.backward(torch.cat(weighted))
        return total

    @staticmethod
    def _grads(results: Sequence[StepAnswer | Dropped]) -> list[torch.Tensor | None]:
        return [r.grad if isinstance(r, StepAnswer) else None for r in results]

    def _batched(
        self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange
    ) -> tuple[list[StepAnswer | Dropped], int]:
        """All sites in one forward and one backward pass; G's gradients are left in place (none if no answer)."""
        fakes = self.forward(torch.cat(list(labels)))
        parts = list(fakes.split([int(t.shape[0]) for t in labels]))
        for j, part in enumerate(parts):
            exchange.send(j, part.detach().cpu())
        results = [self._usable(exchange.answer(j), p) for j, p in enumerate(parts)]
        return results, self._backward(fakes, labels, self._grads(results), sizes)

    def _stale(
        self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange
    ) -> tuple[list[StepAnswer | Dropped], int]:
        """Send this batch (forward without a graph); apply the held batch while the sites work; hold this one."""
        with torch.no_grad():
            fakes = self.forward(torch.cat(list(labels)))
        parts = list(fakes.split([int(t.shape[0]) for t in labels]))
        for j, part in enumerate(parts):
            exchange.send(j, part.cpu())
        if self._held is not None:
            held_labels, held_sizes, held_grads = self._held
            if self._backward(self.forward(torch.cat(held_labels)), held_labels, held_grads, held_sizes):
                self._optimizer_step()
            self._held = None
        results = [self._usable(exchange.answer(j), p) for j, p in enumerate(parts)]
        total = sum(n for n, r in zip(sizes, results, strict=True) if isinstance(r, StepAnswer))
        if total:
            grads = [None if g is None else g.cpu() for g in self._grads(results)]
            self._held = ([t.cpu() for t in labels], list(sizes), grads)
        return results, total

    def _pipelined(
        self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange
    ) -> tuple[list[StepAnswer | Dropped], int]:
        """Per site: forward and send, then backward each answer on arrival; G's gradients are left in place."""
        fakes = []
        for j, lab in enumerate(labels):
            fakes.append(self.forward(lab))
            exchange.send(j, fakes[-1].detach().cpu())
        self.opt.zero_grad(set_to_none=True)
        results: list[StepAnswer | Dropped] = []
        for j, fake in enumerate(fakes):
            results.append(r := self._usable(exchange.answer(j), fake))
            if isinstance(r, StepAnswer):
                fake.backward(r.grad.to(self.device, torch.float32) * float(sizes[j]))
            fakes[j] = fake.detach()  # the graph is spent or not needed: free it now
        total = sum(n for n, r in zip(sizes, results, strict=True) if isinstance(r, StepAnswer))
        for p in self.G.parameters():
            if total and p.grad is not None:
                p.grad.div_(total)
        return results, total

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            **({"G_ema": self.G_ema.state_dict()} if self.G_ema is not None else {}),
            "opt": self.opt.state_dict(),
            "steps": self.steps,
            "modalities": list(self.modalities),
            "num_classes": self.num_classes,
            "torch_rng": torch.get_rng_state(),
            **({"held": self._held} if self._held is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["modalities"]) != list(self.modalities) or state["num_classes"] != self.num_classes:
            raise ValueError("checkpoint was trained for other modalities or classes")
        self.G.load_state_dict(state["G"])
        if self.G_ema is not None:  # a checkpoint from a run without the average starts it from G
            self.G_ema.load_state_dict(state.get("G_ema", state["G"]))
        self.opt.load_state_dict(state["opt"])
        self.steps = int(state["steps"])
        torch.set_rng_state(state["torch_rng"])
        held = state.get("held")  # a stale run's batch not yet applied
        if held is not None and not self.stale:
            raise ValueError("checkpoint of a --stale run holds a batch not yet applied: resume it with --stale")
        self._held = held
