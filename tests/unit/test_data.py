"""Tests for asyndgan.data: spec parsing, SiteData validation, the npz/png/nifti loaders, the embedded set."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from asyndgan.data import DataError, SiteData, embedded_slice_index, load_site, parse_spec, site_scanner
from asyndgan.data.embedded import GAP, ORIENTS, load_rescanned
from asyndgan.data.loaders import nifti_layout, slices_to_volume

RNG = np.random.default_rng(0)


def _labels(n: int = 3, h: int = 8, w: int = 10, k: int = 4) -> np.ndarray:
    lab = RNG.integers(0, k, size=(n, h, w)).astype(np.uint8)
    lab[:, 0, 0] = k - 1
    return lab


def _images(n: int = 3, m: int = 1, h: int = 8, w: int = 10) -> np.ndarray:
    return RNG.uniform(0.0, 1.0, size=(n, m, h, w)).astype(np.float32)


def _npz(tmp_path: Path, name: str = "site.npz", **arrays: np.ndarray) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


# ------------------------------------------------------------------------------------------------ spec


def test_parse_spec_forms() -> None:
    assert parse_spec("embedded:icbm152?site=0&of=3") == (
        "embedded",
        {"target": "icbm152", "site": "0", "of": "3"},
    )
    assert parse_spec("npz:/a/b.npz") == ("npz", {"target": "/a/b.npz"})
    assert parse_spec("nifti:labels=a.nii&t1=b.nii&axis=1") == (
        "nifti",
        {"labels": "a.nii", "t1": "b.nii", "axis": "1"},
    )
    assert parse_spec("nifti:?labels=a.nii") == ("nifti", {"labels": "a.nii"})
    assert parse_spec("png:/d/a%26b+c?num_classes=4") == ("png", {"target": "/d/a&b+c", "num_classes": "4"})


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("s3:bucket/x", "unknown data spec scheme 's3'"),
        ("icbm152", "unknown data spec scheme"),
        ("embedded:icbm152?site=0&site=1&of=3", "given twice"),
        ("embedded:icbm152?site", "malformed option"),
    ],
)
def test_parse_spec_errors(spec: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        parse_spec(spec)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------------------- SiteData


def _site(**kw: object) -> SiteData:
    args: dict[str, object] = {
        "name": "s",
        "labels": np.zeros((2, 4, 4), np.uint8),
        "images": np.zeros((2, 1, 4, 4), np.float32),
        "modalities": ("t1",),
        "num_classes": 4,
    }
    args.update(kw)
    return SiteData(**args)  # type: ignore[arg-type]


def test_sitedata_valid() -> None:
    site = _site()
    assert len(site) == 2


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"labels": np.zeros((2, 4, 5), np.uint8)}, "shape mismatch"),
        ({"images": np.zeros((3, 1, 4, 4), np.float32)}, "shape mismatch"),
        (
            {"labels": np.zeros((0, 4, 4), np.uint8), "images": np.zeros((0, 1, 4, 4), np.float32)},
            "no samples",
        ),
        ({"modalities": ("t1", "t2")}, "modality names"),
        ({"modalities": ()}, "modality names"),
        ({"labels": np.zeros((2, 4, 4), np.int64)}, "uint8"),
        ({"images": np.zeros((2, 1, 4, 4), np.float64)}, "float32"),
        ({"labels": np.full((2, 4, 4), 4, np.uint8)}, "out of range"),
        ({"images": np.full((2, 1, 4, 4), np.nan, np.float32)}, "NaN"),
        ({"images": np.full((2, 1, 4, 4), 1.5, np.float32)}, r"outside \[-1, 1\]"),
        ({"num_classes": 1}, "num_classes"),
        ({"name": ""}, "name"),
    ],
)
def test_sitedata_rejects(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        _site(**kw)


# ------------------------------------------------------------------------------------------------- npz


def test_npz_roundtrip_and_ranges(tmp_path: Path) -> None:
    lab = _labels()
    img01 = _images(m=2)
    site = load_site(f"npz:{_npz(tmp_path, labels=lab, images=img01, modalities=np.array(['t1', 't2']))}")
    assert site.images.shape == (3, 2, 8, 10) and site.modalities == ("t1", "t2")
    assert site.num_classes == 4 and site.name == "site"
    np.testing.assert_allclose(site.images, img01 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(site.labels, lab)

    u8 = (img01[:, :1] * 255).astype(np.uint8)
    site = load_site(f"npz:{_npz(tmp_path, 'u8.npz', labels=lab, images=u8[:, 0])}?num_classes=6")
    assert site.modalities == ("t1",) and site.num_classes == 6
    np.testing.assert_allclose(site.images, u8 / 127.5 - 1, atol=1e-6)

    sym = img01 * 2 - 1
    site = load_site(f"npz:{_npz(tmp_path, 'sym.npz', labels=lab, images=sym)}")
    np.testing.assert_allclose(site.images, sym, atol=1e-6)

    big = img01 * 1000.0
    path = _npz(tmp_path, "big.npz", labels=lab, images=big)
    with pytest.raises(DataError, match="range=minmax"):
        load_site(f"npz:{path}")
    site = load_site(f"npz:{path}?range=minmax")
    assert site.images.min() == -1.0 and site.images.max() == 1.0
    site = load_site(f"npz:{path}?range=0,500")
    assert site.images.max() == 1.0


def test_npz_resize(tmp_path: Path) -> None:
    lab = _labels(h=6, w=12)
    path = _npz(tmp_path, labels=lab, images=_images(h=6, w=12))
    site = load_site(f"npz:{path}?size=32")
    assert site.images.shape == (3, 1, 32, 32) and site.labels.shape == (3, 32, 32)
    # padding is background: top rows are label 0 / image -1
    assert (site.labels[:, 0] == 0).all() and np.allclose(site.images[:, :, 0], -1.0)
    assert load_site(f"npz:{path}?size=32", size=16).labels.shape == (3, 16, 16)  # kwarg overrides


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"labels": _labels(), "images": _images(w=9)}, "shape mismatch"),
        ({"labels": _labels(n=2), "images": _images(n=3)}, "shape mismatch"),
        ({"labels": _labels().astype(np.int16) - 1, "images": _images()}, "negative"),
        ({"labels": _labels().astype(np.float32) + 0.5, "images": _images()}, "non-integer"),
        ({"labels": _labels().astype(np.int32) + 300, "images": _images()}, "too large"),
        (
            {"labels": np.zeros((0, 8, 10), np.uint8), "images": np.zeros((0, 1, 8, 10), np.float32)},
            "zero slices",
        ),
        ({"labels": _labels(), "images": np.full((3, 1, 8, 10), np.nan, np.float32)}, "NaN/Inf"),
        ({"labels": _labels(), "images": np.full((3, 1, 8, 10), np.inf, np.float32)}, "NaN/Inf"),
        ({"labels": _labels()}, "missing key.*images"),
        ({"images": _images()}, "missing key.*labels"),
        ({"labels": _labels()[0], "images": _images()}, r"labels must have shape \(N, H, W\)"),
        ({"labels": _labels(), "images": _images(m=2), "modalities": np.array(["t1"])}, "modality name"),
    ],
)
def test_npz_rejects(tmp_path: Path, arrays: dict[str, np.ndarray], needle: str) -> None:
    path = _npz(tmp_path, "bad_site.npz", **arrays)
    with pytest.raises(DataError, match=needle) as info:
        load_site(f"npz:{path}")
    assert "bad_site.npz" in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_npz_num_classes_too_small(tmp_path: Path) -> None:
    path = _npz(tmp_path, labels=_labels(k=4), images=_images())
    with pytest.raises(DataError, match="out of range for num_classes=3"):
        load_site(f"npz:{path}?num_classes=3")


def test_npz_missing_and_broken_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'nope\.npz' not found"):
        load_site(f"npz:{tmp_path / 'nope.npz'}")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot be read"):
        load_site(f"npz:{broken}")
    with pytest.raises(DataError, match="needs a file"):
        load_site("npz:")


def test_npz_unknown_option(tmp_path: Path) -> None:
    path = _npz(tmp_path, labels=_labels(), images=_images())
    with pytest.raises(DataError, match=r"unknown option.*'colour'"):
        load_site(f"npz:{path}?colour=red")
    with pytest.raises(DataError, match="not an integer"):
        load_site(f"npz:{path}?size=big")


# ------------------------------------------------------------------------------------------------- png


def _png_dir(tmp_path: Path, n: int = 3, shape: tuple[int, int] = (8, 10)) -> Path:
    root = tmp_path / "pngsite"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(RNG.integers(0, 256, size=shape).astype(np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(_labels(n=1, h=shape[0], w=shape[1])[0]).save(root / "labels" / f"s{i}.png")
    return root


def test_png_loads(tmp_path: Path) -> None:
    root = _png_dir(tmp_path)
    site = load_site(f"png:{root}?num_classes=5")
    assert site.images.shape == (3, 1, 8, 10) and site.num_classes == 5 and site.name == "pngsite"
    assert site.images.min() >= -1 and site.images.max() <= 1
    assert load_site(f"png:{root}", size=16).images.shape == (3, 1, 16, 16)
    assert load_site(f"png:{root}?modality=flair").modalities == ("flair",)


def test_png_rejects(tmp_path: Path) -> None:
    root = _png_dir(tmp_path)
    with pytest.raises(DataError, match="out of range for num_classes=2"):
        load_site(f"png:{root}?num_classes=2")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / "labels" / "s0.png")
    with pytest.raises(DataError, match=r"shape mismatch for s0\.png"):
        load_site(f"png:{root}")
    (root / "labels" / "s0.png").unlink()
    with pytest.raises(DataError, match="images without labels: s0"):
        load_site(f"png:{root}")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "labels" / "s0.png")
    with pytest.raises(DataError, match="mode RGB"):
        load_site(f"png:{root}")


def test_png_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_site(f"png:{tmp_path / 'nothere'}")
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DataError, match="zero slices"):
        load_site(f"png:{empty}")


def test_png_mixed_sizes_need_size(tmp_path: Path) -> None:
    root = _png_dir(tmp_path)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "images" / "s9.png")
    Image.fromarray(np.ones((12, 12), np.uint8)).save(root / "labels" / "s9.png")
    with pytest.raises(DataError, match="add size="):
        load_site(f"png:{root}")
    assert len(load_site(f"png:{root}?size=12")) == 4


# ----------------------------------------------------------------------------------------------- nifti


def _nii(path: Path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


def _nifti_case(tmp_path: Path) -> tuple[str, str, str]:
    lab = np.zeros((10, 12, 8), np.uint8)
    lab[2:8, 3:9, 2:6] = 1
    lab[4:6, 5:7, 3:5] = 3
    t1 = RNG.uniform(0, 1000, size=lab.shape).astype(np.float32)
    t2 = RNG.uniform(0, 50, size=lab.shape).astype(np.int16)
    return (
        _nii(tmp_path / "seg.nii.gz", lab),
        _nii(tmp_path / "t1.nii.gz", t1),
        _nii(tmp_path / "t2.nii", t2),
    )


def test_nifti_loads(tmp_path: Path) -> None:
    lab, t1, t2 = _nifti_case(tmp_path)
    site = load_site(f"nifti:labels={lab}&t1={t1}&t2={t2}&axis=2")
    assert site.modalities == ("t1", "t2") and site.name == "seg"
    assert site.images.shape == (4, 2, 10, 12)  # only z = 2..5 hold foreground
    assert site.num_classes == 4
    assert site.images.min() == -1.0 and site.images.max() == 1.0
    site = load_site(f"nifti:labels={lab}&t1={t1}&axis=0&num_classes=6", size=16)
    assert site.images.shape == (6, 1, 16, 16) and site.num_classes == 6


@pytest.mark.parametrize("size", [None, 10, 20])
def test_nifti_slices_go_back_into_the_volume(tmp_path: Path, size: int | None) -> None:
    """What synthesize writes as NIfTI: per-slice results put back in the label volume's grid."""
    lab, t1, _ = _nifti_case(tmp_path)
    spec = f"nifti:labels={lab}&t1={t1}&axis=1"
    site = load_site(spec, size=size)
    layout = nifti_layout(spec)
    assert layout is not None and nifti_layout("embedded:icbm152?site=0&of=1") is None
    assert layout.shape == (10, 12, 8) and layout.axis == 1 and list(layout.positions) == [3, 4, 5, 6, 7, 8]
    np.testing.assert_array_equal(layout.affine, np.eye(4))
    labels = slices_to_volume(layout, site.labels, 0, labels=True)
    images = slices_to_volume(layout, site.images[:, 0], -1.0)
    assert labels.dtype == np.uint8 and images.dtype == np.float32 and images.shape == (10, 12, 8)
    orig = np.asarray(nib.load(lab).dataobj)
    if size in (None, 10):  # native (10 x 8), or padded to the 10 x 10 square without resizing: exact
        np.testing.assert_array_equal(labels, orig)
        vol = np.asarray(nib.load(t1).dataobj)
        ref = load_site(spec).images[:, 0]  # the normalised slices, native shape
        np.testing.assert_array_equal(np.moveaxis(images, 1, 0)[3:9], ref)
        assert (images[:, :3] == -1).all() and (images[:, 9:] == -1).all() and vol.shape == images.shape
    else:  # resized 10 -> 20 -> 10: labels survive nearest-neighbour both ways
        np.testing.assert_array_equal(labels, orig)
    with pytest.raises(DataError, match="expected 6 slices"):
        slices_to_volume(layout, site.labels[:2], 0)


def test_nifti_rejects(tmp_path: Path) -> None:
    lab, t1, _ = _nifti_case(tmp_path)
    small = _nii(tmp_path / "small.nii.gz", np.ones((10, 12, 7), np.float32))
    with pytest.raises(DataError, match=r"shape mismatch.*small\.nii\.gz"):
        load_site(f"nifti:labels={lab}&t1={small}")
    nan = np.ones((10, 12, 8), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN/Inf"):
        load_site(f"nifti:labels={lab}&t1={_nii(tmp_path / 'nan.nii.gz', nan)}")
    with pytest.raises(DataError, match=r"'missing\.nii\.gz' not found"):
        load_site(f"nifti:labels={lab}&t1={tmp_path / 'missing.nii.gz'}")
    empty = _nii(tmp_path / "empty.nii.gz", np.zeros((10, 12, 8), np.uint8))
    with pytest.raises(DataError, match="no foreground"):
        load_site(f"nifti:labels={empty}&t1={t1}")
    neg = _nii(tmp_path / "neg.nii.gz", -np.ones((10, 12, 8), np.int16))
    with pytest.raises(DataError, match="negative"):
        load_site(f"nifti:labels={neg}&t1={t1}")
    frac = _nii(tmp_path / "frac.nii.gz", np.full((10, 12, 8), 0.5, np.float32))
    with pytest.raises(DataError, match="non-integer"):
        load_site(f"nifti:labels={frac}&t1={t1}")
    const = _nii(tmp_path / "const.nii.gz", np.ones((10, 12, 8), np.float32))
    with pytest.raises(DataError, match="constant"):
        load_site(f"nifti:labels={lab}&t1={const}")
    with pytest.raises(DataError, match="needs labels="):
        load_site(f"nifti:t1={t1}")
    with pytest.raises(DataError, match="names no image volume"):
        load_site(f"nifti:labels={lab}")
    with pytest.raises(DataError, match="axis=3"):
        load_site(f"nifti:labels={lab}&t1={t1}&axis=3")
    with pytest.raises(DataError, match="out of range for num_classes=2"):
        load_site(f"nifti:labels={lab}&t1={t1}&num_classes=2")
    notnii = tmp_path / "junk.nii.gz"
    notnii.write_bytes(b"junk")
    with pytest.raises(DataError, match=r"cannot read.*junk\.nii\.gz"):
        load_site(f"nifti:labels={lab}&t1={notnii}")


# -------------------------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def sites3() -> list[SiteData]:
    return [load_site(f"embedded:icbm152?site={j}&of=3&modalities=t1,t2") for j in range(3)]


def test_embedded_shapes_and_values(sites3: list[SiteData]) -> None:
    for site in sites3:
        assert site.images.shape[1:] == (2, 64, 64) and site.labels.shape[1:] == (64, 64)
        assert site.num_classes == 4 and site.modalities == ("t1", "t2")
        assert site.images.min() >= -1.0 and site.images.max() <= 1.0
        assert set(np.unique(site.labels)) == {0, 1, 2, 3}
        assert len(site) > 30
        # background (label 0, away from the brain) is near -1
        assert np.median(site.images[:, 0][site.labels == 0]) < -0.8
        # t2 is a different contrast: WM darker than GM in t2, brighter in t1
        t1, t2, lab = site.images[:, 0], site.images[:, 1], site.labels
        assert t1[lab == 3].mean() > t1[lab == 2].mean()
        assert t2[lab == 3].mean() < t2[lab == 2].mean()
        assert t2[lab == 1].mean() > t2[lab == 2].mean()


def test_embedded_sites_partition_disjoint_slabs() -> None:
    for of in (1, 3, 5):
        for orient in ORIENTS:
            parts = [embedded_slice_index(of=of, orient=orient, site=j) for j in range(of)]
            held = embedded_slice_index(of=of, orient=orient, split="heldout")
            allpos = np.concatenate(parts)
            assert len(np.unique(allpos)) == len(allpos)  # disjoint
            assert np.all(np.diff(allpos) > 0)  # site j's slab lies before site j+1's
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            # held-out: contiguous, same for every `of`, never within GAP slices of a training slice
            assert np.all(np.diff(held) == 1) and len(held) >= 4
            np.testing.assert_array_equal(held, embedded_slice_index(of=2, orient=orient, split="heldout"))
            assert np.abs(held[:, None] - allpos[None, :]).min() > GAP


def test_embedded_row_count_matches_index() -> None:
    site = load_site("embedded:icbm152?site=1&of=4&orient=coronal,sagittal", size=32)
    expected = sum(len(embedded_slice_index(of=4, orient=o, site=1)) for o in ("coronal", "sagittal"))
    assert len(site) == expected and site.images.shape[2:] == (32, 32)


def test_embedded_sites_differ_in_scanner(sites3: list[SiteData]) -> None:
    gammas = [site_scanner(j).gamma for j in range(8)]
    assert min(gammas) >= 0.7 and max(gammas) <= 1.4 and len(set(gammas)) == 8
    sigmas = [site_scanner(j).noise_sigma for j in range(8)]
    assert min(sigmas) >= 0.01 and max(sigmas) <= 0.04
    # same tissue, different scanner: WM and GM intensity means differ between sites
    wm = [s.images[:, 0][s.labels == 3].mean() for s in sites3]
    gm = [s.images[:, 0][s.labels == 2].mean() for s in sites3]
    pairs = [(a, b) for a in range(3) for b in range(a + 1, 3)]
    assert all(abs(wm[a] - wm[b]) + abs(gm[a] - gm[b]) > 0.05 for a, b in pairs)


def test_embedded_deterministic(sites3: list[SiteData]) -> None:
    again = load_site("embedded:icbm152?site=1&of=3&modalities=t1,t2")
    np.testing.assert_array_equal(again.images, sites3[1].images)
    np.testing.assert_array_equal(again.labels, sites3[1].labels)
    # a site's scanner does not depend on the number of sites
    assert site_scanner(1) == site_scanner(1)


def test_embedded_heldout() -> None:
    held = load_site("embedded:icbm152?split=heldout&of=3")
    assert held.name == "icbm152-heldout" and held.modalities == ("t1",)
    assert len(held) == sum(len(embedded_slice_index(of=3, orient=o, split="heldout")) for o in ORIENTS)
    assert load_site("embedded:icbm152?split=heldout&scanner=reference&of=3").images.tobytes() == held.images.tobytes()


def test_embedded_heldout_with_a_site_scanner() -> None:
    """``scanner=J``: the same held-out block, imaged the way site J images its own slices."""
    ref = load_site("embedded:icbm152?split=heldout&orient=axial")
    s0 = load_site("embedded:icbm152?split=heldout&scanner=0&orient=axial")
    s1 = load_site("embedded:icbm152?split=heldout&scanner=1&orient=axial")
    assert s1.name == "icbm152-heldout-scanner1"
    np.testing.assert_array_equal(s0.labels, ref.labels)
    np.testing.assert_array_equal(s1.labels, ref.labels)
    assert not np.allclose(s0.images, ref.images, atol=0.02) and not np.allclose(s0.images, s1.images, atol=0.02)
    # site 1's contrast curve (gamma) shows in its held-out rendering as in its training slices
    train1 = load_site("embedded:icbm152?site=1&of=3&orient=axial")
    brain = ref.labels == 3  # white matter
    gamma = site_scanner(1).gamma
    expected = np.mean(((ref.images[:, 0] + 1) / 2)[brain] ** gamma)
    assert abs(np.mean(((s1.images[:, 0] + 1) / 2)[brain]) - expected) < 0.05
    assert abs(np.mean(((train1.images[:, 0] + 1) / 2)[train1.labels == 3]) - expected) < 0.1


def test_a_site_rescanned_by_another_hospitals_scanner() -> None:
    """``load_rescanned``: site 0's own slices imaged by site 1's scanner (the completion experiment's oracle)."""
    _, options = parse_spec("embedded:icbm152?site=0&of=3&orient=axial&modalities=t1,t2")
    own = load_site("embedded:icbm152?site=0&of=3&orient=axial&modalities=t1,t2")
    assert load_rescanned(options, 0).images.tobytes() == own.images.tobytes()  # its own scanner: itself
    other = load_rescanned(options, 1)
    assert other.name == own.name + "-scanner1" and other.modalities == own.modalities
    np.testing.assert_array_equal(other.labels, own.labels)
    assert not np.allclose(other.images, own.images, atol=0.02)
    wm = own.labels == 3  # white matter: site 1's contrast curve shows, as in its held-out rendering
    held1 = load_site("embedded:icbm152?split=heldout&scanner=1&orient=axial")
    assert abs(np.mean(other.images[:, 0][wm]) - np.mean(held1.images[:, 0][held1.labels == 3])) < 0.1
    for bad, needle in (({"subjects": "4"}, "no subjects="), ({}, "out of range")):
        with pytest.raises(DataError, match=needle):
            load_rescanned({**options, **bad}, 1 if bad else 64)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("embedded:icbm152?site=3&of=3", "site=3 out of range for of=3"),
        ("embedded:icbm152?site=0&of=0", "of=0 must be"),
        ("embedded:icbm152?site=-1&of=3", "site=-1 must be"),
        ("embedded:icbm152?site=0", "of= .* is required"),
        ("embedded:icbm152?of=3", "site= is required"),
        ("embedded:icbm152?site=0&of=3&color=1", "unknown option.*'color'"),
        ("embedded:icbm152?site=0&of=3&modalities=flair", "unknown embedded modality 'flair'"),
        ("embedded:icbm152?site=0&of=3&orient=oblique", "unknown orientation 'oblique'"),
        ("embedded:icbm152?split=test&of=3", "split='test'"),
        ("embedded:icbm152?split=heldout&site=0&of=3", "cannot be combined"),
        ("embedded:icbm152?split=heldout&scanner=x1", "scanner='x1': expected 'reference' or a site number"),
        ("embedded:icbm152?split=heldout&scanner=64", "scanner='64'"),
        ("embedded:icbm152?site=0&of=3&scanner=1", "scanner= goes with split=heldout"),
        ("embedded:mni305?site=0&of=3", "unknown embedded data set"),
        ("embedded:icbm152?site=0&of=3&size=0", "size=0 must be"),
        ("embedded:icbm152?site=0&of=1000", "of=1000 must be"),
    ],
)
def test_embedded_rejects(spec: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        load_site(spec)


def test_size_argument_validated() -> None:
    with pytest.raises(DataError, match="size must be"):
        load_site("embedded:icbm152?site=0&of=3", size=0)


def test_png_16bit_and_palette(tmp_path: Path) -> None:
    root = tmp_path / "p16"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.array([[0, 65535], [32768, 0]], np.uint16)).save(root / "images" / "a.png")
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(root / "labels" / "a.png")
    site = load_site(f"png:{root}")
    np.testing.assert_allclose(site.images[0, 0], [[-1, 1], [32768 / 32767.5 - 1, -1]], atol=1e-5)
    np.testing.assert_array_equal(site.labels[0], [[0, 1], [2, 1]])
    assert site.num_classes == 3


def test_resize_square_majority_and_upsample() -> None:
    from asyndgan.data.spec import resize_square

    lab = np.zeros((1, 4, 4), np.uint8)
    lab[0, :2, :2] = [[2, 2], [2, 1]]  # top-left 2x2 block: majority 2
    lab[0, 2:, 2:] = 3
    img = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    small_lab, small_img = resize_square(lab, img, 2)
    np.testing.assert_array_equal(small_lab[0], [[2, 0], [0, 3]])
    np.testing.assert_allclose(small_img[0, 0, 0, 0], img[0, 0, :2, :2].mean(), atol=1e-6)
    big_lab, big_img = resize_square(lab[:, :, :3], img[:, :, :, :3], 8)  # pads 4x3 -> 4x4 first
    assert big_lab.shape == (1, 8, 8) and big_img.shape == (1, 1, 8, 8)
    assert set(np.unique(big_lab)) <= {0, 1, 2, 3}
    assert (big_lab[0, :, -2:] == 0).all()  # the padded column is background
