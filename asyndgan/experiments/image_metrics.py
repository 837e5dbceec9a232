"""Image similarity: SSIM (Wang et al. 2004), PSNR and L1 between images in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["blur", "gauss_window", "image_similarity", "psnr", "ssim"]


def gauss_window(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``size`` taps (float32)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region, per channel: (N, C, H, W) -> (N, C, H-k+1, W-k+1)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03), averaged
    over channels. ``x`` and ``y`` are (N, C, H, W) (broadcastable in N) with values spanning ``data_range``."""
    x = x.double()
    y = y.double()
    win = min(win, x.shape[-1], x.shape[-2])
    g = gauss_window(win, sigma).double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x, g), blur(y, g)
    sxx = blur(x * x, g) - mu_x**2
    syy = blur(y * y, g) - mu_y**2
    sxy = blur(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean((1, 2, 3)).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR per image in dB, peak = ``data_range`` (images in [-1, 1] -> 2)."""
    mse = ((x.double() - y.double()) ** 2).mean((1, 2, 3))
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))).float()


def image_similarity(fake: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Mean L1, PSNR (dB) and SSIM between paired (N, C, H, W) images in [-1, 1]."""
    f, r = torch.from_numpy(fake), torch.from_numpy(real)
    return {
        "l1": float((f - r).abs().mean()),
        "psnr": float(psnr(f, r).mean()),
        "ssim": float(ssim(f, r).mean()),
        "n": len(fake),
    }
