"""A virtual population for the embedded data set: ``embedded:icbm152?...&subjects=K[&slices=S][&seed=0]``.

Why: differential privacy protects *subjects*; a site with one template brain and ~75 slices makes any
guarantee a formality. With ``subjects=K`` a site holds ``K`` virtual people, each contributing ``S`` slices.

Subject ``k`` of population ``p`` (``p = j + 1`` for training site ``j``, ``p = 0`` for the held-out split) is
drawn from ``numpy.random.default_rng`` seeded by ``(seed, p, k)``:

* anatomy: a smooth 3D pull-back map applied to the template's label map (nearest neighbour) and images
  (trilinear) together: ``q = c + A (x - c) + t + d(x - c)`` in voxels of the 1.5 mm grid, with ``A`` a small
  rotation (about each axis, sd ``ROTATION_DEG``) times a scale (global ``1 ± SCALE``, per axis
  ``1 ± AXIS_SCALE``), ``t`` a shift (sd ``SHIFT`` voxels) and ``d`` a sum of ``WAVE_TERMS`` random plane
  waves (wavelength ``WAVELENGTH`` voxels, RMS ``DEFORM_RMS`` voxels per component);
* intensity, on top of the scanner's: contrast gamma times ``exp(N(0, GAMMA_JITTER))``, a gain in ``GAIN``,
  an own smooth multiplicative bias field (amplitude in ``SUBJECT_BIAS``), noise sigma times a factor in
  ``NOISE_FACTOR`` (noise seeded by scanner, population and subject);
* slices: ``S`` distinct slice planes drawn from the site's slab(s) (the same positions as without
  ``subjects=``: :func:`~.embedded.embedded_slice_index`, over the requested orientations).

The held-out split (``split=heldout&subjects=K``) has its own population (``p = 0``: other people, other ids)
imaged in the held-out block, by the reference scanner or, with ``scanner=J``, by site ``J``'s scanner (then
the same people as with the reference scanner, imaged by another machine). Subject ids: ``k`` for held-out,
``(j + 1) * SUBJECT_ID_STRIDE + k`` for site ``j``. Rows are ordered by subject, then by (orientation, slice
position). Everything is computed in memory; the same spec gives bit-identical arrays.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .embedded import (
    _SEED,
    AXIS,
    NUM_CLASSES,
    SUBJECT_ID_STRIDE,
    EmbeddedRequest,
    Scanner,
    _template,
    embedded_slice_index,
)
from .spec import DataError, SiteData, resize_square

log = logging.getLogger(__name__)

ROTATION_DEG = 3.0
SCALE = 0.06  # global scale factor drawn uniformly from 1 ± SCALE
AXIS_SCALE = 0.03
SHIFT = 1.5
WAVE_TERMS = 6
WAVELENGTH = (80.0, 160.0)  # voxels (120-240 mm): smooth, no folding
DEFORM_RMS = 1.5  # voxels per component (2.25 mm; 0.75 pixel at size 64)
GAMMA_JITTER = 0.08
GAIN = (0.92, 1.04)
SUBJECT_BIAS = (0.02, 0.06)
NOISE_FACTOR = (0.75, 1.33)
COARSE = 33  # the map and bias are evaluated on a COARSE x COARSE grid per plane, then upsampled bilinearly
CHUNK_PLANES = 256


@dataclass(frozen=True)
class Subject:
    """One virtual subject: a pull-back map (template voxels) and intensity jitter."""

    matrix: np.ndarray  # (3, 3) linear part, about the volume centre
    shift: np.ndarray  # (3,) voxels
    waves: np.ndarray  # (WAVE_TERMS, 3) wave vectors, radians per voxel
    phases: np.ndarray  # (WAVE_TERMS,)
    amps: np.ndarray  # (WAVE_TERMS, 3) voxels
    gamma: float  # multiplies the scanner's gamma
    gain: float
    bias_amplitude: float
    bias_coeffs: np.ndarray  # (9,) as Scanner.bias_coeffs
    noise_factor: float


IDENTITY = Subject(
    np.eye(3), np.zeros(3), np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), 1.0, 1.0, 0.0, np.zeros(9), 1.0
)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def virtual_subject(seed: int, population: int, k: int) -> Subject:
    """Subject ``k`` of population ``population`` (0 = held-out, j + 1 = site j) under ``seed``."""
    rng = np.random.default_rng([_SEED, 3, seed, population, k])
    angles = np.deg2rad(np.clip(rng.normal(0.0, ROTATION_DEG, 3), -3 * ROTATION_DEG, 3 * ROTATION_DEG))
    scale = rng.uniform(1 - SCALE, 1 + SCALE) * rng.uniform(1 - AXIS_SCALE, 1 + AXIS_SCALE, 3)
    shift = np.clip(rng.normal(0.0, SHIFT, 3), -3 * SHIFT, 3 * SHIFT)
    direction = rng.normal(size=(WAVE_TERMS, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    waves = direction * (2 * math.pi / rng.uniform(*WAVELENGTH, (WAVE_TERMS, 1)))
    phases = rng.uniform(0.0, 2 * math.pi, WAVE_TERMS)
    amps = rng.normal(0.0, DEFORM_RMS * math.sqrt(2.0 / WAVE_TERMS), (WAVE_TERMS, 3))
    irng = np.random.default_rng([_SEED, 4, seed, population, k])
    return Subject(
        matrix=_rotation(angles) @ np.diag(scale),
        shift=shift,
        waves=waves,
        phases=phases,
        amps=amps,
        gamma=float(np.exp(np.clip(irng.normal(0.0, GAMMA_JITTER), -3 * GAMMA_JITTER, 3 * GAMMA_JITTER))),
        gain=float(irng.uniform(*GAIN)),
        bias_amplitude=float(irng.uniform(*SUBJECT_BIAS)),
        bias_coeffs=irng.normal(size=9),
        noise_factor=float(np.exp(irng.uniform(*np.log(NOISE_FACTOR)))),
    )


def plane_points(shape: tuple[int, ...], orient: str, pos: float, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Voxel coordinates (len(rows), len(cols), 3) of output pixels (row, col) of the slice at ``pos`` along
    ``orient``, in the display layout of :func:`~.embedded._take` (rotated, centred in a square)."""
    axis = AXIS[orient]
    a_ax, b_ax = (a for a in range(3) if a != axis)
    side = max(shape)
    top, left = (side - shape[b_ax]) // 2, (side - shape[a_ax]) // 2
    r, c = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((*r.shape, 3))
    out[..., axis] = pos
    out[..., a_ax] = c - left
    out[..., b_ax] = (shape[b_ax] - 1) - (r - top)
    return out


def _poly(c: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The second-order bias polynomial of :class:`~.embedded.Scanner` (coefficients x, y, z, x², y², z², xy,
    xz, yz)."""
    return (
        c[0] * x
        + c[1] * y
        + c[2] * z
        + c[3] * x * x
        + c[4] * y * y
        + c[5] * z * z
        + c[6] * x * y
        + c[7] * x * z
        + c[8] * y * z
    )


@functools.lru_cache(maxsize=8)
def _scanner_bias(scanner: Scanner, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, max |poly - mean|) of the scanner's bias polynomial over the volume grid, as ``_bias_field``."""
    if scanner.bias_amplitude == 0.0:
        return 0.0, 1.0
    x, y, z = (np.linspace(-1.0, 1.0, n) for n in shape)
    poly = _poly(np.asarray(scanner.bias_coeffs), x[:, None, None], y[None, :, None], z[None, None, :])
    mean = float(poly.mean())
    return mean, max(float(np.abs(poly - mean).max()), 1e-6)


def _coarse(subject: Subject, planes: list[tuple[str, int]], scanner: Scanner, norm: tuple[float, float]) -> np.ndarray:
    """(len(planes), 4, COARSE, COARSE): grid_sample coordinates (z, y, x, normalised) and the total bias."""
    shape = _template()["labels"].shape
    side = max(shape)
    ticks = np.linspace(0.0, side - 1.0, COARSE)
    p = np.stack([plane_points(shape, o, pos, ticks, ticks) for o, pos in planes])  # (P, G, G, 3)
    dims = np.asarray(shape, dtype=np.float64) - 1.0
    centre = dims / 2.0
    x = p - centre
    q = centre + x @ subject.matrix.T + subject.shift
    if len(subject.phases):
        q = q + np.sin(x @ subject.waves.T + subject.phases) @ subject.amps
    u = 2.0 * q / dims - 1.0
    v = 2.0 * p / dims - 1.0  # scanner frame, [-1, 1] over the volume
    bias = np.ones(p.shape[:3])
    if scanner.bias_amplitude:
        mean, peak = norm
        bias = (
            bias
            + scanner.bias_amplitude * (_poly(np.asarray(scanner.bias_coeffs), *np.moveaxis(v, -1, 0)) - mean) / peak
        )
    if subject.bias_amplitude:
        c = subject.bias_coeffs
        bias = bias * (1.0 + subject.bias_amplitude * _poly(c, *np.moveaxis(v, -1, 0)) / np.abs(c).sum())
    return np.stack([u[..., 2], u[..., 1], u[..., 0], bias], axis=1)


@functools.lru_cache(maxsize=4)
def _volumes(modalities: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The template as grid_sample inputs: labels (1, 1, X, Y, Z) and images (1, M, X, Y, Z), float32."""
    tpl = _template()
    labels = torch.from_numpy(tpl["labels"].astype(np.float32))[None, None]
    images = torch.from_numpy(np.stack([tpl["vols"][m] for m in modalities]).astype(np.float32))[None]
    return labels, images


def site_planes(req: EmbeddedRequest) -> list[tuple[str, int]]:
    """The (orientation, slice position) planes of ``req``'s slab(s), in row order of the template loader."""
    return [
        (o, int(p))
        for o in req.orients
        for p in embedded_slice_index(of=req.of, orient=o, site=req.site, split=req.split)
    ]


def render_population(req: EmbeddedRequest) -> SiteData:
    """``req.subjects`` virtual subjects, ``req.slices`` slices each, as one :class:`SiteData`."""
    assert req.subjects is not None
    t0 = time.perf_counter()
    planes = site_planes(req)
    if req.slices > len(planes):
        raise DataError(
            f"slices={req.slices} is more than the {len(planes)} slice positions of {req.label}'s slab(s); "
            f"use slices<={len(planes)}, fewer sites (of=) or more orientations"
        )
    population = 0 if req.split == "heldout" else int(req.site or 0) + 1
    per_chunk = max(1, CHUNK_PLANES // req.slices)
    labels, images = [], []
    for start in range(0, req.subjects, per_chunk):
        ks = range(start, min(req.subjects, start + per_chunk))
        subjects = [virtual_subject(req.seed, population, k) for k in ks]
        picks = [_pick(req, population, k, len(planes)) for k in ks]
        lab, img = render_subjects(subjects, [[planes[i] for i in pick] for pick in picks], req)
        labels.append(lab)
        images.append(_add_noise(img, req, population, ks, subjects))
    ids = population * SUBJECT_ID_STRIDE + np.arange(req.subjects, dtype=np.int64)
    site = SiteData(
        req.label,
        np.concatenate(labels),
        np.concatenate(images),
        req.modalities,
        NUM_CLASSES,
        np.repeat(ids, req.slices),
    )
    log.info(
        "%s: %d slices of %d virtual subjects in %.1f s", req.label, len(site), req.subjects, time.perf_counter() - t0
    )
    return site


def _pick(req: EmbeddedRequest, population: int, k: int, n_planes: int) -> np.ndarray:
    """Indices of subject ``k``'s ``req.slices`` distinct planes, ascending."""
    rng = np.random.default_rng([_SEED, 6, req.seed, population, k])
    return np.sort(rng.choice(n_planes, size=req.slices, replace=False))


def render_subjects(
    subjects: list[Subject], planes: list[list[tuple[str, int]]], req: EmbeddedRequest
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free labels (P, size, size) uint8 and images (P, M, size, size) in [-1, 1] of ``planes[i]`` of
    ``subjects[i]`` imaged by ``req.scanner``, rows in that order."""
    shape = _template()["labels"].shape
    side = max(shape)
    norm = _scanner_bias(req.scanner, shape)
    coarse = np.concatenate([_coarse(s, p, req.scanner, norm) for s, p in zip(subjects, planes, strict=True)])
    gain = np.repeat([s.gain for s in subjects], [len(p) for p in planes])
    gamma = np.repeat([req.scanner.gamma * s.gamma for s in subjects], [len(p) for p in planes])
    coarse[:, 3] *= gain[:, None, None]
    fine = F.interpolate(
        torch.from_numpy(coarse.astype(np.float32)), size=(side, side), mode="bilinear", align_corners=True
    )
    grid = fine[:, :3].permute(0, 2, 3, 1)[None].contiguous()  # (1, P, side, side, 3)
    lab_vol, img_vol = _volumes(req.modalities)
    lab = F.grid_sample(lab_vol, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    img = F.grid_sample(img_vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0].transpose(0, 1)
    img = img.clamp_(0.0, 1.0).pow_(torch.from_numpy(gamma.astype(np.float32))[:, None, None, None])
    img = (img * fine[:, 3:4]).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    return resize_square(lab.round().to(torch.uint8).numpy(), img.contiguous().numpy(), req.size)


def _add_noise(
    img: np.ndarray, req: EmbeddedRequest, population: int, ks: range, subjects: list[Subject]
) -> np.ndarray:
    """Rician noise at the output resolution, seeded per (seed, scanner, population, subject)."""
    img01 = (img + 1.0) * 0.5
    s = req.slices
    for i, (k, subj) in enumerate(zip(ks, subjects, strict=True)):
        rng = np.random.default_rng([_SEED, 5, req.seed, req.scanner_code, population, k])
        sigma = np.float32(req.scanner.noise_sigma * subj.noise_factor)
        n = rng.standard_normal((2, s, *img01.shape[1:]), dtype=np.float32) * sigma
        block = img01[i * s : (i + 1) * s]
        img01[i * s : (i + 1) * s] = np.sqrt((block + n[0]) ** 2 + n[1] ** 2)
    return np.clip(img01 * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
