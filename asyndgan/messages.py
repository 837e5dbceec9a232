"""Domain values the generator and the sites exchange, free of protobuf and gRPC.

:mod:`asyndgan.wire` is the only module that turns these into ``asyndgan.v1`` messages and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asyndgan import __version__
from asyndgan.codec import Codec

__all__ = [
    "LossTerm",
    "PrivacyState",
    "SiteDescription",
    "SiteState",
    "SiteStatus",
    "StepAnswer",
    "StepWork",
    "TrainingSettings",
    "TrainingState",
]


@dataclass(frozen=True)
class LossTerm:
    network: str  # "G" or "D"
    modality: str
    term: str
    value: float


@dataclass(frozen=True)
class PrivacyState:
    """A site's guard: ``mode`` "dp" or "none"; budget and spent epsilon at ``delta`` (0 when unguarded)."""

    mode: str = "none"
    epsilon_budget: float = 0.0
    delta: float = 0.0
    epsilon_spent: float = 0.0
    exhausted: bool = False

    @property
    def guarded(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class TrainingSettings:
    """The settings that shape a site's returned gradient; one federation uses one set."""

    gan_mode: str
    lambda_l1: float
    lambda_gan: float
    lr_d: float
    discriminator_net: str
    ndf: int
    norm: str


@dataclass(frozen=True)
class SiteDescription:
    """What a site tells the generator about itself (Describe)."""

    site_id: str
    num_samples: int
    modalities: tuple[str, ...]
    height: int
    width: int
    num_classes: int
    batch_size: int
    version: str = __version__
    privacy: PrivacyState = field(default_factory=PrivacyState)
    settings: TrainingSettings | None = None  # None: the site did not report them


@dataclass(frozen=True)
class StepWork:
    """What the generator sends a site per step: G's images for the site's outstanding batch."""

    batch_id: int
    fakes: torch.Tensor  # (B, C, H, W)
    modalities: tuple[str, ...]  # names of the C channels
    step: int
    grad_codec: Codec
    label_codec: Codec


@dataclass(frozen=True)
class StepAnswer:
    """A site's answer: d(loss)/d(fakes), its loss terms, and the next batch of label maps."""

    batch_id: int
    grad: torch.Tensor
    losses: list[LossTerm]
    next_batch_id: int
    next_labels: torch.Tensor  # (B, H, W) uint8
    epsilon_spent: float = 0.0


@dataclass(frozen=True)
class SiteStatus:
    site_id: str
    steps: int
    last_losses: list[LossTerm]
    serving: bool
    privacy: PrivacyState = field(default_factory=PrivacyState)


@dataclass(frozen=True)
class SiteState:
    """One site as the generator's Status reports it."""

    site_id: str
    address: str
    active: bool
    num_samples: int
    steps_contributed: int
    steps_dropped: int
    last_error: str
    privacy: str = ""
    epsilon_spent: float = 0.0
    finished: bool = False


@dataclass(frozen=True)
class TrainingState:
    """The generator's Status."""

    step: int
    target_steps: int
    training: bool
    sites: list[SiteState]
    modalities: tuple[str, ...]
    height: int
    width: int
    num_classes: int
    generator_loss: float
    wire_bytes_sent: int
    wire_bytes_received: int
    styles: tuple[str, ...] = ()
