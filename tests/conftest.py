"""Shared fixtures: small, deterministic site data and thread settings."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from asyndgan.data import SiteData


def make_site(
    name: str = "toy", n: int = 12, size: int = 32, modalities: tuple[str, ...] = ("t1",), seed: int = 0
) -> SiteData:
    """Blobby 4-class label maps; each modality renders the classes with its own intensities + noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = np.hypot(yy - cy, xx - cx)
        labels[i][r < size * 0.4] = 1
        labels[i][r < size * 0.3] = 2
        labels[i][r < size * 0.15] = 3
    levels = {"t1": [-1.0, -0.2, 0.3, 0.8], "t2": [-1.0, 0.8, 0.2, -0.4]}
    chans = [np.asarray(levels.get(m, [-1, 0, 0.5, 1]), np.float32)[labels] for m in modalities]
    images = np.clip(np.stack(chans, 1) + rng.normal(0, 0.05, (n, len(modalities), size, size)), -1, 1)
    return SiteData(name, labels, images.astype(np.float32), tuple(modalities), 4)


@pytest.fixture
def toy_site() -> SiteData:
    return make_site()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Bit-for-bit comparisons run with one intra-op thread (float reductions depend on the split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
