"""A hospital's side of AsynDGAN, free of gRPC: data, discriminator(s), batch bookkeeping, checkpoints.

The real images stay in this object. Only label maps (the conditions) and gradients w.r.t. the
generator's synthetic images are handed out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asyndgan.algorithm import SiteTrainer, TrainConfig, training_settings
from asyndgan.codec import LOSSLESS, Codec
from asyndgan.data import SiteData
from asyndgan.errors import FailedPrecondition
from asyndgan.guard import LEDGER_FILE, PrivacyConfig, PrivacyGuard
from asyndgan.io import load_checkpoint, remove_stale_temp, save_checkpoint
from asyndgan.messages import LossTerm, PrivacyState, SiteDescription, SiteStatus, StepAnswer
from asyndgan.nets import NetConfig
from asyndgan.sampling import Batch

__all__ = ["Site"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "discriminator.pt"


class Site:
    """Thread-safe site logic: one outstanding batch at a time; Step must answer the outstanding batch."""

    def __init__(
        self,
        site_id: str,
        data: SiteData,
        net: NetConfig,
        train: TrainConfig,
        *,
        batch_size: int,
        seed: int,
        checkpoint_dir: Path | None = None,
        device: str = "cpu",
        privacy: PrivacyConfig | None = None,
    ) -> None:
        self.site_id = site_id
        self.trainer = SiteTrainer(data, net, train, batch_size=batch_size, seed=seed, device=device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        privacy = privacy or PrivacyConfig()
        self.guard: PrivacyGuard | None = None
        if privacy.guarded:
            ledger = privacy.ledger or (self.checkpoint_dir / LEDGER_FILE if self.checkpoint_dir else None)
            if ledger is None:
                raise ValueError("--privacy dp keeps a budget ledger: give --privacy-ledger or --checkpoint-dir")
            self.guard = PrivacyGuard(privacy, data, site_id, batch_size, ledger, self.trainer.device)
            self.trainer.guard = self.guard
        else:
            log.warning(
                "site %s runs UNGUARDED (--privacy none): the gradients it returns let the generator's operator "
                "rebuild its training images (docs/privacy.md)",
                site_id,
            )
        if self.checkpoint_dir is not None:
            remove_stale_temp(self.checkpoint_dir / CHECKPOINT_FILE)
        self._lock = threading.Lock()
        self._outstanding: Batch | None = None
        # Sampler state before the outstanding batch was drawn: a checkpoint redraws the same batch.
        self._pre_batch_state: dict[str, Any] | None = None
        _, h, w = data.labels.shape
        self._geometry = (len(data), tuple(data.modalities), h, w, data.num_classes, batch_size)
        self.settings = training_settings(net, train)

    @property
    def description(self) -> SiteDescription:
        n, modalities, h, w, k, b = self._geometry
        return SiteDescription(self.site_id, n, modalities, h, w, k, b, privacy=self.privacy(), settings=self.settings)

    def privacy(self) -> PrivacyState:
        return self.guard.state() if self.guard is not None else PrivacyState()

    @property
    def steps(self) -> int:
        return self.trainer.steps

    @property
    def last_losses(self) -> list[LossTerm]:
        return self.trainer.last_losses

    def _draw(self) -> Batch:
        self._pre_batch_state = self.trainer.sampler.state_dict()
        self._outstanding = self.trainer.next_batch()
        return self._outstanding

    def next_batch(self) -> Batch:
        """The outstanding batch (drawn if there is none). Idempotent, so a reconnecting generator and a
        resumed one see the batch an uninterrupted run would have used."""
        with self._lock:
            return self._outstanding or self._draw()

    def status(self) -> SiteStatus:
        return SiteStatus(self.site_id, self.steps, list(self.last_losses), serving=True, privacy=self.privacy())

    def step(
        self, batch_id: int, fakes: torch.Tensor, channels: Sequence[str], grad_codec: Codec = LOSSLESS
    ) -> StepAnswer:
        """Train on the outstanding batch with the generator's fakes; return the gradient (exactly what
        ``grad_codec`` will carry, with error feedback) and the next batch."""
        with self._lock:
            batch = self._outstanding
            if batch is None:
                raise FailedPrecondition("no outstanding batch: call NextBatch first")
            if batch_id != batch.id:
                raise FailedPrecondition(f"batch {batch_id} is not the outstanding batch {batch.id}")
            grad = self.trainer.step(batch, fakes, channels, grad_codec)
            nxt = self._draw()
            spent = self.guard.ledger.spent() if self.guard is not None else 0.0
            return StepAnswer(batch.id, grad, list(self.trainer.last_losses), nxt.id, nxt.labels, spent)

    def close(self) -> None:
        """Release the privacy ledger (it is always up to date on disk)."""
        if self.guard is not None:
            self.guard.ledger.close()

    # -- checkpoints (site-local only) --------------------------------------------------------------

    def checkpoint(self) -> Path | None:
        """Write D(s), optimizers, sampler state and the error-feedback residual atomically to the site's
        checkpoint dir."""
        if self.checkpoint_dir is None:
            return None
        with self._lock:
            state = self.trainer.state_dict()
            if self._pre_batch_state is not None:
                state["sampler"] = self._pre_batch_state
            state["redraw"] = self._outstanding is not None
            state["site_id"] = self.site_id
            path = self.checkpoint_dir / CHECKPOINT_FILE
            save_checkpoint(path, state)
        log.info("checkpoint written at step %d", state["steps"])
        return path

    def restore(self) -> bool:
        """Load the checkpoint if there is one; returns whether it did."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / CHECKPOINT_FILE).exists():
            return False
        state = load_checkpoint(self.checkpoint_dir / CHECKPOINT_FILE)
        if state.get("site_id") != self.site_id:
            raise ValueError(f"checkpoint belongs to site {state.get('site_id')!r}, not {self.site_id!r}")
        with self._lock:
            self.trainer.load_state_dict(state)
            self._outstanding = None
            if state.get("redraw"):
                self._draw()
        log.info("resumed from checkpoint at step %d", self.trainer.steps)
        return True
