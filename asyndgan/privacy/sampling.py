"""Poisson sampling of subjects, and unpredictable random sources for the DP mechanism.

The privacy analysis (see :mod:`asyndgan.privacy.accountant`) assumes that nobody outside the site can predict
which subjects a step uses or which noise it adds, so both random sources are seeded from the operating system's
entropy (:mod:`secrets`) unless a seed is passed explicitly; pass one only in tests.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["PoissonSubjectSampler", "secure_generator", "secure_rng"]


def secure_rng(seed: int | None = None) -> np.random.Generator:
    """numpy Generator seeded with 128 bits from :mod:`secrets`; ``seed`` (tests only) makes it reproducible."""
    entropy = secrets.randbits(128) if seed is None else seed
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=entropy)))


def secure_generator(seed: int | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """torch Generator for the Gaussian noise, seeded with 63 bits from :mod:`secrets` unless ``seed`` is given
    (tests only). ``device`` must match the parameters the noise is added to."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


class PoissonSubjectSampler:
    """Each call to :meth:`sample` includes every distinct subject independently with probability ``q`` and
    returns one uniformly chosen example index per included subject (so one step touches a subject at most
    once; the batch may be empty).

    ``subjects`` gives the subject id of each example (any integer ids). ``rng`` defaults to :func:`secure_rng`.
    """

    def __init__(self, subjects: np.ndarray, q: float, rng: np.random.Generator | None = None) -> None:
        subjects = np.asarray(subjects)
        if subjects.ndim != 1 or subjects.size == 0:
            raise ValueError(f"subjects must be a non-empty 1-D array of subject ids, got shape {subjects.shape}")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"sampling rate q must be in (0, 1], got {q}")
        self.q = float(q)
        self._rng = rng if rng is not None else secure_rng()
        # Group example indices by subject: examples of subject k are _order[_starts[k] : _starts[k] + _counts[k]].
        self._order = np.argsort(subjects, kind="stable")
        _ids, starts, counts = np.unique(subjects[self._order], return_index=True, return_counts=True)
        self._starts = starts.astype(np.int64)
        self._counts = counts.astype(np.int64)

    @property
    def num_subjects(self) -> int:
        return int(self._counts.size)

    @property
    def expected_batch(self) -> float:
        """``q * num_subjects``: the divisor DP-SGD uses instead of the (random, secret) batch size."""
        return self.q * self.num_subjects

    def sample(self) -> np.ndarray:
        """Example indices (int64, possibly empty) of this step's Poisson sample of subjects."""
        included = np.flatnonzero(self._rng.random(self.num_subjects) < self.q)
        if included.size == 0:
            return np.empty(0, dtype=np.int64)
        offsets = self._rng.integers(0, self._counts[included])
        return self._order[self._starts[included] + offsets].astype(np.int64)
