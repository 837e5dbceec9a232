"""The central generator G of AsynDGAN as plain code: one call to :meth:`GeneratorTrainer.step` is one G step
(forward, the sites' round trip through an :class:`asyndgan.algorithm.Exchange`, the weighted backward pass).
No gRPC here; the in-process trainer and the generator service both call it."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from asyndgan.algorithm import Dropped, Exchange, StepOutcome, TrainConfig, adam
from asyndgan.errors import BadRequest, FailedPrecondition
from asyndgan.messages import LossTerm, StepAnswer
from asyndgan.nets import NetConfig, build_generator, one_hot, style_condition

__all__ = ["GeneratorTrainer"]


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
        styles: Sequence[str] = (),
    ) -> None:
        """``styles``: site names; when given, G also takes the site whose scanner it renders (one constant
        input plane per site), and every step and Synthesize says which."""
        net.validate()
        train.validate()
        if pipeline and stale:
            raise ValueError("choose the pipelined or the stale step, not both")
        if len(set(styles)) != len(styles):
            raise ValueError("style (site) names must be unique")
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.modalities = tuple(modalities)
        self.styles = tuple(styles)
        cond_channels = num_classes + len(self.styles)
        self.G = build_generator(net, cond_channels, len(self.modalities), seed, image_size).to(self.device)
        self.opt = adam(self.G.parameters(), train.lr_g, train)
        self.ema = train.ema
        # What synthesize() serves: G, or a moving average of G's weights (not trained, never sent to a site).
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False) if self.ema else None
        self.max_grad_norm = max_grad_norm
        self.pipeline = pipeline
        self.stale = stale
        # stale step: the last batch's labels, site sizes, gradients (None: left out) and styles, applied next step
        self._held: tuple[list[torch.Tensor], list[int], list[torch.Tensor | None], list[int]] | None = None
        self.steps = 0
        # Held for a whole step (forward, exchange, backward) and by readers of G (Synthesize, checkpoints).
        self.lock = threading.RLock()

    def forward(self, labels: torch.Tensor, styles: torch.Tensor | None = None) -> torch.Tensor:
        """G(one_hot(labels)) (+ each row's style, a (B,) tensor of indices into :attr:`styles`); the autograd
        graph is kept for :meth:`step`."""
        return self._run(self.G, labels, styles)

    def _run(self, net: nn.Module, labels: torch.Tensor, styles: torch.Tensor | None) -> torch.Tensor:
        cond = one_hot(labels.to(self.device), self.num_classes)
        if self.styles:
            rows = styles if styles is not None else torch.arange(len(labels)) % len(self.styles)
            cond = style_condition(cond, rows, len(self.styles))
        return net(cond)

    def style_index(self, name: str) -> int:
        """The index of style (site) ``name``: FailedPrecondition for a G without styles, BadRequest (a
        ValueError) for a name G does not render."""
        if not self.styles:
            raise FailedPrecondition(f"this generator was trained without site styles; it cannot render {name!r}")
        if name not in self.styles:
            raise BadRequest(f"unknown style {name!r}: this generator renders {', '.join(self.styles)}")
        return self.styles.index(name)

    @torch.no_grad()
    def synthesize(self, labels: torch.Tensor, style: int | torch.Tensor | None = None) -> torch.Tensor:
        """Images for downstream use: from the weight average when ``ema`` is set, else from G. A G with
        styles renders every row in ``style`` (an index, or one per row), or, when None, row i in style
        i mod (number of styles)."""
        rows = torch.full((len(labels),), style, dtype=torch.long) if isinstance(style, int) else style
        with self.lock:
            served = self.G_ema if self.G_ema is not None else self.G
            return self._run(served, labels, rows).cpu()

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

    def step(
        self,
        labels: Sequence[torch.Tensor],
        sizes: Sequence[int],
        exchange: Exchange,
        styles: Sequence[int] | None = None,
    ) -> StepOutcome:
        """One G step: forward, send every site its images, take the answers, backpropagate
        sum_j w_j * grad_j, step. ``sizes`` are the sites' sample counts n_j; ``styles`` their style indices
        (a G with styles; default: site j is style j). A site whose gradient is unusable is left out
        (``Dropped("bad_gradient")``). Aggregation runs in site order, never arrival order.

        By default one forward and one backward pass cover all sites. With ``pipeline`` G forwards and sends
        each site in turn (site j computes while G forwards site j+1) and backpropagates each gradient, weighted
        n_j, as soon as it is there; the sum is divided by the n of the sites that answered. Per-sample G
        (instance norm, no dropout) makes that the same step; it trades G's batch efficiency for overlap.

        With ``stale`` (opt-in; it changes the algorithm) G applies each batch's gradients one step late: it
        sends this batch's images, then backpropagates the previous batch's gradients through G's current
        weights and steps while the sites work, and holds this batch's answers for the next step."""
        styles = list(range(len(labels))) if styles is None else list(styles)
        with self.lock:
            if self.stale:
                results, total = self._stale(labels, sizes, exchange, styles)
            elif self.pipeline:
                results, total = self._pipelined(labels, sizes, exchange, styles)
            else:
                results, total = self._batched(labels, sizes, exchange, styles)
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

    def _forward_all(self, labels: Sequence[torch.Tensor], styles: Sequence[int]) -> torch.Tensor:
        """G over the sites' batches concatenated, each row in its site's style (a G with styles)."""
        rows = None
        if self.styles:
            rows = torch.repeat_interleave(torch.tensor(styles), torch.tensor([len(t) for t in labels]))
        return self.forward(torch.cat(list(labels)), rows)

    def _batched(
        self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange, styles: Sequence[int]
    ) -> tuple[list[StepAnswer | Dropped], int]:
        """All sites in one forward and one backward pass; G's gradients are left in place (none if no answer)."""
        fakes = self._forward_all(labels, styles)
        parts = list(fakes.split([int(t.shape[0]) for t in labels]))
        for j, part in enumerate(parts):
            exchange.send(j, part.detach().cpu())
        results = [self._usable(exchange.answer(j), p) for j, p in enumerate(parts)]
        return results, self._backward(fakes, labels, self._grads(results), sizes)

    def _stale(
        self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange, styles: Sequence[int]
    ) -> tuple[list[StepAnswer | Dropped], int]:
        """Send this batch (forward without a graph); apply the held batch while the sites work; hold this one."""
        with torch.no_grad():
            fakes = self._forward_all(labels, styles)
        parts = list(fakes.split([int(t.shape[0]) for t in labels]))
        for j, part in enumerate(parts):
            exchange.send(j, part.cpu())
        if self._held is not None:
            held_labels, held_sizes, held_grads, held_styles = self._held
            held_fakes = self._forward_all(held_labels, held_styles)
            if self._backward(held_fakes, held_labels, held_grads, held_sizes):
                self._optimizer_step()
            self._held = None
        results = [self._usable(exchange.answer(j), p) for j, p in enumerate(parts)]
        total = sum(n for n, r in zip(sizes, results, strict=True) if isinstance(r, StepAnswer))
        if total:
            grads = [None if g is None else g.cpu() for g in self._grads(results)]
            self._held = ([t.cpu() for t in labels], list(sizes), grads, list(styles))
        return results, total

    def _pipelined(
        self, labels: Sequence[torch.Tensor], sizes: Sequence[int], exchange: Exchange, styles: Sequence[int]
    ) -> tuple[list[StepAnswer | Dropped], int]:
        """Per site: forward and send, then backward each answer on arrival; G's gradients are left in place."""
        fakes = []
        for j, lab in enumerate(labels):
            fakes.append(self._forward_all([lab], [styles[j]]))
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
            "styles": list(self.styles),
            "torch_rng": torch.get_rng_state(),
            **({"held": self._held} if self._held is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["modalities"]) != list(self.modalities) or state["num_classes"] != self.num_classes:
            raise ValueError("checkpoint was trained for other modalities or classes")
        if tuple(state.get("styles", ())) != self.styles:  # checkpoints from before styles have none
            have = ", ".join(state.get("styles", ())) or "none"
            raise ValueError(f"checkpoint renders the site styles {have}, not {', '.join(self.styles) or 'none'}")
        self.G.load_state_dict(state["G"])
        if self.G_ema is not None:  # a checkpoint from a run without the average starts it from G
            self.G_ema.load_state_dict(state.get("G_ema", state["G"]))
        self.opt.load_state_dict(state["opt"])
        self.steps = int(state["steps"])
        torch.set_rng_state(state["torch_rng"])
        held = state.get("held")  # a stale run's batch not yet applied (without styles before they existed)
        if held is not None and len(held) == 3:
            held = (*held, list(range(len(held[0]))))
        if held is not None and not self.stale:
            raise ValueError("checkpoint of a --stale run holds a batch not yet applied: resume it with --stale")
        self._held = held
