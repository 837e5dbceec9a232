"""Memorisation audit: how near is each synthetic image to its nearest real TRAINING image, compared with how
near real held-out images are to theirs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from asyndgan.experiments.image_metrics import blur, gauss_window, ssim

__all__ = ["QUANTILES", "memorisation_audit", "nearest_training"]

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def nearest_training(
    queries: np.ndarray, train: np.ndarray, ssim_candidates: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every query image: (min RMS L2 distance, its index, max SSIM, its index) over ``train`` images.

    Pixel space, images in [-1, 1]; RMS L2 = sqrt(mean squared difference) (0.1 = a typical pixel is off by 5 %
    of the range). L2 is exact over all training images; the SSIM maximum too by default, or searched among the
    ``ssim_candidates`` L2-nearest training images only (faster, but the SSIM-nearest image of a noisy real
    slice is not always among its L2-nearest).
    """
    q = torch.from_numpy(queries).float()
    t = torch.from_numpy(train).float()
    d = q[0].numel()
    l2 = torch.cdist(q.flatten(1).double(), t.flatten(1).double()) / math.sqrt(d)
    l2_min, l2_idx = l2.min(1)
    k = len(t) if ssim_candidates <= 0 else min(ssim_candidates, len(t))
    cands = l2.topk(k, dim=1, largest=False).indices
    win = min(11, t.shape[-1], t.shape[-2])
    g = gauss_window(win, 1.5)
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    mu_t = blur(t, g)  # the training set's local statistics, once
    s_tt = blur(t * t, g) - mu_t**2
    best = torch.empty(len(q), dtype=torch.float64)
    best_idx = torch.empty(len(q), dtype=torch.int64)
    for i in range(len(q)):
        y = q[i : i + 1]
        mu_q = blur(y, g)
        s_qq = blur(y * y, g) - mu_q**2
        c = cands[i]
        mu_c = mu_t[c]
        s_qt = blur(t[c] * y, g) - mu_c * mu_q
        m = ((2 * mu_c * mu_q + c1) * (2 * s_qt + c2)) / ((mu_c**2 + mu_q**2 + c1) * (s_tt[c] + s_qq + c2))
        v = m.mean((1, 2, 3))
        top = int(v.argmax())
        best[i], best_idx[i] = float(v[top]), int(c[top])
    return l2_min.numpy(), l2_idx.numpy(), best.numpy(), best_idx.numpy()


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"p{round(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES} | {"mean": float(np.mean(x))}


def _subsample(n: int, limit: int) -> np.ndarray:
    if limit <= 0 or n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


def _audit_group(
    own_is_training: bool,
    imgs: np.ndarray,
    sources: np.ndarray,
    train_real: np.ndarray,
    ref: tuple[np.ndarray, np.ndarray],
    limit: int,
) -> dict[str, Any]:
    """One group of synthetic images ``imgs`` (G of the label maps of ``sources``) against the training images;
    ``ref`` = (L2, SSIM) of the real held-out images to their nearest training image."""
    ref_l2, ref_ssim = ref
    idx = _subsample(len(imgs), limit)
    l2, l2_i, ss, ss_i = nearest_training(imgs[idx], train_real)
    fake, src = torch.from_numpy(imgs[idx]).double(), torch.from_numpy(sources[idx]).double()
    own_l2 = ((fake - src) ** 2).flatten(1).mean(1).sqrt().numpy()
    own_ssim = ssim(fake, src).numpy()
    if own_is_training:  # the own image is a training image: compare indices, exactly
        nearer_l2, nearer_ssim = l2_i != idx, ss_i != idx
    else:  # tolerances cover float32 vs float64 rounding
        nearer_l2, nearer_ssim = l2 < own_l2 - 1e-6, ss > own_ssim + 1e-4
    g: dict[str, Any] = {
        "n": len(idx),
        "l2": _quantiles(l2),
        "ssim": _quantiles(ss),
        "share_closer_than_every_real_heldout_l2": float(np.mean(l2 < ref_l2.min())),
        "share_closer_than_every_real_heldout_ssim": float(np.mean(ss > ref_ssim.max())),
        "share_closer_than_median_real_heldout_l2": float(np.mean(l2 < np.median(ref_l2))),
        "share_closer_than_median_real_heldout_ssim": float(np.mean(ss > np.median(ref_ssim))),
        # the real image whose label map G was given (held-out: the real held-out slice; training: the source)
        "own_l2": _quantiles(own_l2),
        "own_ssim": _quantiles(own_ssim),
        "share_nearer_a_training_image_than_own_l2": float(np.mean(nearer_l2)),
        "share_nearer_a_training_image_than_own_ssim": float(np.mean(nearer_ssim)),
    }
    if own_is_training:
        g["share_nearest_is_own_source_l2"] = float(np.mean(l2_i == idx))
        g["share_nearest_is_own_source_ssim"] = float(np.mean(ss_i == idx))
    return g


def memorisation_audit(
    train_real: np.ndarray,
    heldout_real: np.ndarray,
    synth_heldout: np.ndarray,
    synth_train: np.ndarray,
    limit: int = 0,
) -> dict[str, Any]:
    """Nearest real training image (any site) for synthetic and real held-out images; see module docs.

    ``synth_train[i]`` is G(label map of ``train_real[i]``) and ``synth_heldout[i]`` is G(label map of
    ``heldout_real[i]``): the distance to that *own* real image is reported too, with the share of synthetic
    images nearer to some training image than to their own (for training label maps the own image is itself a
    training image, so there the share is of a *different* training image being nearer), and for training
    label maps the share whose nearest training image is their own source. Main shares: fraction of synthetic
    images nearer to a training image than EVERY real held-out image is (L2 below the held-out minimum; SSIM
    above the held-out maximum), and nearer than the median real held-out image.
    """
    ref = nearest_training(heldout_real, train_real)
    ref_l2, ref_ssim = ref[0], ref[2]
    groups: dict[str, Any] = {
        "real_heldout": {"n": len(ref_l2), "l2": _quantiles(ref_l2), "ssim": _quantiles(ref_ssim)},
        "synthetic_heldout_labels": _audit_group(
            False, synth_heldout, heldout_real, train_real, (ref_l2, ref_ssim), limit
        ),
        "synthetic_training_labels": _audit_group(True, synth_train, train_real, train_real, (ref_l2, ref_ssim), limit),
    }
    return {
        "reference_set": "real training images of all sites",
        "l2": "RMS pixel difference to the nearest training image, images in [-1, 1] (lower = closer)",
        "ssim": "highest SSIM with any training image (higher = closer)",
        "groups": groups,
    }
