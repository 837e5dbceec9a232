"""The ``nifti:`` loader: one label volume and one image volume per modality, sliced along an axis.

``nifti:labels=PATH&t1=PATH[&t2=PATH...][&axis=2][&num_classes=K][&size=S][&reorient=none|ras]``

:func:`nifti_slices` is the per-volume core that the cohort loaders (:mod:`.cohort`) share; :func:`nifti_layout`
and :func:`slices_to_volume` put per-slice results back into the label volume's grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .spec import (
    MODALITY_RE,
    DataError,
    SiteData,
    as_labels,
    check_finite,
    int_option,
    label_classes,
    parse_spec,
    resize_square,
    resolve_size,
    scale_intensity,
)

log = logging.getLogger(__name__)

NIFTI_RESERVED = ("labels", "axis", "num_classes", "size", "reorient")
ROBUST_PERCENTILES = (0.5, 99.5)


def nifti_name(path: Path) -> str:
    """The file name without ``.nii.gz`` / ``.nii``."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def read_nifti(path: Path, kind: str, canonical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(3D data, affine) of a NIfTI file; ``canonical``: first reoriented to the closest RAS+ axis order."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not path.is_file():
        raise DataError(f"{kind} NIfTI file {path.name!r} not found")
    try:
        img = nib.load(str(path))
        if canonical:
            img = nib.as_closest_canonical(img)  # type: ignore[arg-type]
        data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]
        affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    except (ImageFileError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {kind} NIfTI file {path.name!r} ({exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{kind} NIfTI file {path.name!r} has shape {data.shape}; expected a 3D volume")
    return np.asarray(data), affine


def reorient_option(options: dict[str, str], default: bool) -> bool:
    """``reorient=ras`` (reorient to the closest canonical RAS+ axis order) or ``reorient=none``."""
    raw = options.get("reorient")
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("ras", "none"):
        raise DataError(f"option reorient={raw!r}: expected ras (closest canonical RAS+ orientation) or none")
    return value == "ras"


@dataclass(frozen=True)
class NiftiLayout:
    """Where the slices of a ``nifti:`` spec came from: enough to put per-slice results back into the volume."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    axis: int
    positions: np.ndarray  # slice index along ``axis`` of each row of the loaded SiteData


def nifti_layout(spec: str) -> NiftiLayout | None:
    """The layout of a ``nifti:`` spec's slices (reads the label volume again); ``None`` for other schemes."""
    scheme, options = parse_spec(spec)
    if scheme != "nifti":
        return None
    lab_path = Path(options.get("labels", "")).expanduser()
    raw, affine = read_nifti(lab_path, "labels", reorient_option(options, False))
    axis = int_option(options, "axis", 2, 0, 2)
    assert axis is not None
    positions = _foreground_slices(as_labels(raw, f"NIfTI labels {lab_path.name!r}"), axis)
    return NiftiLayout(raw.shape, affine, axis, positions)  # type: ignore[arg-type]


def slices_to_volume(layout: NiftiLayout, slices: np.ndarray, fill: float, labels: bool = False) -> np.ndarray:
    """Inverse of the ``nifti:`` loader's slicing: (N, H, W) slices as loaded (native, or padded to a square and
    resized with ``size``) back into a volume of ``layout.shape``; slices without foreground get ``fill``.
    ``labels``: nearest-neighbour resizing and a uint8 volume."""
    h, w = (n for i, n in enumerate(layout.shape) if i != layout.axis)
    side = max(h, w)
    if slices.ndim != 3 or len(slices) != len(layout.positions):
        raise DataError(f"expected {len(layout.positions)} slices, got an array of shape {slices.shape}")
    if slices.shape[1:] == (h, w):
        rows = np.asarray(slices, dtype=np.float32)
    elif slices.shape[1] == slices.shape[2]:
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
        if x.shape[-1] != side:
            mode = "nearest-exact" if labels else "bilinear"
            x = F.interpolate(x, size=(side, side), mode=mode, **({} if labels else {"align_corners": False}))
        top, left = (side - h) // 2, (side - w) // 2
        rows = x[:, 0, top : top + h, left : left + w].numpy()
    else:
        raise DataError(f"slices of {slices.shape[1:]} fit neither the volume's ({h}, {w}) nor a square")
    vol = np.full(layout.shape, fill, dtype=np.uint8 if labels else np.float32)
    np.moveaxis(vol, layout.axis, 0)[layout.positions] = rows.round() if labels else rows
    return vol


def _foreground_slices(labels_vol: np.ndarray, axis: int) -> np.ndarray:
    return np.flatnonzero((labels_vol > 0).any(axis=tuple(a for a in range(3) if a != axis)))


def _normalised_volume(
    path: Path, modality: str, shape: tuple[int, ...], lab_affine: np.ndarray, where: str, canonical: bool
) -> np.ndarray:
    """One image volume, checked against the label volume and mapped to [-1, 1] by its robust percentiles."""
    raw, affine = read_nifti(path, f"modality {modality!r}", canonical)
    vwhere = f"NIfTI {modality} {path.name!r}"
    if raw.shape != shape:
        raise DataError(f"shape mismatch: {where} is {shape} but {vwhere} is {raw.shape}")
    if not np.allclose(affine, lab_affine, atol=1e-3):
        log.warning("%s and %s have different affines; are they registered?", where, vwhere)
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        raise DataError(f"{vwhere}: dtype {raw.dtype} is not a real numeric type")
    vol = raw.astype(np.float32)
    check_finite(vol, vwhere)
    lo, hi = (float(v) for v in np.percentile(vol, ROBUST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(vol.min()), float(vol.max())
    if hi <= lo:
        raise DataError(f"{vwhere}: volume is constant ({lo:g}); cannot normalise intensities")
    return scale_intensity(vol, lo, hi)


def nifti_slices(
    lab_path: Path, volumes: list[tuple[str, Path]], axis: int, canonical: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The foreground slices along ``axis`` of a label volume and its image volumes (``(modality, path)``, in
    channel order): labels (n, H, W) uint8, images (n, M, H, W) float32 in [-1, 1], and the label affine.
    ``canonical``: every volume is first reoriented to the closest RAS+ axis order."""
    where = f"NIfTI labels {lab_path.name!r}"
    raw_lab, lab_affine = read_nifti(lab_path, "labels", canonical)
    labels_vol = as_labels(raw_lab, where)
    vols = [_normalised_volume(path, m, labels_vol.shape, lab_affine, where, canonical) for m, path in volumes]
    fg = _foreground_slices(labels_vol, axis)
    if fg.size == 0:
        raise DataError(f"{where}: no foreground labels (> 0) in any slice along axis {axis}; zero slices")
    labels = np.ascontiguousarray(np.moveaxis(np.take(labels_vol, fg, axis=axis), axis, 0))
    images = np.stack([np.moveaxis(np.take(v, fg, axis=axis), axis, 0) for v in vols], axis=1)
    return labels, np.ascontiguousarray(images, np.float32), lab_affine


def load_nifti(options: dict[str, str], size: int | None = None) -> SiteData:
    """``nifti:labels=PATH&t1=PATH[&t2=PATH...][&axis=2][&reorient=none|ras]``: a label volume and one volume
    per modality.

    Keys other than ``labels``, ``axis``, ``num_classes``, ``size`` and ``reorient`` name modalities (in channel
    order). Slices along ``axis`` with no foreground label (> 0) are skipped. Each image volume is normalised on
    its own: its 0.5th/99.5th percentiles (over the whole volume) map to -1/1, values beyond are clipped.
    """
    if "target" in options:
        raise DataError("nifti: spec takes no target; use nifti:labels=PATH&t1=PATH[&axis=2]")
    mods = tuple(k for k in options if k not in NIFTI_RESERVED)
    for m in mods:
        if not MODALITY_RE.match(m):
            raise DataError(f"nifti: option {m!r} is not a valid modality name")
    if "labels" not in options or not options["labels"]:
        raise DataError("nifti: spec needs labels=PATH (the label volume)")
    if not mods:
        raise DataError(
            "nifti: spec names no image volume; add one per modality, e.g. t1=PATH "
            f"(keys other than {', '.join(NIFTI_RESERVED)} name modalities)"
        )
    axis = int_option(options, "axis", 2, 0, 2)
    assert axis is not None
    canonical = reorient_option(options, False)
    out_size = resolve_size(options, size, None)
    lab_path = Path(options["labels"]).expanduser()
    volumes = [(m, Path(options[m]).expanduser()) for m in mods]
    labels, images, _ = nifti_slices(lab_path, volumes, axis, canonical)
    where = f"NIfTI labels {lab_path.name!r}"
    nc = label_classes(labels, int_option(options, "num_classes", None, 2, 256), where)
    if out_size is not None:
        labels, images = resize_square(labels, images, out_size)
    return SiteData(name=nifti_name(lab_path), labels=labels, images=images, modalities=mods, num_classes=nc)
