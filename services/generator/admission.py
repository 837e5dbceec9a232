"""Which sites may train one generator together: geometry, modalities, training settings and versions."""

from __future__ import annotations

from collections.abc import Sequence

from asyndgan import __version__
from asyndgan.errors import IncompatibleSites
from asyndgan.messages import SiteDescription, TrainingSettings

__all__ = ["Geometry", "check_compatible", "check_joins", "check_settings", "compatible_versions"]

Geometry = tuple[int, int, int, tuple[str, ...]]  # height, width, label classes, modalities


def check_compatible(infos: Sequence[SiteDescription]) -> Geometry:
    """(height, width, num_classes, modalities) shared by all sites, or IncompatibleSites."""
    first = infos[0]
    for i in infos[1:]:
        if (i.height, i.width) != (first.height, first.width):
            raise IncompatibleSites(
                f"site {i.site_id} has {i.height}x{i.width} images, {first.site_id} has {first.height}x{first.width}"
            )
        if i.num_classes != first.num_classes:
            raise IncompatibleSites(
                f"site {i.site_id} has {i.num_classes} label classes, {first.site_id} has {first.num_classes}"
            )
    modalities: list[str] = []
    for i in infos:
        if not i.modalities or i.num_samples == 0 or i.batch_size == 0:
            raise IncompatibleSites(f"site {i.site_id} reports no modalities, samples or batch size")
        modalities += [m for m in i.modalities if m not in modalities]
    return first.height, first.width, first.num_classes, tuple(modalities)


def check_joins(geometry: Geometry, info: SiteDescription) -> None:
    """A site that comes in after training started must fit the generator built from the first sites."""
    height, width, num_classes, modalities = geometry
    if (info.height, info.width, info.num_classes) != (height, width, num_classes):
        raise IncompatibleSites(
            f"site {info.site_id} has {info.height}x{info.width} images with {info.num_classes} label classes; "
            f"the generator was built for {height}x{width} with {num_classes}"
        )
    extra = [m for m in info.modalities if m not in modalities]
    if extra:
        raise IncompatibleSites(f"site {info.site_id} holds modalities {extra} the generator does not produce")


def compatible_versions(ours: str, theirs: str) -> bool:
    """Same major version; while the major is 0, the same minor too (0.1.x talks to 0.1.y, not to 0.2.z)."""
    try:
        a, b = (tuple(int(x) for x in v.split(".")[:2]) for v in (ours, theirs))
    except ValueError:
        return False
    return a[0] == b[0] and (a[0] > 0 or a[1] == b[1])


def check_settings(expected: TrainingSettings | None, info: SiteDescription) -> None:
    """The site runs a compatible version with the generator's training settings, or IncompatibleSites."""
    if not compatible_versions(__version__, info.version):
        raise IncompatibleSites(
            f"site {info.site_id} runs asyndgan {info.version or '(unknown)'}, the generator {__version__}: "
            "upgrade so both share the major version (and, before 1.0, the minor)"
        )
    if expected is None:
        return
    if info.settings is None:
        raise IncompatibleSites(f"site {info.site_id} reports no training settings")
    for name in expected.__dataclass_fields__:
        ours, theirs = getattr(expected, name), getattr(info.settings, name)
        if ours != theirs:
            raise IncompatibleSites(
                f"site {info.site_id} trains with {name} = {theirs}, the generator with {ours}: give every "
                "release the same model flags"
            )
