"""Site data for the experiments: loading a setting's sites and held-out sets, pooling, contiguous held-out
blocks, synthetic stand-ins for sites, and the embedded data set as N simulated sites."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from asyndgan.data import DataError, SiteData, load_site
from asyndgan.experiments.settings import Setting

__all__ = [
    "LoadedSetting",
    "embedded_sites",
    "label_pool",
    "load_setting",
    "pool_sites",
    "restrict",
    "split_contiguous",
    "synthetic_sites",
]


def embedded_sites(size: int, sites: int) -> list[SiteData]:
    """The embedded data set split into ``sites`` simulated hospitals at ``size`` px."""
    return [load_site(f"embedded:icbm152?site={j}&of={sites}&size={size}") for j in range(sites)]


@functools.lru_cache(maxsize=4)
def label_pool(size: int) -> tuple[np.ndarray, int]:
    """All embedded label maps at ``size`` px (one site) and the number of classes."""
    data = load_site(f"embedded:icbm152?site=0&of=1&size={size}")
    return data.labels, data.num_classes


def restrict(site: SiteData, modalities: Sequence[str], name: str | None = None) -> SiteData:
    """``site`` with only ``modalities`` (in that order) and optionally a new name."""
    idx = [site.modalities.index(m) for m in modalities]
    images = site.images if idx == list(range(len(site.modalities))) else site.images[:, idx]
    return SiteData(name or site.name, site.labels, np.ascontiguousarray(images), tuple(modalities), site.num_classes)


def pool_sites(sites: Sequence[SiteData], name: str = "pooled") -> SiteData:
    """All sites' samples in one :class:`SiteData` (same modalities, classes and plane size required)."""
    first = sites[0]
    for s in sites[1:]:
        if s.modalities != first.modalities or s.num_classes != first.num_classes:
            raise DataError(f"cannot pool {s.name!r} with {first.name!r}: modalities or classes differ")
    return SiteData(
        name,
        np.concatenate([s.labels for s in sites]),
        np.concatenate([s.images for s in sites]),
        first.modalities,
        first.num_classes,
    )


def split_contiguous(site: SiteData, fraction: float, gap: int) -> tuple[SiteData, SiteData]:
    """Cut the centred contiguous block of ``fraction`` of the rows out as held-out, dropping ``gap`` rows
    on each side of it (rows are assumed to be in slice order, as every loader returns them).

    A contiguous block with a gap, not interleaved rows: a generator (or segmenter) could otherwise score well
    on held-out slices by remembering their immediate neighbours.
    """
    n = len(site)
    h = max(1, round(n * fraction))
    start = (n - h) // 2
    keep = np.r_[0 : max(0, start - gap), min(n, start + h + gap) : n].astype(np.int64)
    if len(keep) == 0:
        raise DataError(
            f"site {site.name!r}: {n} slices leave no training slices after a held-out block of {h} and gap {gap}"
        )
    held = SiteData(
        f"{site.name}-heldout",
        site.labels[start : start + h],
        site.images[start : start + h],
        site.modalities,
        site.num_classes,
    )
    train = SiteData(site.name, site.labels[keep], site.images[keep], site.modalities, site.num_classes)
    return train, held


def synthetic_sites(sites: list[SiteData], synth: np.ndarray, tag: str) -> list[SiteData]:
    """Each site's label maps with the matching rows of ``synth`` (site order) as its images."""
    out, start = [], 0
    for s in sites:
        n = len(s)
        out.append(
            SiteData(
                f"{s.name}-{tag}", s.labels, np.ascontiguousarray(synth[start : start + n]), s.modalities, s.num_classes
            )
        )
        start += n
    return out


@dataclass
class LoadedSetting:
    sites: list[SiteData]
    heldout: SiteData
    modalities: tuple[str, ...]
    num_classes: int
    shifted: SiteData | None = None
    heldout_sites: np.ndarray | None = None  # per held-out row: the site whose scanner imaged it (None: unknown)


def _load_pooled(specs: Sequence[str], size: int | None, name: str) -> tuple[SiteData, list[int]]:
    """The specs' data pooled, and each spec's number of rows."""
    parts = [load_site(spec, size=size) for spec in specs]
    mods = _common_modalities(parts)
    return pool_sites([restrict(p, mods) for p in parts], name), [len(p) for p in parts]


def load_setting(s: Setting) -> LoadedSetting:
    """Load and check a setting's sites and held-out set(s); keep only the modalities all of them hold. The
    held-out rows' sites are known when the block is cut from the sites, or when there is one held-out spec per
    site (the j-th is taken as imaged by site j's scanner, as in the embedded settings)."""
    raw = [load_site(spec, size=s.size) for spec in s.site_specs]
    if s.heldout_specs:
        held_raw, counts = _load_pooled(s.heldout_specs, s.size, "heldout")
    else:
        cut = [split_contiguous(r, s.holdout_fraction, s.holdout_gap) for r in raw]
        raw = [c[0] for c in cut]
        held_raw = pool_sites([restrict(c[1], _common_modalities([c[1] for c in cut])) for c in cut], "heldout")
        counts = [len(c[1]) for c in cut]
    held_sites = np.repeat(np.arange(len(raw)), counts) if len(counts) == len(raw) else None
    shifted_raw = _load_pooled(s.shifted_specs, s.size, "shifted")[0] if s.shifted_specs else None
    everyone = [*raw, held_raw, *([shifted_raw] if shifted_raw is not None else [])]
    common = _common_modalities(everyone)
    num_classes = {d.num_classes for d in everyone}
    if len(num_classes) != 1:
        raise DataError(f"sites and held-out set disagree on the number of classes: {sorted(num_classes)}")
    shapes = {d.labels.shape[1:] for d in everyone}
    if len(shapes) != 1:
        raise DataError(f"sites and held-out set have different slice sizes {sorted(shapes)}; pass --size")
    sites = [restrict(r, common, f"hospital-{j}") for j, r in enumerate(raw)]
    heldout = restrict(held_raw, common, "heldout")
    shifted = restrict(shifted_raw, common, "shifted") if shifted_raw is not None else None
    return LoadedSetting(sites, heldout, common, num_classes.pop(), shifted, held_sites)


def _common_modalities(data: Sequence[SiteData]) -> tuple[str, ...]:
    common = [m for m in data[0].modalities if all(m in d.modalities for d in data[1:])]
    if not common:
        raise DataError("the sites and the held-out set share no modality; the segmenter needs a common input")
    return tuple(common)
