"""Tests for cohort specs (asyndgan.data.cohort): ``bids:`` trees and ``manifest:`` files of generated NIfTI
volumes, per-slice subject ids, canonical reorientation, missing files and option checks."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asyndgan.data import DataError, load_site
from asyndgan.data.cohort import cohort_entries
from asyndgan.data.loaders import nifti_layout

SHAPE = (16, 16, 8)
# a volume stored as (y, x, z) with x flipped, and one stored z-first: the same world grid as np.eye(4)
SWAPPED = np.array([[0, -1, 0, 15], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
Z_FIRST = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)


def _volumes(seed: int, z: tuple[int, int] = (2, 6)) -> dict[str, np.ndarray]:
    """Labels 0..3 (a disc in slices z[0]..z[1]-1), a float T1 and an int16 T2, with noise (so flips show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    cy, cx = rng.integers(6, 10, 2)
    r = np.hypot(yy - cy, xx - cx)
    plane = np.zeros((16, 16), np.uint8)
    plane[r < 6], plane[r < 4], plane[r < 2] = 1, 2, 3
    lab = np.zeros(SHAPE, np.uint8)
    lab[:, :, z[0] : z[1]] = plane[:, :, None]
    t1 = (lab * 200.0 + rng.uniform(0, 100, SHAPE)).astype(np.float32)
    t2 = ((3 - lab.astype(np.int16)) * 300 + rng.integers(0, 100, SHAPE)).astype(np.int16)
    return {"dseg": lab, "T1w": t1, "T2w": t2}


def _stored(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` (RAS array order) as stored under ``affine`` (one of SWAPPED, Z_FIRST, identity)."""
    if affine is SWAPPED:
        return np.ascontiguousarray(np.flip(data, 0).transpose(1, 0, 2))
    if affine is Z_FIRST:
        return np.ascontiguousarray(data.transpose(2, 0, 1))
    return data


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(_stored(data, aff), aff), str(path))
    return path


def _subject(
    anat: Path, prefix: str, vols: dict[str, np.ndarray], affine: np.ndarray | None = None, skip: tuple[str, ...] = ()
) -> None:
    for suffix, data in vols.items():
        if suffix not in skip:
            _save(anat / f"{prefix}_{suffix}.nii.gz", data, affine)


def _study(root: Path) -> Path:
    """sub-1 (4 slices), sub-2 with two sessions (4 + 3 slices, plus a func-only session), sub-10 (5 slices,
    its label map under derivatives/)."""
    _subject(root / "sub-1" / "anat", "sub-1", _volumes(1))
    _subject(root / "sub-2" / "ses-1" / "anat", "sub-2_ses-1", _volumes(2))
    _subject(root / "sub-2" / "ses-2" / "anat", "sub-2_ses-2", _volumes(3, (1, 4)))
    (root / "sub-2" / "ses-3" / "func").mkdir(parents=True)
    vols = _volumes(4, (3, 8))
    _subject(root / "sub-10" / "anat", "sub-10_acq-fast", vols, skip=("dseg",))
    _save(root / "derivatives" / "manual" / "sub-10" / "anat" / "sub-10_desc-manual_dseg.nii.gz", vols["dseg"])
    return root


# ------------------------------------------------------------------------------------------------------ bids


def test_bids_loads_every_subject_with_its_id(tmp_path: Path) -> None:
    root = _study(tmp_path / "study")
    site = load_site(f"bids:{root}?modalities=t1,t2&axis=2")
    assert site.name == "study" and site.modalities == ("t1", "t2") and site.num_classes == 4
    assert site.images.shape == (4 + 4 + 3 + 5, 2, 16, 16)
    np.testing.assert_array_equal(site.subjects, np.repeat([0, 1, 2], [4, 7, 5]))  # natural order: 1, 2, 10
    assert site.num_subjects == 3  # two sessions of sub-2 are one person
    assert site.images.min() == -1.0 and site.images.max() == 1.0
    assert site.subset(site.subjects == 1).num_subjects == 1
    names = [(e.name, e.subject_id) for e in cohort_entries(f"bids:{root}")]
    assert names == [("sub-1", 0), ("sub-2/ses-1", 1), ("sub-2/ses-2", 1), ("sub-10", 2)]


def test_bids_rows_are_the_nifti_loaders(tmp_path: Path) -> None:
    root = _study(tmp_path / "study")
    site = load_site(f"bids:{root}?modalities=t2,t1&axis=0&size=12&num_classes=5")
    anat = root / "sub-2" / "ses-2" / "anat"
    one = load_site(
        f"nifti:labels={anat / 'sub-2_ses-2_dseg.nii.gz'}&t2={anat / 'sub-2_ses-2_T2w.nii.gz'}"
        f"&t1={anat / 'sub-2_ses-2_T1w.nii.gz'}&axis=0&size=12"
    )
    rows = np.flatnonzero(site.subjects == 1)[-len(one) :]
    np.testing.assert_array_equal(site.labels[rows], one.labels)
    np.testing.assert_array_equal(site.images[rows], one.images)
    assert site.images.shape[1:] == (2, 12, 12) and site.num_classes == 5


def test_reorientation_gives_the_same_slices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vols = _volumes(7)
    root = tmp_path / "study"
    for sub, affine in (("sub-a", None), ("sub-b", SWAPPED), ("sub-c", Z_FIRST)):
        _subject(root / sub / "anat", sub, vols, affine)
    site = load_site(f"bids:{root}?modalities=t1,t2")  # reorient=ras is the default
    a, b, c = (site.subset(site.subjects == k) for k in range(3))
    assert len(a) == 4
    for other in (b, c):
        np.testing.assert_array_equal(other.labels, a.labels)
        np.testing.assert_array_equal(other.images, a.images)
    with pytest.raises(DataError, match=r"subject 'sub-c'.*size=S.*reorient=ras"):
        load_site(f"bids:{root}?reorient=none")
    with caplog.at_level(logging.WARNING, logger="asyndgan.data.cohort"):
        raw = load_site(f"bids:{root}?reorient=none&size=16")
    assert "3 orientations" in caplog.text
    assert not np.array_equal(raw.subset(raw.subjects == 1).labels, a.labels)


def test_nifti_reorient_option(tmp_path: Path) -> None:
    vols = _volumes(8)
    lab, t1 = _save(tmp_path / "lab.nii.gz", vols["dseg"]), _save(tmp_path / "t1.nii.gz", vols["T1w"])
    flab, ft1 = (_save(tmp_path / f"f{n}.nii.gz", vols[k], SWAPPED) for n, k in (("lab", "dseg"), ("t1", "T1w")))
    ref = load_site(f"nifti:labels={lab}&t1={t1}")
    flipped = load_site(f"nifti:labels={flab}&t1={ft1}&reorient=ras")
    np.testing.assert_array_equal(flipped.labels, ref.labels)
    np.testing.assert_array_equal(flipped.images, ref.images)
    assert not np.array_equal(load_site(f"nifti:labels={flab}&t1={ft1}").labels, ref.labels)  # default: none
    layout = nifti_layout(f"nifti:labels={flab}&t1={ft1}&reorient=ras")
    assert layout is not None and nib.orientations.aff2axcodes(layout.affine) == ("R", "A", "S")
    with pytest.raises(DataError, match="reorient="):
        load_site(f"nifti:labels={lab}&t1={t1}&reorient=lps")


def test_bids_missing_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _study(tmp_path / "study")
    _subject(root / "sub-3" / "anat", "sub-3", _volumes(5), skip=("T2w",))
    assert len(load_site(f"bids:{root}")) == 16 + 4  # t1 only: sub-3 is complete
    with pytest.raises(DataError, match=r"subject 'sub-3': no sub-3_\*T2w\.nii\[\.gz\] in sub-3/anat.*missing=skip"):
        load_site(f"bids:{root}?modalities=t1,t2")
    with caplog.at_level(logging.WARNING, logger="asyndgan.data.cohort"):
        site = load_site(f"bids:{root}?modalities=t1,t2&missing=skip")
    assert "skipping subject 'sub-3'" in caplog.text and len(site) == 16 and site.num_subjects == 3
    _subject(root / "sub-4" / "anat", "sub-4", _volumes(6), skip=("dseg",))
    with pytest.raises(DataError, match=r"subject 'sub-4': no sub-4_\*dseg\.nii\[\.gz\] \(labels\)"):
        load_site(f"bids:{root}")
    (root / "sub-5").mkdir()
    with pytest.raises(DataError, match=r"'sub-4': no sub-4_\*dseg.* \| subject 'sub-5': no sub-5_\*T2w.*sub-5/anat"):
        load_site(f"bids:{root}?modalities=t2&missing=error")  # every incomplete subject, in one error
    with pytest.raises(DataError, match="no subject has all its files"):
        load_site(f"bids:{root}?modalities=flair&missing=skip")


def test_bids_rejects(tmp_path: Path) -> None:
    root = _study(tmp_path / "study")
    with pytest.raises(DataError, match=r"unknown option\(s\) 'slices' for bids"):
        load_site(f"bids:{root}?slices=3")
    with pytest.raises(DataError, match="missing='maybe'"):
        load_site(f"bids:{root}?missing=maybe")
    with pytest.raises(DataError, match="needs a folder"):
        load_site("bids:")
    with pytest.raises(DataError, match="'nowhere' not found"):
        load_site(f"bids:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no sub-\\* subject folders"):
        load_site(f"bids:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="not a valid modality"):
        load_site(f"bids:{root}?modalities=t1,a.b")
    _save(root / "sub-1" / "anat" / "sub-1_run-2_T1w.nii.gz", _volumes(1)["T1w"])
    with pytest.raises(DataError, match=r"sub-1/anat: 2 files match.*manifest"):
        load_site(f"bids:{root}")


def test_bids_label_values_checked(tmp_path: Path) -> None:
    root = _study(tmp_path / "study")
    with pytest.raises(DataError, match=r"subject 'sub-1': .*'sub-1_dseg\.nii\.gz'.*label value 3 out of range"):
        load_site(f"bids:{root}?num_classes=3")
    vols = _volumes(9)
    vols["dseg"] = vols["dseg"].astype(np.int16) * 100  # 300 > 255
    _subject(root / "sub-7" / "anat", "sub-7", vols)
    with pytest.raises(DataError, match=r"subject 'sub-7': .*label value 300 too large"):
        load_site(f"bids:{root}")
    vols["dseg"] = -vols["dseg"]
    _subject(root / "sub-7" / "anat", "sub-7", vols)
    with pytest.raises(DataError, match=r"subject 'sub-7': .*negative"):
        load_site(f"bids:{root}")


def test_bids_mixed_shapes_need_size(tmp_path: Path) -> None:
    root = _study(tmp_path / "study")
    big = {k: np.pad(v, ((0, 4), (0, 0), (0, 0))) for k, v in _volumes(11).items()}
    big["T1w"][16:] = 5.0
    _subject(root / "sub-8" / "anat", "sub-8", big)
    with pytest.raises(DataError, match=r"subject 'sub-8': slices are 20x16 .*size=S"):
        load_site(f"bids:{root}")
    assert load_site(f"bids:{root}?size=16").images.shape == (20, 1, 16, 16)


# -------------------------------------------------------------------------------------------------- manifest


def _manifest_case(tmp_path: Path) -> Path:
    """Volumes under data/, a manifest in data/lists/ with paths relative to it (one absolute)."""
    data = tmp_path / "data"
    for k, (sub, z) in enumerate((("p1", (2, 6)), ("p2", (0, 3)), ("p3", (4, 8)))):
        _subject(data / sub, sub, _volumes(20 + k, z), SWAPPED if sub == "p2" else None)
    lists = data / "lists"
    lists.mkdir()
    return lists


def test_manifest_relative_paths(tmp_path: Path) -> None:
    lists = _manifest_case(tmp_path)
    rows = [
        "subject,session,labels,t1,t2",
        "p3,,../p3/p3_dseg.nii.gz,../p3/p3_T1w.nii.gz,../p3/p3_T2w.nii.gz",
        f"p1,,../p1/p1_dseg.nii.gz,{tmp_path / 'data' / 'p1' / 'p1_T1w.nii.gz'},../p1/p1_T2w.nii.gz",
        "p2,scan1,../p2/p2_dseg.nii.gz,../p2/p2_T1w.nii.gz,../p2/p2_T2w.nii.gz",
        "p2,scan2,../p1/p1_dseg.nii.gz,../p1/p1_T1w.nii.gz,../p1/p1_T2w.nii.gz",
    ]
    (lists / "cohort.csv").write_text("\n".join(rows) + "\n\n")
    site = load_site(f"manifest:{lists / 'cohort.csv'}")
    assert site.name == "cohort" and site.modalities == ("t1", "t2")
    np.testing.assert_array_equal(site.subjects, np.repeat([0, 1, 2], [4, 3 + 4, 4]))
    (lists / "cohort.tsv").write_text("\n".join(r.replace(",", "\t") for r in rows[:3]))
    tsv = load_site(f"manifest:{lists / 'cohort.tsv'}?modalities=t2&axis=1&reorient=none")
    assert tsv.modalities == ("t2",) and tsv.num_subjects == 2 and tsv.images.shape[2:] == (16, 8)


def test_manifest_rejects(tmp_path: Path) -> None:
    lists = _manifest_case(tmp_path)

    def spec(text: str, options: str = "") -> str:
        (lists / "m.csv").write_text(text)
        return f"manifest:{lists / 'm.csv'}{options}"

    good = "p1,../p1/p1_dseg.nii.gz,../p1/p1_T1w.nii.gz"
    with pytest.raises(DataError, match=r"subject 'p2': modality 't1' file 'p2_T1.nii.gz' not found"):
        load_site(spec(f"subject,labels,t1\n{good}\np2,../p2/p2_dseg.nii.gz,../p2/p2_T1.nii.gz\n"))
    with pytest.raises(DataError, match=r"subject 'p2': no labels file \(empty cell\)"):
        load_site(spec(f"subject,labels,t1\n{good}\np2,,../p2/p2_T1w.nii.gz\n"))
    assert load_site(spec(f"subject,labels,t1\n{good}\np2,,x.nii.gz\n", "?missing=skip")).num_subjects == 1
    with pytest.raises(DataError, match=r"line 3: subject 'p1' twice"):
        load_site(spec(f"subject,labels,t1\n{good}\n{good}\n"))
    with pytest.raises(DataError, match="no 'labels' column"):
        load_site(spec("subject,seg,t1\np1,a,b\n"))
    with pytest.raises(DataError, match="no modality column"):
        load_site(spec("subject,labels\np1,a\n"))
    with pytest.raises(DataError, match="modality 't2' is not a column"):
        load_site(spec(f"subject,labels,t1\n{good}\n", "?modalities=t2"))
    with pytest.raises(DataError, match="line 2: 2 fields"):
        load_site(spec("subject,labels,t1\np1,a\n"))
    with pytest.raises(DataError, match=r"unknown option\(s\) 'labels' for manifest"):
        load_site(spec(f"subject,labels,t1\n{good}\n", "?labels=dseg"))
    with pytest.raises(DataError, match=r"manifest 'none\.csv' not found"):
        load_site(f"manifest:{lists / 'none.csv'}")
    with pytest.raises(DataError, match="is empty"):
        load_site(spec(""))
    with pytest.raises(DataError, match="lists no subject"):
        load_site(spec("subject,labels,t1\n"))
    with pytest.raises(DataError, match="not a cohort spec"):
        cohort_entries("npz:/a.npz")
