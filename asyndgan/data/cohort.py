"""Cohorts: many patients' NIfTI volumes as one site, from a BIDS-like tree or a manifest file.

::

    bids:DIR[?modalities=t1,t2][&labels=dseg][&axis=2][&num_classes=K][&size=S][&reorient=ras|none][&missing=error|skip]
    manifest:FILE.csv|FILE.tsv[?modalities=t1,t2][&axis=2][&num_classes=K][&size=S][&reorient=ras|none][&missing=...]

``bids:`` finds, for each ``DIR/sub-XX[/ses-YY]/anat/``, one ``sub-XX[_ses-YY]_*<SUFFIX>.nii[.gz]`` per
modality (``t1`` -> ``T1w``, ``t2`` -> ``T2w``, ``flair`` -> ``FLAIR``, ``pd`` -> ``PDw``, ``t2star`` ->
``T2starw``; any other name is the suffix itself) and one label map ``..._<labels>.nii[.gz]`` (default ``dseg``),
looked for in ``anat/`` first, then in ``DIR/derivatives/*/sub-XX[/ses-YY]/anat/``. ``manifest:`` reads a CSV (or
TSV, by extension) with columns ``subject``, optional ``session``, ``labels`` and one column per modality;
relative paths are relative to the manifest's folder.

Each volume set goes through the ``nifti:`` loader's core (:func:`~.nifti.nifti_slices`: foreground slices along
``axis``, per-volume robust intensity normalisation, label checks). Volumes are reoriented to the closest
canonical RAS+ axis order by default (``reorient=ras``) so ``axis`` means the same anatomical direction for every
patient. All slices are stacked into one :class:`~.spec.SiteData` whose ``subjects`` holds one id per *person*
(``0..K-1`` in sorted subject order; all sessions of a subject share it): the privacy unit. A subject missing a
file is a :class:`~.spec.DataError` unless ``missing=skip`` (then it is left out with a logged warning).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .nifti import nifti_slices, reorient_option
from .spec import (
    MODALITY_RE,
    DataError,
    SiteData,
    check_options,
    int_option,
    label_classes,
    list_option,
    parse_spec,
    resize_square,
    resolve_size,
)

log = logging.getLogger(__name__)

COMMON_OPTIONS = ("modalities", "axis", "num_classes", "size", "reorient", "missing")
BIDS_OPTIONS = (*COMMON_OPTIONS, "labels")
BIDS_SUFFIX = {"t1": "T1w", "t2": "T2w", "flair": "FLAIR", "pd": "PDw", "t2star": "T2starw"}
MANIFEST_COLUMNS = ("subject", "session", "labels")
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class CohortEntry:
    """One volume set: a subject's (session's) label map and image volumes; ``None`` where a file is missing."""

    subject: str
    session: str
    labels: Path | None
    images: tuple[tuple[str, Path | None], ...]  # (modality, path) in channel order
    problems: tuple[str, ...] = ()  # what is missing, for a human
    subject_id: int = -1  # the privacy unit: one id per subject, set by :func:`cohort_entries`

    @property
    def name(self) -> str:
        return f"{self.subject}/{self.session}" if self.session else self.subject


def _natural(text: str) -> list[object]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _numbered(entries: list[CohortEntry]) -> list[CohortEntry]:
    """Entries sorted by (subject, session), each with its subject's id (index among sorted subjects)."""
    entries = sorted(entries, key=lambda e: (_natural(e.subject), _natural(e.session)))
    ids: dict[str, int] = {}
    for e in entries:
        ids.setdefault(e.subject, len(ids))
    return [replace(e, subject_id=ids[e.subject]) for e in entries]


# ----------------------------------------------------------------------------------------------------- bids


def _find(dirs: list[Path], prefix: str, suffix: str) -> list[Path]:
    """Files ``<prefix>_*<suffix>.nii[.gz]`` (or ``<prefix>_<suffix>...``) in ``dirs``, sorted by name."""
    found = []
    for d in dirs:
        if d.is_dir():
            for p in d.iterdir():
                n = p.name
                if n.startswith(prefix + "_") and (n.endswith(f"_{suffix}.nii.gz") or n.endswith(f"_{suffix}.nii")):
                    found.append(p)
    return sorted(found, key=lambda p: p.name)


def _one(files: list[Path], what: str, where: str, problems: list[str]) -> Path | None:
    if len(files) > 1:
        names = ", ".join(repr(p.name) for p in files[:4])
        raise DataError(f"{where}: {len(files)} files match {what} ({names}); list the volumes in a manifest: instead")
    if not files:
        problems.append(f"no {what} in {where}")
        return None
    return files[0]


def _bids_units(root: Path) -> list[tuple[str, str, Path]]:
    """(subject, session, anat dir) for every ``sub-*`` folder; a subject without ``anat/`` keeps one unit."""
    units = []
    for sub in sorted((d for d in root.glob("sub-*") if d.is_dir()), key=lambda d: _natural(d.name)):
        mine = [(sub.name, "", sub / "anat")] if (sub / "anat").is_dir() else []
        mine += [(sub.name, s.name, s / "anat") for s in sorted(sub.glob("ses-*")) if (s / "anat").is_dir()]
        units += mine or [(sub.name, "", sub / "anat")]
    if not units:
        raise DataError(f"bids folder {root.name!r}: no sub-* subject folders")
    return units


def scan_bids(root: Path, modalities: tuple[str, ...], label_suffix: str) -> list[CohortEntry]:
    """The volume sets of a BIDS-like tree (missing files recorded in ``problems``, not raised)."""
    if not root.is_dir():
        raise DataError(f"bids folder {root.name!r} not found")
    derivatives = sorted(d for d in (root / "derivatives").glob("*") if d.is_dir())
    entries = []
    for subject, session, anat in _bids_units(root):
        prefix = f"{subject}_{session}" if session else subject
        rel = f"{subject}/{session}/anat" if session else f"{subject}/anat"
        problems: list[str] = []
        images = []
        for m in modalities:
            suffix = BIDS_SUFFIX.get(m, m)
            images.append((m, _one(_find([anat], prefix, suffix), f"{prefix}_*{suffix}.nii[.gz]", rel, problems)))
        lab_files = _find([anat], prefix, label_suffix) or _find([d / rel for d in derivatives], prefix, label_suffix)
        what = f"{prefix}_*{label_suffix}.nii[.gz] (labels)"
        labels = _one(lab_files, what, f"{rel} or derivatives/*/{rel}", problems)
        entries.append(CohortEntry(subject, session, labels, tuple(images), tuple(problems)))
    return entries


# ------------------------------------------------------------------------------------------------- manifest


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f, delimiter=delimiter) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path.name!r} ({exc})") from None
    if not rows:
        raise DataError(f"manifest {path.name!r} is empty")
    return rows[0], rows[1:]


def _manifest_columns(header: list[str], wanted: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The modality columns to load, in channel order."""
    if len(set(header)) != len(header) or not all(header):
        raise DataError(f"{where}: header {header} has an empty or repeated column name")
    for col in ("subject", "labels"):
        if col not in header:
            raise DataError(f"{where}: no {col!r} column (header: {', '.join(header)})")
    available = tuple(c for c in header if c not in MANIFEST_COLUMNS)
    mods = wanted or available
    if not mods:
        raise DataError(f"{where}: no modality column; expected e.g. subject,labels,t1[,t2,...]")
    for m in mods:
        if m not in available:
            raise DataError(f"{where}: modality {m!r} is not a column (modality columns: {', '.join(available)})")
        if not MODALITY_RE.match(m):
            raise DataError(f"{where}: column {m!r} is not a valid modality name")
    return mods


def _manifest_path(base: Path, cell: str, what: str, problems: list[str]) -> Path | None:
    if not cell:
        problems.append(f"no {what} file (empty cell)")
        return None
    path = Path(cell).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        problems.append(f"{what} file {path.name!r} not found")
        return None
    return path


def scan_manifest(path: Path, wanted: tuple[str, ...]) -> tuple[list[CohortEntry], tuple[str, ...]]:
    """The volume sets listed in a manifest and the modalities loaded (missing files in ``problems``)."""
    where = f"manifest {path.name!r}"
    if not path.is_file():
        raise DataError(f"{where} not found")
    header, rows = _read_rows(path)
    mods = _manifest_columns(header, wanted, where)
    col = {c: i for i, c in enumerate(header)}
    entries, seen = [], set()
    for n, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataError(f"{where}, line {n}: {len(row)} fields, but the header has {len(header)}")
        subject, session = row[col["subject"]], row[col["session"]] if "session" in col else ""
        if not subject:
            raise DataError(f"{where}, line {n}: empty subject")
        if (subject, session) in seen:
            raise DataError(f"{where}, line {n}: subject {subject!r}{f' session {session!r}' * bool(session)} twice")
        seen.add((subject, session))
        problems: list[str] = []
        labels = _manifest_path(path.parent, row[col["labels"]], "labels", problems)
        images = tuple((m, _manifest_path(path.parent, row[col[m]], f"modality {m!r}", problems)) for m in mods)
        entries.append(CohortEntry(subject, session, labels, images, tuple(problems)))
    if not entries:
        raise DataError(f"{where}: lists no subject")
    return entries, mods


# --------------------------------------------------------------------------------------------------- loading


def _scan(scheme: str, options: dict[str, str]) -> tuple[str, list[CohortEntry]]:
    """(site name, numbered entries) of a ``bids:`` or ``manifest:`` spec's options."""
    check_options(scheme, options, BIDS_OPTIONS if scheme == "bids" else COMMON_OPTIONS)
    target = options.get("target", "")
    if not target:
        example = "bids:/data/study" if scheme == "bids" else "manifest:/data/cohort.csv"
        raise DataError(f"{scheme}: spec needs a {'folder' if scheme == 'bids' else 'file'}, e.g. {example}")
    root = Path(target).expanduser()
    if scheme == "bids":
        mods = list_option(options, "modalities", ("t1",))
        label_suffix = options.get("labels", "dseg").strip()
        for s in (*mods, label_suffix):
            if not _SUFFIX_RE.match(s):
                raise DataError(f"bids: {s!r} is not a valid modality or label suffix")
        entries = scan_bids(root, mods, label_suffix)
    else:
        entries, _ = scan_manifest(root, list_option(options, "modalities", ()))
    return (root.stem if scheme == "manifest" else root.name) or scheme, _numbered(entries)


def cohort_entries(spec: str) -> list[CohortEntry]:
    """The volume sets a ``bids:`` or ``manifest:`` spec names, without loading them (a dry run)."""
    scheme, options = parse_spec(spec)
    if scheme not in ("bids", "manifest"):
        raise DataError(f"{scheme}: is not a cohort spec; expected bids: or manifest:")
    return _scan(scheme, options)[1]


def _usable(entries: list[CohortEntry], missing: str, name: str) -> list[CohortEntry]:
    """Entries with all their files; incomplete ones are an error (``missing=error``) or skipped with a warning."""
    if missing not in ("error", "skip"):
        raise DataError(f"option missing={missing!r}: expected error or skip")
    complete = [e for e in entries if not e.problems]
    bad = [f"subject {e.name!r}: {'; '.join(e.problems)}" for e in entries if e.problems]
    if bad and missing == "error":
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{name}: {' | '.join(bad[:3])}{more} (add missing=skip to leave them out)")
    for line in bad:
        log.warning("%s: skipping %s", name, line)
    if not complete:
        raise DataError(f"{name}: no subject has all its files ({len(entries)} skipped)")
    return complete


def _load_entry(
    e: CohortEntry, axis: int, canonical: bool, declared: int | None, size: int | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(labels, images, axis codes) of one entry's foreground slices; errors name the subject."""
    import nibabel as nib

    assert e.labels is not None
    vols = [(m, p) for m, p in e.images if p is not None]
    try:
        labels, images, affine = nifti_slices(e.labels, vols, axis, canonical)
        label_classes(labels, declared, f"NIfTI labels {e.labels.name!r}")
    except DataError as exc:
        raise DataError(f"subject {e.name!r}: {exc}") from None
    if size is not None:
        labels, images = resize_square(labels, images, size)
    return labels, images, tuple(str(c) for c in nib.orientations.aff2axcodes(affine))


def load_cohort(scheme: str, options: dict[str, str], size: int | None = None) -> SiteData:
    """``bids:DIR?...`` or ``manifest:FILE?...``: every subject's foreground slices stacked into one site,
    ``subjects`` holding each slice's subject id."""
    name, entries = _scan(scheme, options)
    axis = int_option(options, "axis", 2, 0, 2)
    assert axis is not None
    canonical = reorient_option(options, True)
    out_size = resolve_size(options, size, None)
    declared = int_option(options, "num_classes", None, 2, 256)
    entries = _usable(entries, options.get("missing", "error").strip(), f"{scheme} {name!r}")
    labels: list[np.ndarray] = []
    images: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    orientations: set[str] = set()
    for e in entries:
        lab, img, codes = _load_entry(e, axis, canonical, declared, out_size)
        if labels and lab.shape[1:] != labels[0].shape[1:]:
            raise DataError(
                f"subject {e.name!r}: slices are {lab.shape[1]}x{lab.shape[2]} but {entries[0].name!r}'s are "
                f"{labels[0].shape[1]}x{labels[0].shape[2]}; add size=S to resize all to SxS"
                + ("" if canonical else " (or reorient=ras if the volumes are stored in different orientations)")
            )
        labels.append(lab)
        images.append(img)
        ids.append(np.full(len(lab), e.subject_id, np.int64))
        orientations.add("".join(codes))
    if len(orientations) > 1:
        log.warning(
            "%s: volumes are stored in %d orientations (%s); add reorient=ras to slice them alike",
            name,
            len(orientations),
            ", ".join(sorted(orientations)),
        )
    all_labels = np.concatenate(labels)
    nc = label_classes(all_labels, declared, f"{scheme} {name!r}")
    mods = tuple(m for m, _ in entries[0].images)
    site = SiteData(name, all_labels, np.concatenate(images), mods, nc, np.concatenate(ids))
    log.info("%s: %d slices of %d subjects (%d volume sets)", name, len(site), site.num_subjects, len(entries))
    return site
