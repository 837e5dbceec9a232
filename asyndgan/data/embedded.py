"""The embedded data set: simulated hospitals cut from the MNI ICBM152 2009a template.

Spec::

    embedded:icbm152?site=J&of=N[&size=64][&modalities=t1,t2][&orient=axial,coronal,sagittal]
    embedded:icbm152?split=heldout[&scanner=reference|J][&of=N][&size=64][&modalities=...][&orient=...]
    ...[&subjects=K[&slices=5][&seed=0]]      a virtual population instead of the template (see .population)

Data: ``icbm152.npz`` next to this module (built by ``scripts/build_embedded.py``; see ``NOTICE``): a 1.5 mm
T1 template (brain-masked: the source template has no skull or scalp), grey/white-matter probabilities and a
4-class label map (0 background, 1 other intracranial/CSF, 2 grey matter, 3 white matter).

Slices: 2D slices along each orientation (axial = z, coronal = y, sagittal = x axis of the 1.5 mm grid)
whose brain area is at least ``MIN_BRAIN_FRACTION`` of the largest slice's, padded to a common square (the
grid's largest side, 128 voxels of 1.5 mm: 3 mm pixels at size 64 in every orientation). Per orientation,
that contiguous range is cut into: one held-out block (``HELDOUT_FRACTION`` of the range, centred), ``GAP``
unused slices on each side of it, and the remaining training slices split into ``of`` contiguous, equal slabs
(``numpy.array_split``; site ``j`` gets slab ``j``). When ``of`` is odd the middle site's slab is interrupted
by the held-out block and its gaps. The held-out block does not depend on ``of``.
:func:`embedded_slice_index` returns the positions.

Scanners: site ``j`` renders its slices with its own deterministic scanner (:func:`site_scanner`): a
contrast curve ``x ** gamma`` on intensities normalised to [0, 1] (gamma in [0.7, 1.4]), a smooth
multiplicative 3D bias field (second-order polynomial, peak amplitude 8-15 %), and Rician noise (sigma 1-4 %
of the range) drawn per slice from a seed fixed by (site, orientation, slice position). Held-out slices use a
neutral reference scanner (gamma 1, no bias field, sigma 0.5 %) that no site has, or with ``scanner=J`` site
``J``'s scanner (the held-out block as hospital ``J`` would have imaged it: a test set from the sites' own
distribution).

Modalities: ``t1`` is the template. ``t2`` is SIMULATED: a T2-like contrast rendered from the tissue
probabilities (CSF bright, GM mid, WM dark) mixed with inverted T1 detail, zero outside the brain; the same
site scanner is applied to it (independent noise). It exists to exercise multi-modality code, not as anatomy.

Population: with ``subjects=K`` a site (or the held-out split) holds ``K`` virtual subjects, each a random smooth
deformation and intensity variation of the template contributing ``slices`` slices from the same slab(s);
:mod:`.population` has the details. Without it, every slice is its own subject (``SiteData.subjects`` 0..N-1).

Rows of the returned :class:`SiteData` are ordered by orientation (axial, coronal, sagittal, restricted to the
requested ones) and then by slice position, ascending.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .spec import DataError, SiteData, check_options, int_option, list_option, resize_square, resolve_size

DATASETS = ("icbm152",)
ORIENTS = ("axial", "coronal", "sagittal")
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
MODALITIES = ("t1", "t2")
NUM_CLASSES = 4
LABEL_NAMES = ("background", "other_intracranial", "grey_matter", "white_matter")
DEFAULT_SIZE = 64
MIN_BRAIN_FRACTION = 0.15
HELDOUT_FRACTION = 0.15
MIN_HELDOUT = 4
GAP = 4
MAX_SITES = 64
OPTIONS = ("site", "of", "split", "size", "modalities", "orient", "scanner", "subjects", "slices", "seed")
MAX_SUBJECTS = 100_000  # subject ids: heldout k, site j (j + 1) * SUBJECT_ID_STRIDE + k
SUBJECT_ID_STRIDE = 1_000_000
DEFAULT_SLICES = 5  # slices per virtual subject: 400 subjects -> 2,000 examples per site
MAX_SLICES = 64
MAX_SEED = 2**32 - 1
_SEED = 0xA5D6A
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_NPZ = Path(__file__).with_name("icbm152.npz")


@dataclass(frozen=True)
class Scanner:
    """A simulated scanner: contrast gamma, bias-field amplitude and polynomial, noise sigma (of [0, 1])."""

    gamma: float
    bias_amplitude: float
    bias_coeffs: tuple[float, ...]  # 9 coefficients: x, y, z, x^2, y^2, z^2, xy, xz, yz
    noise_sigma: float


REFERENCE_SCANNER = Scanner(gamma=1.0, bias_amplitude=0.0, bias_coeffs=(0.0,) * 9, noise_sigma=0.005)


def site_scanner(site: int) -> Scanner:
    """The deterministic scanner of site ``site`` (independent of the number of sites)."""
    u = (0.5 + site * _GOLDEN) % 1.0  # low-discrepancy: neighbouring sites get well-separated gammas
    v = (0.15 + site * math.sqrt(2.0)) % 1.0
    rng = np.random.default_rng([_SEED, 1, site])
    coeffs = tuple(float(c) for c in rng.normal(size=9))
    return Scanner(
        gamma=0.7 + 0.7 * u,
        bias_amplitude=float(rng.uniform(0.08, 0.15)),
        bias_coeffs=coeffs,
        noise_sigma=0.01 + 0.03 * v,
    )


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """Decoded ``icbm152.npz``: labels and [0, 1] float32 ``t1``/``t2`` volumes (read-only, cached)."""
    try:
        with np.load(_NPZ, allow_pickle=False) as z:
            labels = np.asarray(z["labels"], dtype=np.uint8)
            t1 = z["t1"].astype(np.float32) / 255.0
            gm = z["gm"].astype(np.float32) / 255.0
            wm = z["wm"].astype(np.float32) / 255.0
            meta = json.loads(str(z["meta_json"]))
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"embedded data set {_NPZ.name} is missing or damaged ({exc}); reinstall asyndgan") from None
    brain = (labels > 0).astype(np.float32)
    other = np.clip(brain - gm - wm, 0.0, 1.0)
    # simulated T2-like contrast: CSF bright, GM mid, WM dark, plus some inverted T1 detail; 0 outside brain
    t2 = brain * (0.8 * (1.0 * other + 0.55 * gm + 0.32 * wm) + 0.2 * (1.0 - t1))
    t2 = np.clip(t2, 0.0, 1.0).astype(np.float32)
    vols = {"t1": t1, "t2": t2}
    for a in (labels, *vols.values()):
        a.setflags(write=False)
    return {"labels": labels, "vols": vols, "meta": meta}


@functools.lru_cache(maxsize=8)
def _extent(orient: str) -> np.ndarray:
    """Contiguous slice positions along ``orient`` whose brain area is >= MIN_BRAIN_FRACTION of the max."""
    labels = _template()["labels"]
    axis = AXIS[orient]
    area = (labels > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    keep = np.flatnonzero(area >= MIN_BRAIN_FRACTION * area.max())
    out = np.arange(keep[0], keep[-1] + 1)
    out.setflags(write=False)
    return out


def _split(orient: str) -> tuple[np.ndarray, np.ndarray]:
    """(held-out positions, training positions) along ``orient``."""
    pos = _extent(orient)
    n = len(pos)
    n_held = max(MIN_HELDOUT, round(HELDOUT_FRACTION * n))
    start = (n - n_held) // 2
    held = pos[start : start + n_held]
    train = np.concatenate([pos[: max(start - GAP, 0)], pos[start + n_held + GAP :]])
    return held, train


def embedded_slice_index(*, of: int, orient: str, site: int | None = None, split: str = "train") -> np.ndarray:
    """Slice positions (voxel index along the orientation's axis of the 1.5 mm grid), ascending.

    ``split="train"`` needs ``site`` in ``[0, of)``; ``split="heldout"`` ignores ``of`` beyond validating it.
    """
    if orient not in ORIENTS:
        raise DataError(f"unknown orientation {orient!r}; expected one of {', '.join(ORIENTS)}")
    if isinstance(of, bool) or not isinstance(of, int | np.integer) or not 1 <= of <= MAX_SITES:
        raise DataError(f"of={of!r}: the number of sites must be an integer in [1, {MAX_SITES}]")
    held, train = _split(orient)
    if split == "heldout":
        if site is not None:
            raise DataError("site= cannot be combined with split=heldout")
        return held.copy()
    if split != "train":
        raise DataError(f"split={split!r}: expected 'train' or 'heldout'")
    if site is None:
        raise DataError("site= is required for split=train (e.g. embedded:icbm152?site=0&of=3)")
    if isinstance(site, bool) or not isinstance(site, int | np.integer) or not 0 <= site < of:
        raise DataError(f"site={site!r} out of range for of={of}: sites are numbered 0..{of - 1}")
    chunk = np.array_split(train, int(of))[int(site)]
    if len(chunk) == 0:
        raise DataError(f"of={of} is too many sites: only {len(train)} training slices along {orient}")
    return chunk.copy()


def _bias_field(scanner: Scanner, shape: tuple[int, ...]) -> np.ndarray | None:
    if scanner.bias_amplitude == 0.0:
        return None
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    c = scanner.bias_coeffs
    poly = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z
    poly = poly + c[6] * x * y + c[7] * x * z + c[8] * y * z
    poly = poly - poly.mean()
    poly = poly / max(float(np.abs(poly).max()), 1e-6)
    return (1.0 + scanner.bias_amplitude * poly).astype(np.float32)


def _take(vol: np.ndarray, axis: int, positions: np.ndarray, fill: float) -> np.ndarray:
    """Slices of ``vol`` at ``positions`` along ``axis``, rotated to display orientation (superior or
    anterior up) and padded (centred, with ``fill``) to a square as wide as the volume's largest side, so
    that every orientation ends up with the same pixel spacing."""
    stack = np.rot90(np.moveaxis(np.take(vol, positions, axis=axis), axis, 0), k=1, axes=(1, 2))
    side = max(vol.shape)
    h, w = stack.shape[1:]
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(stack, ((0, 0), (top, side - h - top), (left, side - w - left)), constant_values=fill)


@dataclass(frozen=True)
class EmbeddedRequest:
    """A parsed, validated ``embedded:`` spec."""

    name: str  # the data set, "icbm152"
    label: str  # SiteData.name
    split: str  # "train" or "heldout"
    of: int
    site: int | None  # None for split=heldout
    scanner: Scanner
    scanner_code: int  # 0 = reference scanner, j + 1 = site j's scanner (seeds the noise)
    size: int
    modalities: tuple[str, ...]
    orients: tuple[str, ...]  # in ORIENTS order
    subjects: int | None = None  # virtual population size (see .population); None = the template itself
    slices: int = 0  # slices per virtual subject
    seed: int = 0  # population seed


def load_embedded(options: dict[str, str], size: int | None = None) -> SiteData:
    """Load one simulated site (or the held-out split) from parsed spec options."""
    req = parse_embedded(options, size)
    if req.subjects is not None:
        from .population import render_population  # imports this module

        return render_population(req)
    return _render_template(req)


def load_rescanned(options: dict[str, str], scanner_site: int, size: int | None = None) -> SiteData:
    """Training site ``site=J``'s own slices (same labels, same order) as site ``scanner_site``'s scanner images
    them: an experiment's oracle, e.g. the t2 that a generator which learnt hospital K's scanner perfectly would
    give for site J. The template only (no ``subjects=``)."""
    req = parse_embedded(options, size)
    if req.split != "train" or req.subjects is not None:
        raise DataError("a rescanned site is a training site of the template (site=J&of=N, no subjects=)")
    if not 0 <= scanner_site < MAX_SITES:
        raise DataError(f"scanner site {scanner_site} out of range [0, {MAX_SITES - 1}]")
    label = f"{req.label}-scanner{scanner_site}"
    req = dataclasses.replace(req, scanner=site_scanner(scanner_site), scanner_code=scanner_site + 1, label=label)
    return _render_template(req)


def parse_embedded(options: dict[str, str], size: int | None = None) -> EmbeddedRequest:
    """Validate ``embedded:`` options (DataError) into an :class:`EmbeddedRequest`."""
    check_options("embedded", options, OPTIONS)
    name = options.get("target", "icbm152") or "icbm152"
    if name not in DATASETS:
        raise DataError(f"unknown embedded data set {name!r}; available: {', '.join(DATASETS)}")
    split = options.get("split", "train")
    if split not in ("train", "heldout"):
        raise DataError(f"split={split!r}: expected 'train' or 'heldout'")
    if split == "train" and "of" not in options:
        raise DataError("of= (the number of simulated sites) is required, e.g. embedded:icbm152?site=0&of=3")
    of = int_option(options, "of", 1, 1, MAX_SITES)
    site = int_option(options, "site", None, 0)
    assert of is not None
    if split == "train" and site is None:
        raise DataError("site= is required for split=train (e.g. embedded:icbm152?site=0&of=3)")
    if split == "heldout" and site is not None:
        raise DataError("site= cannot be combined with split=heldout")
    if site is not None and split == "train" and site >= of:
        raise DataError(f"site={site} out of range for of={of}: sites are numbered 0..{of - 1}")
    out_size = resolve_size(options, size, DEFAULT_SIZE)
    assert out_size is not None
    modalities = list_option(options, "modalities", ("t1",))
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise DataError(f"unknown embedded modality {bad[0]!r}; available: {', '.join(MODALITIES)}")
    orients = list_option(options, "orient", ORIENTS)
    bad = [o for o in orients if o not in ORIENTS]
    if bad:
        raise DataError(f"unknown orientation {bad[0]!r}; expected any of {', '.join(ORIENTS)}")
    scanner, scanner_code, label = _parse_scanner(options, name, split, of, site)
    subjects, slices, seed = _parse_population(options)
    if subjects is not None:
        label += f"-subjects{subjects}x{slices}" + (f"-seed{seed}" if seed else "")
    return EmbeddedRequest(
        name, label, split, of, site, scanner, scanner_code, out_size, modalities,
        tuple(o for o in ORIENTS if o in orients), subjects, slices, seed,
    )  # fmt: skip


def _parse_scanner(
    options: dict[str, str], name: str, split: str, of: int, site: int | None
) -> tuple[Scanner, int, str]:
    """(scanner, scanner code, SiteData name) for validated split/of/site options."""
    which = options.get("scanner", "reference")
    if split == "train" and "scanner" in options:
        raise DataError("scanner= goes with split=heldout (a training site always uses its own scanner)")
    if split == "heldout" and which == "reference":
        return REFERENCE_SCANNER, 0, f"{name}-heldout"
    if split == "heldout":
        if not which.isdigit() or int(which) >= MAX_SITES:
            raise DataError(f"scanner={which!r}: expected 'reference' or a site number in [0, {MAX_SITES - 1}]")
        j = int(which)
        return site_scanner(j), j + 1, f"{name}-heldout-scanner{j}"
    assert site is not None
    return site_scanner(site), site + 1, f"{name}-site{site}of{of}"


def _parse_population(options: dict[str, str]) -> tuple[int | None, int, int]:
    """(subjects, slices per subject, seed) from ``subjects=``, ``slices=``, ``seed=``."""
    subjects = int_option(options, "subjects", None, 1, MAX_SUBJECTS)
    if subjects is None:
        extra = [k for k in ("slices", "seed") if k in options]
        if extra:
            raise DataError(f"{extra[0]}= goes with subjects=K (a virtual population), e.g. subjects=400")
        return None, 0, 0
    slices = int_option(options, "slices", DEFAULT_SLICES, 1, MAX_SLICES)
    seed = int_option(options, "seed", 0, 0, MAX_SEED)
    assert slices is not None and seed is not None
    return subjects, slices, seed


def _render_template(req: EmbeddedRequest) -> SiteData:
    """The template's own slices of ``req``'s slab(s), imaged by ``req.scanner``."""
    tpl = _template()
    scanner, site_code, site = req.scanner, req.scanner_code, req.site
    labels_vol: np.ndarray = tpl["labels"]
    bias = _bias_field(scanner, labels_vol.shape)
    vols = []
    for m in req.modalities:
        v = np.power(tpl["vols"][m], np.float32(scanner.gamma))
        if bias is not None:
            v = v * bias
        vols.append(np.clip(v, 0.0, 1.0) * 2.0 - 1.0)

    all_labels, all_images = [], []
    for orient in req.orients:
        axis = AXIS[orient]
        pos = embedded_slice_index(of=req.of, orient=orient, site=site, split=req.split)
        lab = _take(labels_vol, axis, pos, 0)
        img = np.stack([_take(v, axis, pos, -1.0) for v in vols], axis=1).astype(np.float32)
        lab, img = resize_square(lab, img, req.size)
        # Rician noise at the output resolution, seeded per (site, orientation, slice position)
        img01 = (img + 1.0) * 0.5
        for i, p in enumerate(pos):
            rng = np.random.default_rng([_SEED, 2, site_code, AXIS[orient], int(p)])
            n = rng.standard_normal((2, *img01.shape[1:]), dtype=np.float32) * np.float32(scanner.noise_sigma)
            img01[i] = np.sqrt((img01[i] + n[0]) ** 2 + n[1] ** 2)
        img = np.clip(img01 * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
        all_labels.append(lab)
        all_images.append(img)
    return SiteData(
        name=req.label,
        labels=np.concatenate(all_labels),
        images=np.concatenate(all_images),
        modalities=req.modalities,
        num_classes=NUM_CLASSES,
    )
