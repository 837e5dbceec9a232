"""Load one site's data from a spec string: ``embedded:``, ``npz:``, ``png:``, ``nifti:``, ``bids:`` or ``manifest:``.

Specs (the syntax is in :mod:`asyndgan.data.spec`; ``docs/data.md`` has the details)::

    embedded:icbm152?site=0&of=3[&size=64][&modalities=t1,t2][&orient=axial,coronal,sagittal]
    embedded:icbm152?split=heldout[&of=3]...
    embedded:icbm152?site=0&of=3&subjects=400[&slices=5][&seed=0]    a virtual population (400 x 5 slices)
    npz:FILE[?num_classes=4][&modalities=t1,t2][&range=auto|minmax|LO,HI][&size=S]
    png:DIR[?num_classes=4][&modality=t1][&size=S]
    nifti:labels=PATH&t1=PATH[&t2=PATH...][&axis=2][&num_classes=4][&size=S][&reorient=none|ras]
    bids:DIR[?modalities=t1,t2][&labels=dseg]...  /  manifest:FILE.csv[?...]   cohorts, see :mod:`.cohort`

``size`` (square side in pixels) may also be passed to :func:`load_site`, which then overrides the spec.
Without a size, ``npz``/``png``/``nifti`` data keep their native shape; with one, each slice is padded to a
centred square with background (label 0, image -1) and resized (see :func:`~.spec.resize_square`).

Every failure raises :class:`~.spec.DataError` with a message naming the problem and the file (by name).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from .cohort import load_cohort
from .embedded import load_embedded
from .nifti import NiftiLayout, load_nifti, nifti_layout, slices_to_volume
from .spec import (
    MODALITY_RE,
    DataError,
    SiteData,
    as_labels,
    check_finite,
    check_options,
    int_option,
    label_classes,
    list_option,
    parse_spec,
    resize_square,
    resolve_size,
    scale_intensity,
)

__all__ = ["NiftiLayout", "as_labels", "load_site", "nifti_layout", "normalise_images", "slices_to_volume"]

log = logging.getLogger(__name__)

NPZ_OPTIONS = ("num_classes", "modalities", "range", "size")
PNG_OPTIONS = ("num_classes", "modality", "size")


def load_site(spec: str, *, size: int | None = None) -> SiteData:
    """Load the site described by ``spec``; ``size`` overrides the spec's ``size=`` option."""
    scheme, options = parse_spec(spec)
    if scheme == "embedded":
        return load_embedded(options, size)
    if scheme == "npz":
        return load_npz(options, size)
    if scheme == "png":
        return load_png(options, size)
    if scheme in ("bids", "manifest"):
        return load_cohort(scheme, options, size)
    return load_nifti(options, size)


# --------------------------------------------------------------------------------------------------- helpers


def _target(scheme: str, options: dict[str, str], what: str) -> Path:
    target = options.get("target", "")
    if not target:
        raise DataError(f"{scheme}: spec needs a {what}, e.g. {scheme}:/data/site0{'.npz' if scheme == 'npz' else ''}")
    return Path(target).expanduser()


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
    check_finite(images, where)
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
    nc = label_classes(labels, declared, where)
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
    if not MODALITY_RE.match(modality):
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
    nc = label_classes(labels, int_option(options, "num_classes", None, 2, 256), where)
    return SiteData(name=root.name or "png", labels=labels, images=images, modalities=(modality,), num_classes=nc)
