"""The data contract: :class:`SiteData`, :class:`DataError`, the spec parser, and shared helpers.

A *data spec* is one string naming where a site's data come from::

    SCHEME:TARGET?KEY=VALUE&KEY=VALUE

* ``embedded:icbm152?site=0&of=3``            site 0 of 3 simulated hospitals (see :mod:`.embedded`)
* ``embedded:icbm152?split=heldout&of=3``     the held-out evaluation slices
* ``embedded:icbm152?site=0&of=3&subjects=400``  site 0 as 400 virtual subjects (see :mod:`.population`)
* ``npz:/data/site0.npz?num_classes=4``       arrays in an ``.npz`` file
* ``png:/data/site0?num_classes=4``           ``images/<name>.png`` + ``labels/<name>.png`` pairs
* ``nifti:labels=/d/seg.nii.gz&t1=/d/t1.nii.gz&t2=/d/t2.nii.gz&axis=2``   NIfTI volumes (no target; the
  whole body is the query, a leading ``?`` is optional)
* ``bids:/data/study?modalities=t1,t2``        a cohort in a BIDS-like tree (see :mod:`.cohort`)
* ``manifest:/data/cohort.csv``               a cohort listed in a CSV/TSV file

Rules: the scheme is everything before the first ``:``; the target runs to the first ``?``; options are
``&``-separated ``key=value`` pairs. Keys and values are percent-decoded (``%26`` for ``&``, ``%3F`` for
``?``, ``%25`` for ``%``); ``+`` is a literal plus. Keys may not repeat. The target is returned under the
reserved key ``"target"``. Each loader rejects options it does not know.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np
import torch
import torch.nn.functional as F

SCHEMES = ("embedded", "npz", "png", "nifti", "bids", "manifest")
QUERY_ONLY_SCHEMES = ("nifti",)
TARGET_KEY = "target"
MODALITY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class DataError(ValueError):
    """A data spec or data set is unusable. The message says what is wrong, for a human."""


@dataclass(frozen=True)
class SiteData:
    """All 2D samples one site holds.

    ``labels``: (N, H, W) uint8 class indices in ``[0, num_classes)``; ``images``: (N, M, H, W) float32 in
    ``[-1, 1]``, channel ``m`` being modality ``modalities[m]``; ``subjects``: (N,) int64 id of the subject each
    sample comes from (the unit of privacy: all samples of one person). ``None`` (the default) means every sample
    is its own subject, ids ``0..N-1``. Validated on construction (DataError).
    """

    name: str
    labels: np.ndarray
    images: np.ndarray
    modalities: tuple[str, ...]
    num_classes: int
    subjects: np.ndarray = None  # type: ignore[assignment]  # None -> np.arange(N), set in __post_init__

    def __post_init__(self) -> None:
        where = f"site {self.name!r}: " if isinstance(self.name, str) and self.name else ""
        if not isinstance(self.name, str) or not self.name:
            raise DataError("site name must be a non-empty string")
        lab, img = self.labels, self.images
        if not isinstance(lab, np.ndarray) or not isinstance(img, np.ndarray):
            raise DataError(f"{where}labels and images must be numpy arrays")
        if lab.ndim != 3:
            raise DataError(f"{where}labels must have shape (N, H, W), got {lab.shape}")
        if img.ndim != 4:
            raise DataError(f"{where}images must have shape (N, M, H, W), got {img.shape}")
        if lab.dtype != np.uint8:
            raise DataError(f"{where}labels must be uint8, got {lab.dtype}")
        if img.dtype != np.float32:
            raise DataError(f"{where}images must be float32, got {img.dtype}")
        if lab.shape[0] == 0:
            raise DataError(f"{where}no samples (N = 0)")
        if lab.shape[1] == 0 or lab.shape[2] == 0:
            raise DataError(f"{where}empty image plane {lab.shape[1:]}")
        if img.shape[0] != lab.shape[0] or img.shape[2:] != lab.shape[1:]:
            raise DataError(
                f"{where}shape mismatch: labels {lab.shape} vs images {img.shape} "
                "(expected labels (N, H, W) and images (N, M, H, W))"
            )
        mods = self.modalities
        if not isinstance(mods, tuple) or not all(isinstance(m, str) and m for m in mods):
            raise DataError(f"{where}modalities must be a tuple of non-empty strings, got {mods!r}")
        if len(mods) == 0 or len(mods) != img.shape[1]:
            raise DataError(f"{where}{len(mods)} modality names {mods} for {img.shape[1]} image channels")
        if len(set(mods)) != len(mods):
            raise DataError(f"{where}duplicate modality names {mods}")
        nc = self.num_classes
        if isinstance(nc, bool) or not isinstance(nc, int | np.integer) or not 2 <= int(nc) <= 256:
            raise DataError(f"{where}num_classes must be an integer in [2, 256], got {nc!r}")
        object.__setattr__(self, "num_classes", int(nc))
        top = int(lab.max())
        if top >= nc:
            raise DataError(f"{where}label value {top} out of range for num_classes={nc} (valid 0..{nc - 1})")
        if not np.isfinite(img).all():
            raise DataError(f"{where}images contain NaN or Inf")
        lo, hi = float(img.min()), float(img.max())
        if lo < -1.0 or hi > 1.0:
            raise DataError(f"{where}image values [{lo:.4g}, {hi:.4g}] outside [-1, 1]")
        object.__setattr__(self, "subjects", _subject_ids(self.subjects, lab.shape[0], where))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_subjects(self) -> int:
        """The number of distinct subjects."""
        return int(np.unique(self.subjects).size)

    def subset(self, index: Sequence[int] | np.ndarray | slice, name: str | None = None) -> SiteData:
        """The samples at ``index`` (integer indices, a boolean mask or a slice), keeping their subject ids."""
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype != np.bool_:
                index = index.astype(np.int64)
        return SiteData(
            name or self.name,
            np.ascontiguousarray(self.labels[index]),
            np.ascontiguousarray(self.images[index]),
            self.modalities,
            self.num_classes,
            np.ascontiguousarray(self.subjects[index]),
        )


def _subject_ids(subjects: object, n: int, where: str) -> np.ndarray:
    """Validated (N,) int64 subject ids; ``None`` -> ``0..n-1``."""
    if subjects is None:
        return np.arange(n, dtype=np.int64)
    if not isinstance(subjects, np.ndarray):
        raise DataError(f"{where}subjects must be a numpy array of integer ids, got {type(subjects).__name__}")
    if subjects.dtype == np.bool_ or not np.issubdtype(subjects.dtype, np.integer):
        raise DataError(f"{where}subjects must hold integer ids, got dtype {subjects.dtype}")
    if subjects.shape != (n,):
        raise DataError(f"{where}subjects must have shape ({n},) (one id per sample), got {subjects.shape}")
    if subjects.dtype == np.uint64 and n and int(subjects.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{where}subject ids must fit in int64")
    return np.ascontiguousarray(subjects, dtype=np.int64)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split a data spec into ``(scheme, options)``; the target (if any) is ``options["target"]``.

    >>> parse_spec("embedded:icbm152?site=0&of=3")
    ('embedded', {'target': 'icbm152', 'site': '0', 'of': '3'})
    >>> parse_spec("nifti:labels=a.nii&t1=b.nii")
    ('nifti', {'labels': 'a.nii', 't1': 'b.nii'})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty data spec; expected SCHEME:TARGET?KEY=VALUE&..., e.g. embedded:icbm152?site=0&of=3")
    spec = spec.strip()
    scheme, sep, body = spec.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        shown = scheme if sep else spec
        raise DataError(
            f"unknown data spec scheme {shown!r}; expected one of {', '.join(s + ':' for s in SCHEMES)} "
            "(e.g. embedded:icbm152?site=0&of=3)"
        )
    if scheme in QUERY_ONLY_SCHEMES:
        target, query = "", body[1:] if body.startswith("?") else body
    else:
        target, _, query = body.partition("?")
    options: dict[str, str] = {}
    if target:
        options[TARGET_KEY] = unquote(target)
    if query:
        for part in query.split("&"):
            if not part:
                continue
            key, eq, value = part.partition("=")
            key = unquote(key).strip()
            if not eq or not key:
                raise DataError(f"malformed option {part!r} in {scheme}: spec; expected key=value")
            if key == TARGET_KEY and scheme not in QUERY_ONLY_SCHEMES:
                raise DataError(f"option {key!r} is reserved; put the {scheme} target before '?'")
            if key in options:
                raise DataError(f"option {key!r} given twice in {scheme}: spec")
            options[key] = unquote(value)
    return scheme, options


def check_options(scheme: str, options: dict[str, str], allowed: tuple[str, ...]) -> None:
    """Raise DataError naming any option not in ``allowed``."""
    unknown = sorted(set(options) - set(allowed) - {TARGET_KEY})
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(repr(u) for u in unknown)} for {scheme}: spec; "
            f"allowed: {', '.join(a for a in allowed)}"
        )


def int_option(options: dict[str, str], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    """Read an integer option within ``[lo, hi]``; ``default`` when absent."""
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise DataError(f"option {key}={raw!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise DataError(f"option {key}={value} must be {rng}")
    return value


def list_option(options: dict[str, str], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Read a comma-separated list option (no empty items, no duplicates)."""
    raw = options.get(key)
    if raw is None:
        return default
    items = tuple(s.strip() for s in raw.split(","))
    if not items or any(not s for s in items):
        raise DataError(f"option {key}={raw!r}: expected a comma-separated list without empty items")
    if len(set(items)) != len(items):
        raise DataError(f"option {key}={raw!r} lists an item twice")
    return items


MAX_SIZE = 4096


def resolve_size(options: dict[str, str], size: int | None, default: int | None) -> int | None:
    """The output size: the ``size`` argument if given, else the spec's ``size=``, else ``default``."""
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= int(size) <= MAX_SIZE:
            raise DataError(f"size must be an integer in [1, {MAX_SIZE}], got {size!r}")
        return int(size)
    return int_option(options, "size", default, 1, MAX_SIZE)


def resize_square(
    labels: np.ndarray, images: np.ndarray, size: int, *, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Pad (N, H, W) labels and (N, M, H, W) images to a centred square, then resize to ``size``.

    Padding is background: label 0, image -1. Images: ``area`` when shrinking, ``bilinear`` when growing.
    Labels: majority vote when shrinking (the class with the largest area-averaged share wins; ties go to the
    lower class), so they stay aligned with the area-averaged images; ``nearest-exact`` when growing.
    """
    n, h, w = labels.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((0, 0), (top, side - h - top), (left, side - w - left))
    labels = np.pad(labels, pad, constant_values=0)
    images = np.pad(images, ((0, 0), (0, 0), *pad[1:]), constant_values=-1.0)
    if side == size:
        return np.ascontiguousarray(labels, dtype=np.uint8), np.ascontiguousarray(images, dtype=np.float32)
    shrink = size < side
    # the classes present, ascending (bincount: much faster than np.unique on uint8 labels)
    classes = (
        np.flatnonzero(np.bincount(labels.ravel(), minlength=1)).tolist()
        if labels.dtype == np.uint8
        else np.unique(labels).tolist()
    )
    out_lab = np.empty((n, size, size), np.uint8)
    out_img = np.empty((n, images.shape[1], size, size), np.float32)
    for s in range(0, n, chunk):
        lab_t = torch.from_numpy(np.ascontiguousarray(labels[s : s + chunk]))
        img_t = torch.from_numpy(np.ascontiguousarray(images[s : s + chunk], dtype=np.float32))
        if shrink:
            img_r = F.interpolate(img_t, size=(size, size), mode="area")
            best = torch.full((lab_t.shape[0], size, size), -1.0)
            lab_r = torch.zeros((lab_t.shape[0], size, size), dtype=torch.uint8)
            for c in classes:
                share = F.interpolate((lab_t == c)[:, None].float(), size=(size, size), mode="area")[:, 0]
                win = share > best
                best = torch.where(win, share, best)
                lab_r[win] = c
        else:
            img_r = F.interpolate(img_t, size=(size, size), mode="bilinear", align_corners=False)
            lab_r = F.interpolate(lab_t[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
        out_img[s : s + chunk] = img_r.clamp_(-1.0, 1.0).numpy()
        out_lab[s : s + chunk] = lab_r.to(torch.uint8).numpy()
    return out_lab, out_img


def scale_intensity(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[-1, 1]`` (clipping), as float32."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise DataError(f"cannot normalise intensities: empty range [{lo}, {hi}] (constant image?)")
    out = (np.asarray(x, dtype=np.float32) - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out)


def as_labels(arr: np.ndarray, where: str) -> np.ndarray:
    """Check an integer-valued label array and return it as uint8 (DataError otherwise)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.size == 0:
        raise DataError(f"{where}: labels are empty")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: labels contain NaN or Inf")
        if not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{where}: labels contain non-integer values; labels must be class indices")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {arr.dtype}; expected integer class indices")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise DataError(f"{where}: labels contain negative values (min {lo}); labels must be class indices >= 0")
    if hi > 255:
        raise DataError(f"{where}: label value {hi} too large; at most 256 classes (0..255) are supported")
    return arr.astype(np.uint8)


def label_classes(labels: np.ndarray, declared: int | None, where: str) -> int:
    """``declared`` if every label is below it (DataError otherwise); without one, max label + 1 (at least 2)."""
    top = int(labels.max())
    if declared is None:
        return max(2, top + 1)
    if top >= declared:
        raise DataError(f"{where}: label value {top} out of range for num_classes={declared} (valid 0..{declared - 1})")
    return declared


def check_finite(images: np.ndarray, where: str) -> None:
    """DataError if a float array holds NaN or Inf."""
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).sum())
        raise DataError(f"{where}: images contain {bad} NaN/Inf value(s)")
