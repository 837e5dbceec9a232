#!/usr/bin/env python
"""Build ``asyndgan/data/icbm152.npz``, the small embedded dataset, from the MNI ICBM152 2009a template.

Dev-time only: this script needs nilearn, scipy and nibabel; the runtime loader
(:mod:`asyndgan.data.embedded`) reads only the ``.npz`` it writes, with numpy.

Sources (shipped inside the nilearn wheel, read offline)::

    <nilearn>/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz   T1 template (brain-masked)
    <nilearn>/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz   grey-matter probability
    <nilearn>/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz   white-matter probability

All three are 1 mm isotropic uint8 volumes (197 x 233 x 189, RAS). The T1 file nilearn ships is already
brain-masked (zero outside the template's brain mask; no skull or scalp), and no CSF map or mask is shipped,
so:

1. intracranial mask = (T1 > 0) or (GM + WM > 0.1), morphologically closed (radius 2 mm) and hole-filled in
   3D and per axial slice (this keeps the ventricles and the sulcal/cisternal CSF);
2. everything is resampled to 1.5 mm isotropic (Gaussian anti-alias prefilter, trilinear) and cropped to the
   bounding box of the mask plus a 3-voxel margin;
3. labels: 0 outside the mask, and inside it the argmax of (other = 1 - GM - WM, GM, WM) giving
   1 other intracranial (CSF, vessels, ...), 2 grey matter, 3 white matter.

Outputs: ``t1`` (uint8), ``labels`` (uint8), ``gm`` and ``wm`` (uint8 probabilities x 255, used at run time
to render the simulated T2 contrast), ``affine`` (4x4 float64, voxel -> MNI mm), ``voxel_mm``, and string
metadata. Also writes ``asyndgan/data/NOTICE``.

Usage::

    .venv/bin/python scripts/build_embedded.py [--out asyndgan/data/icbm152.npz] [--voxel 1.5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABEL_NAMES = ("background", "other_intracranial", "grey_matter", "white_matter")
BUILD_VERSION = 1

NOTICE = """\
asyndgan/data/icbm152.npz is derived from the MNI ICBM152 2009a non-linear symmetric template
(T1 and grey/white-matter probability maps), resampled to 1.5 mm, cropped, and turned into a 4-class
label map by scripts/build_embedded.py. The source files were obtained from the copies shipped inside
the nilearn Python package (nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz).

MNI ICBM152 non-linear 2009 template
------------------------------------
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.

Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies. The authors and
McGill University make no representations about the suitability of this
software for any purpose. It is provided "as is" without express or
implied warranty. The authors are not responsible for any data loss,
equipment damage, property loss, or injury to subjects or patients
resulting from the use or misuse of this software package.

References: V. Fonov, A. Evans, R. McKinstry, C. Almli, D. Collins, "Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood", NeuroImage 47 (2009) S102;
V. Fonov et al., "Unbiased average age-appropriate atlases for pediatric studies", NeuroImage 54 (2011)
313-327; D. L. Collins, A. P. Zijdenbos, W. F. C. Baare, A. C. Evans, "ANIMAL+INSECT: Improved Cortical
Structure Segmentation", IPMI 1999.

nilearn
-------
The files were distributed with nilearn (https://nilearn.github.io), which is licensed under the
BSD 3-Clause License:

Copyright (c) The nilearn developers.
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:
1. Redistributions of source code must retain the above copyright notice, this list of conditions
   and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
   conditions and the following disclaimer in the documentation and/or other materials provided
   with the distribution.
3. Neither the name of the University nor the names of its contributors may be used to endorse or
   promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER
IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF
THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

The simulated scanners and the simulated T2 contrast that asyndgan renders at run time from these
data (asyndgan/data/embedded.py) are not part of the template and not endorsed by its authors.
"""


def _source_dir() -> Path:
    return Path(nilearn.__file__).resolve().parent / "datasets" / "data"


def _load(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    path = _source_dir() / SOURCES[name]
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.float32)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return data, np.asarray(img.affine, dtype=np.float64), digest


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    zz, yy, xx = np.meshgrid(r, r, r, indexing="ij")
    return (xx**2 + yy**2 + zz**2) <= radius**2


def intracranial_mask(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Binary intracranial mask at the source resolution (see module docstring)."""
    mask = (t1 > 0) | ((gm + wm) > 0.1)
    mask = ndimage.binary_closing(np.pad(mask, 4), structure=_ball(2))[4:-4, 4:-4, 4:-4]
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    # keep the largest connected component
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return mask


def resample(vol: np.ndarray, voxel: float, order: int = 1) -> np.ndarray:
    """Resample a 1 mm volume to ``voxel`` mm isotropic with an anti-alias prefilter.

    Output voxel i sits at source coordinate i * voxel (so the output affine is the source affine with its
    linear part scaled by ``voxel``).
    """
    sigma = np.sqrt(max(voxel**2 - 1.0, 0.0)) / 2.355
    src = ndimage.gaussian_filter(vol, sigma) if sigma > 0 else vol
    shape = tuple(int(np.floor((s - 1) / voxel)) + 1 for s in vol.shape)
    grid = np.meshgrid(*[np.arange(n) * voxel for n in shape], indexing="ij")
    return ndimage.map_coordinates(src, grid, order=order, mode="constant", cval=0.0).astype(np.float32)


def build(voxel: float = 1.5, margin: int = 3) -> dict[str, np.ndarray]:
    t1, affine, h_t1 = _load("t1")
    gm, _, h_gm = _load("gm")
    wm, _, h_wm = _load("wm")
    t1 /= 255.0
    gm /= 255.0
    wm /= 255.0
    mask = intracranial_mask(t1, gm, wm).astype(np.float32)

    t1_r = resample(t1, voxel)
    gm_r = resample(gm, voxel)
    wm_r = resample(wm, voxel)
    mask_r = resample(mask, voxel) > 0.5
    # tissue probabilities live inside the mask only
    gm_r = np.clip(gm_r, 0, 1) * mask_r
    wm_r = np.clip(wm_r, 0, 1) * mask_r
    other = np.clip(1.0 - gm_r - wm_r, 0, 1)
    labels = (np.argmax(np.stack([other, gm_r, wm_r]), axis=0) + 1).astype(np.uint8)
    labels[~mask_r] = 0

    idx = np.argwhere(mask_r | (t1_r > 0.02))
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, np.array(mask_r.shape))
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] * voxel
    out_affine[:3, 3] = affine[:3, :3] @ (lo.astype(np.float64) * voxel) + affine[:3, 3]

    def u8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

    meta = {
        "name": "icbm152",
        "build_version": BUILD_VERSION,
        "source": "MNI ICBM152 2009a nonlinear symmetric template, via nilearn " + nilearn.__version__,
        "source_files": {k: SOURCES[k] for k in SOURCES},
        "source_sha256": {"t1": h_t1, "gm": h_gm, "wm": h_wm},
        "voxel_mm": voxel,
        "crop_lo_voxels": [int(v) for v in lo],
        "axes": "RAS: axis0 = x (left->right, sagittal slices), axis1 = y (posterior->anterior, coronal),"
        " axis2 = z (inferior->superior, axial)",
        "label_names": list(LABEL_NAMES),
        "notice": "see asyndgan/data/NOTICE",
    }
    return {
        "t1": u8(t1_r[crop]),
        "labels": labels[crop],
        "gm": u8(gm_r[crop]),
        "wm": u8(wm_r[crop]),
        "affine": out_affine,
        "voxel_mm": np.array(voxel, dtype=np.float64),
        "label_names": np.array(LABEL_NAMES),
        "meta_json": np.array(json.dumps(meta, sort_keys=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "asyndgan" / "data" / "icbm152.npz")
    parser.add_argument("--voxel", type=float, default=1.5)
    args = parser.parse_args()
    arrays = build(voxel=args.voxel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)  # type: ignore[arg-type]
    (args.out.parent / "NOTICE").write_text(NOTICE, encoding="utf-8")
    counts = np.bincount(arrays["labels"].ravel(), minlength=len(LABEL_NAMES))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), shape {arrays['t1'].shape}")
    print("label voxel counts:", dict(zip(LABEL_NAMES, counts.tolist(), strict=True)))


if __name__ == "__main__":
    main()
