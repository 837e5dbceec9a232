"""Load one site's data from a spec string: ``embedded:``, ``npz:``, ``png:`` or ``nifti:``.

Specs (the syntax is in :mod:`asyndgan.data.spec`; ``docs/data.md`` has the details)::

    embedded:icbm152?site=0&of=3[&size=64][&modalities=t1,t2][&orient=axial,coronal,sagittal]
    embedded:icbm152?split=heldout[&of=3]...
    embedded:icbm152?site=0&of=3&subjects=400[&slices=5][&seed=0]    a virtual population (400 x 5 slices)
    npz:FILE[?num_classes=4][&modalities=t1,t2][&range=auto|minmax|LO,HI][&size=S]
    png:DIR[?num_classes=4][&modality=t1][&size=S]
    nifti:labels=PATH&t1=PATH[&t2=PATH...][&axis=2][&num_classes=4][&size=S]

``size`` (square side in pixels) may also be passed to :func:`load_site`, which then overrides the spec.
Without a size, ``npz``/``png``/``nifti`` data keep their native shape; with one, each slice is padded to a
centred square with background (label 0, image -1) and resized (see :func:`~.spec.resize_square`).

Every failure raises :class:`~.spec.DataError` with a message naming the problem and the file (by name).
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .embedded import load_embedded
from .spec import (
    DataError,
    SiteData,
    check_options,
    int_option,
    list_option,
    parse_spec,
    resize_square,
    resolve_size,
    scale_intensity,
)

log = logging.getLogger(__name__)

NPZ_OPTIONS = ("num_classes", "modalities", "range", "size")
PNG_OPTIONS = ("num_classes", "modality", "size")
NIFTI_RESERVED = ("labels", "axis", "num_classes", "size")
ROBUST_PERCENTILES = (0.5, 99.5)
_MODALITY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def load_site(spec: str, *, size: int | None = None) -> SiteData:
    """Load the site described by ``spec``; ``size`` overrides the spec's ``size=`` option."""
    scheme, options = parse_spec(spec)
    if scheme == "embedded":
        return load_embedded(options, size)
    if scheme == "npz":
        return load_npz(options, size)
    if scheme == "png":
        return load_png(options, size)
    return load_nifti(options, size)


# --------------------------------------------------------------------------------------------------- helpers


def _target(scheme: str, options: dict[str, str], what: str) -> Path:
    target = options.get("target", "")
    if not target:
        raise DataError(f"{scheme}: spec needs a {what}, e.g. {scheme}:/data/site0{'.npz' if scheme == 'npz' else ''}")
    return Path(target).expanduser()


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


def _num_classes(labels: np.ndarray, declared: int | None, where: str) -> int:
    top = int(labels.max())
    if declared is None:
        return max(2, top + 1)
    if top >= declared:
        raise DataError(f"{where}: label value {top} out of range for num_classes={declared} (valid 0..{declared - 1})")
    return declared


def _check_finite(images: np.ndarray, where: str) -> None:
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).sum())
        raise DataError(f"{where}: images contain {bad} NaN/Inf value(s)")


def normalise_images(images: np.ndarray, how: str, where: str) -> np.ndarray:
    """Map images to float32 [-1, 1].

    ``how``: ``auto`` (uint8 -> [0, 255]; uint16 -> [0, 65535]; otherwise values already in [-1, 1] are
    kept, values in [0, 1] are scaled from [0, 1], integer-valued data in [0, 255] from [0, 255], anything
    else is an error), ``minmax`` (each image channel min-max scaled on its own), or ``LO,HI`` (a declared
    window, clipped).
    """
    if images.size == 0:
        raise DataError(f"{where}: images are empty")
    if not (np.issubdtype(images.dtype, np.number) and not np.issubdtype(images.dtype, np.complexfloating)):
        raise DataError(f"{where}: images have dtype {images.dtype}; expected a real numeric type")
    _check_finite(images, where)
    if how == "minmax":
        x = images.astype(np.float32)
        axes = tuple(range(2, x.ndim))
        lo = x.min(axis=axes, keepdims=True)
        hi = x.max(axis=axes, keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        return np.clip((x - lo) / span * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    if how != "auto":
        try:
            lo_s, hi_s = how.split(",")
            lo_f, hi_f = float(lo_s), float(hi_s)
        except ValueError:
            raise DataError(f"range={how!r}: expected auto, minmax, or LO,HI (e.g. 0,255)") from None
        if not hi_f > lo_f:
            raise DataError(f"range={how!r}: HI must be greater than LO")
        return scale_intensity(images, lo_f, hi_f)
    if images.dtype == np.uint8:
        return scale_intensity(images, 0.0, 255.0)
    if images.dtype == np.uint16:
        return scale_intensity(images, 0.0, 65535.0)
    lo, hi = float(images.min()), float(images.max())
    if lo >= -1.0 and hi <= 1.0:
        if lo < 0.0:
            return np.asarray(images, dtype=np.float32).copy()
        return scale_intensity(images, 0.0, 1.0)
    if lo >= 0.0 and hi <= 255.0 and np.array_equal(images, np.round(images)):
        return scale_intensity(images, 0.0, 255.0)
    raise DataError(
        f"{where}: image values span [{lo:.4g}, {hi:.4g}], which is not [-1, 1], [0, 1] or integer [0, 255]; "
        "add range=minmax (per-image min-max) or range=LO,HI to the spec"
    )


def _finish(
    name: str, labels: np.ndarray, images: np.ndarray, modalities: tuple[str, ...], nc: int, size: int | None
) -> SiteData:
    if size is not None:
        labels, images = resize_square(labels, images, size)
    return SiteData(name=name, labels=labels, images=images, modalities=modalities, num_classes=nc)


# ------------------------------------------------------------------------------------------------------ npz


def _read_npz(path: Path, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(labels, images, modalities or None, num_classes or None) as stored in the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("labels", "images") if k not in keys]
            if missing:
                raise DataError(
                    f"{where}: missing key(s) {', '.join(missing)} (found: {', '.join(sorted(keys)) or 'none'})"
                )
            return (
                z["labels"],
                z["images"],
                z["modalities"] if "modalities" in keys else None,
                z["num_classes"] if "num_classes" in keys else None,
            )
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{where} cannot be read as .npz ({type(exc).__name__}: {exc})") from None


def load_npz(options: dict[str, str], size: int | None = None) -> SiteData:
    """``npz:FILE``: keys ``labels`` (N, H, W) int, ``images`` (N, M, H, W) or (N, H, W); optional
    ``modalities`` (str array) and ``num_classes`` (int)."""
    check_options("npz", options, NPZ_OPTIONS)
    path = _target("npz", options, "file")
    where = f"npz file {path.name!r}"
    out_size = resolve_size(options, size, None)
    if not path.is_file():
        raise DataError(f"{where} not found")
    raw_labels, raw_images, file_mods, file_nc = _read_npz(path, where)
    if raw_labels.ndim != 3:
        raise DataError(f"{where}: labels must have shape (N, H, W), got {raw_labels.shape}")
    if raw_images.ndim == 3:
        raw_images = raw_images[:, None]
    if raw_images.ndim != 4:
        raise DataError(f"{where}: images must have shape (N, M, H, W) or (N, H, W), got {raw_images.shape}")
    if raw_labels.shape[0] == 0:
        raise DataError(f"{where}: contains zero slices")
    if raw_images.shape[0] != raw_labels.shape[0] or raw_images.shape[2:] != raw_labels.shape[1:]:
        raise DataError(f"{where}: shape mismatch between labels {raw_labels.shape} and images {raw_images.shape}")
    labels = as_labels(raw_labels, where)
    images = normalise_images(raw_images, options.get("range", "auto").strip(), where)

    m = images.shape[1]
    mods = list_option(options, "modalities", ())
    if not mods and file_mods is not None:
        if file_mods.dtype.kind not in "US":
            raise DataError(f"{where}: 'modalities' must be an array of strings")
        mods = tuple(str(s) for s in np.atleast_1d(file_mods).tolist())
    if not mods:
        mods = ("t1",) if m == 1 else tuple(f"ch{i}" for i in range(m))
    if len(mods) != m:
        raise DataError(f"{where}: {len(mods)} modality name(s) {mods} for {m} image channel(s)")

    declared = int_option(options, "num_classes", None, 2, 256)
    if file_nc is not None:
        try:
            nc_file = int(file_nc)
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'num_classes' must be an integer") from None
        if declared is not None and declared != nc_file:
            raise DataError(f"{where}: num_classes={declared} in the spec but {nc_file} in the file")
        declared = nc_file
    nc = _num_classes(labels, declared, where)
    return _finish(path.stem, labels, images, mods, nc, out_size)


# ------------------------------------------------------------------------------------------------------ png


def _read_png(path: Path, kind: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("1", "L", "P", "I", "F") and not mode.startswith("I;16"):
                raise DataError(
                    f"{kind} PNG {path.name!r} has mode {mode}; expected single-channel grayscale"
                    + (" or palette" if kind == "label" else "")
                )
            arr = np.asarray(im.convert("L") if mode == "P" and kind == "image" else im)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read {kind} PNG {path.name!r} ({exc})") from None
    if arr.ndim != 2:
        raise DataError(f"{kind} PNG {path.name!r} has shape {arr.shape}; expected a 2D grayscale image")
    return arr


def _png_intensity(img: np.ndarray, where: str) -> np.ndarray:
    """A PNG's pixels as float32 in [-1, 1]: 8-bit /255, 16-bit /65535, anything else normalised."""
    if img.dtype == np.uint8:
        return scale_intensity(img, 0.0, 255.0)
    if img.dtype == np.bool_:
        return img.astype(np.float32) * 2.0 - 1.0
    if np.issubdtype(img.dtype, np.integer) and img.min() >= 0 and img.max() <= 65535:
        return scale_intensity(img, 0.0, 65535.0)  # 16-bit grayscale PNG
    return normalise_images(img[None, None], "auto", where)[0, 0]


def load_png(options: dict[str, str], size: int | None = None) -> SiteData:
    """``png:DIR``: pairs ``DIR/images/<name>.png`` + ``DIR/labels/<name>.png`` (grayscale; labels are class
    indices, 8/16-bit or palette indices; images 8-bit -> /255, 16-bit -> /65535)."""
    check_options("png", options, PNG_OPTIONS)
    root = _target("png", options, "directory")
    where = f"png directory {root.name!r}"
    out_size = resolve_size(options, size, None)
    modality = options.get("modality", "t1").strip()
    if not _MODALITY_RE.match(modality):
        raise DataError(f"modality={modality!r} is not a valid modality name")
    img_dir, lab_dir = root / "images", root / "labels"
    for d in (root, img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"{where}: directory {d.name!r} not found (expected DIR/images/ and DIR/labels/)")
    img_names = {p.stem for p in img_dir.glob("*.png")}
    lab_names = {p.stem for p in lab_dir.glob("*.png")}
    if not img_names and not lab_names:
        raise DataError(f"{where}: no PNG files in images/ and labels/ (zero slices)")
    only_img, only_lab = sorted(img_names - lab_names), sorted(lab_names - img_names)
    if only_img or only_lab:
        parts = []
        if only_img:
            parts.append(f"images without labels: {', '.join(only_img[:5])}{' ...' if len(only_img) > 5 else ''}")
        if only_lab:
            parts.append(f"labels without images: {', '.join(only_lab[:5])}{' ...' if len(only_lab) > 5 else ''}")
        raise DataError(f"{where}: unpaired PNG files ({'; '.join(parts)})")

    labels_list: list[np.ndarray] = []
    images_list: list[np.ndarray] = []
    first_shape: tuple[int, ...] | None = None
    for name in sorted(img_names):
        img = _read_png(img_dir / f"{name}.png", "image")
        lab = _read_png(lab_dir / f"{name}.png", "label")
        if img.shape != lab.shape:
            raise DataError(f"{where}: shape mismatch for {name}.png: image {img.shape} vs label {lab.shape}")
        pair_where = f"{where}, {name}.png"
        lab8 = as_labels(lab, pair_where)
        img_f = _png_intensity(img, pair_where)
        if out_size is not None:
            lab8, img4 = resize_square(lab8[None], img_f[None, None], out_size)
            lab8, img_f = lab8[0], img4[0, 0]
        elif first_shape is None:
            first_shape = lab8.shape
        elif lab8.shape != first_shape:
            raise DataError(
                f"{where}: {name}.png is {lab8.shape[0]}x{lab8.shape[1]} but earlier files are "
                f"{first_shape[0]}x{first_shape[1]}; add size=S to resize all to SxS"
            )
        labels_list.append(lab8)
        images_list.append(img_f)
    labels = np.stack(labels_list)
    images = np.stack(images_list)[:, None].astype(np.float32)
    nc = _num_classes(labels, int_option(options, "num_classes", None, 2, 256), where)
    return SiteData(name=root.name or "png", labels=labels, images=images, modalities=(modality,), num_classes=nc)


# ---------------------------------------------------------------------------------------------------- nifti


def _nifti_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _read_nifti(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not path.is_file():
        raise DataError(f"{kind} NIfTI file {path.name!r} not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]
        affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    except (ImageFileError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {kind} NIfTI file {path.name!r} ({exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{kind} NIfTI file {path.name!r} has shape {data.shape}; expected a 3D volume")
    return np.asarray(data), affine


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
    raw, affine = _read_nifti(lab_path, "labels")
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


def load_nifti(options: dict[str, str], size: int | None = None) -> SiteData:
    """``nifti:labels=PATH&t1=PATH[&t2=PATH...][&axis=2]``: a label volume and one volume per modality.

    Keys other than ``labels``, ``axis``, ``num_classes`` and ``size`` name modalities (in channel order).
    Slices along ``axis`` with no foreground label (> 0) are skipped. Each image volume is normalised on its
    own: its 0.5th/99.5th percentiles (over the whole volume) map to -1/1, values beyond are clipped.
    """
    if "target" in options:
        raise DataError("nifti: spec takes no target; use nifti:labels=PATH&t1=PATH[&axis=2]")
    mods = tuple(k for k in options if k not in NIFTI_RESERVED)
    for m in mods:
        if not _MODALITY_RE.match(m):
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
    out_size = resolve_size(options, size, None)
    lab_path = Path(options["labels"]).expanduser()
    where = f"NIfTI labels {lab_path.name!r}"
    raw_lab, lab_affine = _read_nifti(lab_path, "labels")
    labels_vol = as_labels(raw_lab, where)

    vols = []
    for m in mods:
        path = Path(options[m]).expanduser()
        raw, affine = _read_nifti(path, f"modality {m!r}")
        vwhere = f"NIfTI {m} {path.name!r}"
        if raw.shape != labels_vol.shape:
            raise DataError(f"shape mismatch: {where} is {labels_vol.shape} but {vwhere} is {raw.shape}")
        if not np.allclose(affine, lab_affine, atol=1e-3):
            log.warning("%s and %s have different affines; are they registered?", where, vwhere)
        if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
            raise DataError(f"{vwhere}: dtype {raw.dtype} is not a real numeric type")
        vol = raw.astype(np.float32)
        _check_finite(vol, vwhere)
        lo, hi = (float(v) for v in np.percentile(vol, ROBUST_PERCENTILES))
        if hi <= lo:
            lo, hi = float(vol.min()), float(vol.max())
        if hi <= lo:
            raise DataError(f"{vwhere}: volume is constant ({lo:g}); cannot normalise intensities")
        vols.append(scale_intensity(vol, lo, hi))

    fg = _foreground_slices(labels_vol, axis)
    if fg.size == 0:
        raise DataError(f"{where}: no foreground labels (> 0) in any slice along axis {axis}; zero slices")
    labels = np.ascontiguousarray(np.moveaxis(np.take(labels_vol, fg, axis=axis), axis, 0))
    images = np.stack([np.moveaxis(np.take(v, fg, axis=axis), axis, 0) for v in vols], axis=1)
    nc = _num_classes(labels_vol, int_option(options, "num_classes", None, 2, 256), where)
    return _finish(_nifti_name(lab_path), labels, np.ascontiguousarray(images, np.float32), mods, nc, out_size)
