"""Tests for the embedded data set's virtual population (``subjects=K``) and ``SiteData.subjects``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from asyndgan.data import DataError, SiteData, load_site
from asyndgan.data.embedded import AXIS, SUBJECT_ID_STRIDE, _take, _template, parse_embedded
from asyndgan.data.population import IDENTITY, render_subjects, site_planes, virtual_subject

DOCUMENTED = "embedded:icbm152?site=0&of=3&size=64&subjects=400"


@pytest.fixture(scope="module")
def big() -> SiteData:
    return load_site(DOCUMENTED)


def _slice_hashes(site: SiteData) -> set[bytes]:
    return {site.images[i].tobytes() for i in range(len(site))}


def test_documented_setting_size_and_ids(big: SiteData) -> None:
    assert len(big) >= 2000
    assert big.images.shape == (2000, 1, 64, 64) and big.labels.shape == (2000, 64, 64)
    assert big.subjects.dtype == np.int64 and big.subjects.shape == (len(big),)
    ids, counts = np.unique(big.subjects, return_counts=True)
    np.testing.assert_array_equal(ids, SUBJECT_ID_STRIDE + np.arange(400))
    assert (counts == 5).all() and big.num_subjects == 400
    assert (np.diff(big.subjects) >= 0).all()  # rows grouped by subject
    assert big.name == "icbm152-site0of3-subjects400x5"


def test_labels_in_range_and_aligned_with_images(big: SiteData) -> None:
    lab, img = big.labels, big.images[:, 0]
    assert lab.dtype == np.uint8 and int(lab.max()) == 3 and set(np.unique(lab).tolist()) == {0, 1, 2, 3}
    assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    means = [float(img[lab == c].mean()) for c in range(4)]
    assert means[0] < -0.85  # background sits near the image minimum (plus Rician noise)
    assert means[0] < means[1] < means[2] < means[3]  # T1: CSF/other < grey < white matter
    assert float((img[lab == 0] < -0.7).mean()) > 0.97
    assert float((img[lab > 0] > -0.7).mean()) > 0.9


def test_t2_contrast_follows_deformed_labels() -> None:
    site = load_site("embedded:icbm152?site=1&of=3&subjects=12&modalities=t1,t2&size=32")
    t2 = site.images[:, 1]
    other, gm, wm = (float(t2[site.labels == c].mean()) for c in (1, 2, 3))
    assert other > gm > wm  # simulated T2: CSF bright, white matter dark


def test_deterministic_and_seeded() -> None:
    spec = "embedded:icbm152?site=2&of=3&subjects=16&slices=3&modalities=t1,t2&size=32"
    a, b = load_site(spec), load_site(spec)
    assert a.images.tobytes() == b.images.tobytes() and a.labels.tobytes() == b.labels.tobytes()
    np.testing.assert_array_equal(a.subjects, b.subjects)
    c = load_site(spec + "&seed=1")
    np.testing.assert_array_equal(a.subjects, c.subjects)
    assert not _slice_hashes(a) & _slice_hashes(c)
    assert c.name.endswith("-seed1")


def test_subject_does_not_depend_on_population_size() -> None:
    small = load_site("embedded:icbm152?site=0&of=3&subjects=3&size=32")
    large = load_site("embedded:icbm152?site=0&of=3&subjects=55&size=32")  # spans two render chunks (51 subjects each)
    n = len(small)
    assert large.images[:n].tobytes() == small.images.tobytes()
    np.testing.assert_array_equal(large.labels[:n], small.labels)
    np.testing.assert_array_equal(large.subjects[:n], small.subjects)


def test_heldout_subjects_disjoint_from_training() -> None:
    sites = [load_site(f"embedded:icbm152?site={j}&of=3&subjects=30&size=32") for j in range(3)]
    held = load_site("embedded:icbm152?split=heldout&of=3&subjects=30&size=32")
    np.testing.assert_array_equal(np.unique(held.subjects), np.arange(30))
    seen_ids: set[int] = set()
    seen_images: set[bytes] = set()
    for s in [*sites, held]:
        ids = set(s.subjects.tolist())
        assert not ids & seen_ids
        hashes = _slice_hashes(s)
        assert len(hashes) == len(s) and not hashes & seen_images
        seen_ids |= ids
        seen_images |= hashes


def test_heldout_scanner_images_same_subjects_differently() -> None:
    ref = load_site("embedded:icbm152?split=heldout&subjects=10&size=32")
    s1 = load_site("embedded:icbm152?split=heldout&scanner=1&subjects=10&size=32")
    np.testing.assert_array_equal(ref.subjects, s1.subjects)
    np.testing.assert_array_equal(ref.labels, s1.labels)
    assert float(np.abs(ref.images - s1.images).mean()) > 0.01


def test_identity_subject_reproduces_the_template_slices() -> None:
    req = parse_embedded({"site": "1", "of": "3", "subjects": "1", "size": "128"})
    flat = dataclasses.replace(req, scanner=dataclasses.replace(req.scanner, gamma=1.0, bias_amplitude=0.0))
    planes = site_planes(flat)
    lab, img = render_subjects([IDENTITY], [planes], flat)
    tpl = _template()
    ref_lab = np.concatenate([_take(tpl["labels"], AXIS[o], np.array([p]), 0) for o, p in planes])
    ref_img = np.concatenate([_take(tpl["vols"]["t1"], AXIS[o], np.array([p]), 0.0) for o, p in planes]) * 2 - 1
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_allclose(img[:, 0], ref_img, atol=1e-4)


def test_deformations_differ_across_subjects() -> None:
    req = parse_embedded({"site": "0", "of": "3", "subjects": "1", "size": "64", "orient": "coronal"})
    plane = site_planes(req)[10]
    subjects = [IDENTITY] + [virtual_subject(0, 1, k) for k in range(6)]
    lab, _ = render_subjects(subjects, [[plane]] * len(subjects), req)
    for i in range(len(subjects)):
        for j in range(i):
            changed = float((lab[i] != lab[j]).mean())
            assert changed > 0.01, (i, j, changed)


def test_deformations_are_smooth_and_invertible() -> None:
    grid = np.stack(np.meshgrid(*[np.linspace(-60.0, 60.0, 9)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for k in range(50):
        s = virtual_subject(0, 1, k)
        phase = grid @ s.waves.T + s.phases
        jac = s.matrix[None] + np.einsum("nf,fi,fj->nij", np.cos(phase), s.amps, s.waves)
        assert np.linalg.det(jac).min() > 0.3
        assert np.linalg.norm(np.sin(phase) @ s.amps, axis=1).max() < 15.0  # voxels


def test_sites_have_distinct_subjects() -> None:
    a = virtual_subject(0, 1, 5)
    b = virtual_subject(0, 2, 5)
    assert not np.allclose(a.matrix, b.matrix) and not np.allclose(a.amps, b.amps)


def test_without_subjects_every_example_is_its_own_subject() -> None:
    site = load_site("embedded:icbm152?site=0&of=3&orient=axial")
    assert site.subjects.dtype == np.int64
    np.testing.assert_array_equal(site.subjects, np.arange(len(site)))
    plain = SiteData("s", np.zeros((3, 4, 4), np.uint8), np.zeros((3, 1, 4, 4), np.float32), ("t1",), 4)
    np.testing.assert_array_equal(plain.subjects, [0, 1, 2])
    sub = site.subset(np.array([4, 2]))
    np.testing.assert_array_equal(sub.subjects, [4, 2])
    np.testing.assert_array_equal(sub.labels, site.labels[[4, 2]])


@pytest.mark.parametrize(
    ("subjects", "needle"),
    [
        (np.zeros(2, np.int64), r"shape \(3,\)"),
        (np.zeros((3, 1), np.int64), r"shape \(3,\)"),
        (np.zeros(3, np.float32), "integer ids"),
        (np.zeros(3, np.bool_), "integer ids"),
        ([0, 1, 2], "numpy array"),
    ],
)
def test_sitedata_rejects_bad_subjects(subjects: object, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        SiteData("s", np.zeros((3, 4, 4), np.uint8), np.zeros((3, 1, 4, 4), np.float32), ("t1",), 4, subjects)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("site=0&of=3&subjects=0", r"subjects=0 must be in \[1, 100000\]"),
        ("site=0&of=3&subjects=-4", "subjects=-4 must be"),
        ("site=0&of=3&subjects=many", "subjects='many' is not an integer"),
        ("site=0&of=3&subjects=2.5", "subjects='2.5' is not an integer"),
        ("site=0&of=3&subjects=100001", "subjects=100001 must be"),
        ("site=0&of=3&subjects=10&slices=0", "slices=0 must be"),
        ("site=0&of=3&subjects=10&slices=x", "slices='x' is not an integer"),
        ("site=0&of=3&subjects=10&seed=-1", "seed=-1 must be"),
        ("site=0&of=3&slices=4", "slices= goes with subjects="),
        ("site=0&of=3&seed=4", "seed= goes with subjects="),
        (
            "site=0&of=64&orient=axial&subjects=10&slices=5",
            r"slices=5 is more than the 2 slice positions.*use slices<=2",
        ),
    ],
)
def test_bad_population_options(query: str, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        load_site(f"embedded:icbm152?{query}")


def test_same_arrays_with_one_intra_op_thread() -> None:
    spec = "embedded:icbm152?site=1&of=3&subjects=8&size=32"
    before = torch.get_num_threads()
    a = load_site(spec)
    try:
        torch.set_num_threads(1)
        b = load_site(spec)
    finally:
        torch.set_num_threads(before)
    assert a.images.tobytes() == b.images.tobytes() and a.labels.tobytes() == b.labels.tobytes()
