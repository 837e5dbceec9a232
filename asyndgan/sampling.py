"""What a site trains on: seeded epoch-wise batches of its own slices, augmented label map and image together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asyndgan.data import SiteData

__all__ = ["Batch", "BatchSampler", "augment"]


@dataclass
class Batch:
    """One batch drawn at a site. ``real`` never leaves the site; ``labels`` do."""

    id: int
    labels: torch.Tensor  # (B, H, W) uint8
    real: torch.Tensor  # (B, M, H, W) float32 in [-1, 1]


def augment(
    labels: np.ndarray, images: np.ndarray, rng: np.random.Generator, flip: bool, max_shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's augmentation, applied to label maps (B, H, W) and images (B, M, H, W) together: a random
    horizontal flip, then a random shift of up to ``max_shift`` pixels (labels padded with 0, images with -1)."""
    b = len(labels)
    if flip:
        flips = rng.random(b) < 0.5
        labels = np.where(flips[:, None, None], labels[:, :, ::-1], labels)
        images = np.where(flips[:, None, None, None], images[:, :, :, ::-1], images)
    if max_shift and b:
        s = max_shift
        shifts = rng.integers(-s, s + 1, size=(b, 2))
        lab_p = np.pad(labels, ((0, 0), (s, s), (s, s)), constant_values=0)
        img_p = np.pad(images, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=-1.0)
        h, w = labels.shape[1:]
        labels = np.stack([lab_p[i, s + dy : s + dy + h, s + dx : s + dx + w] for i, (dy, dx) in enumerate(shifts)])
        images = np.stack([img_p[i, :, s + dy : s + dy + h, s + dx : s + dx + w] for i, (dy, dx) in enumerate(shifts)])
    return (
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
    )


class BatchSampler:
    """Seeded epoch-wise sampling with site-side augmentation applied to label map and image together."""

    def __init__(self, data: SiteData, batch_size: int, seed: int, flip: bool = True, max_shift: int = 2):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.data = data
        self.batch_size = batch_size
        self.flip = flip
        self.max_shift = max_shift
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._order = np.empty(0, dtype=np.int64)
        self._pos = 0
        self.next_id = 1

    def _indices(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            if self._pos >= len(self._order):
                self._order = self.rng.permutation(len(self.data))
                self._pos = 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            out.append(take)
        return np.concatenate(out)

    def next(self) -> Batch:
        idx = self._indices()
        labels, images = augment(self.data.labels[idx], self.data.images[idx], self.rng, self.flip, self.max_shift)
        batch = Batch(self.next_id, labels, images)
        self.next_id += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": json.dumps(self.rng.bit_generator.state),
            "order": torch.from_numpy(self._order.copy()),
            "pos": self._pos,
            "next_id": self.next_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])
        self._order = state["order"].numpy().astype(np.int64)
        self._pos = int(state["pos"])
        self.next_id = int(state["next_id"])
