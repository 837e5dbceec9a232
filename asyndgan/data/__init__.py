"""Site data: label maps and real images for one hospital, loaded from a spec string.

>>> from asyndgan.data import load_site
>>> site = load_site("embedded:icbm152?site=0&of=3")            # doctest: +SKIP
>>> site.labels.shape, site.images.shape, site.modalities       # doctest: +SKIP
((..., 64, 64), (..., 1, 64, 64), ('t1',))

Schemes: ``embedded:`` (simulated hospitals cut from the MNI ICBM152 template, see :mod:`.embedded`),
``npz:``, ``png:`` (see :mod:`.loaders`), ``nifti:`` (one volume, :mod:`.nifti`), ``bids:`` and ``manifest:``
(a cohort of many patients, :mod:`.cohort`); grammar: :mod:`.spec`, ``docs/data.md``.
Every failure is a :class:`DataError` (a ``ValueError``) with a human-readable message.
"""

from .cohort import CohortEntry, cohort_entries
from .embedded import REFERENCE_SCANNER, Scanner, embedded_slice_index, site_scanner
from .loaders import load_site
from .spec import DataError, SiteData, parse_spec

__all__ = [
    "REFERENCE_SCANNER",
    "CohortEntry",
    "DataError",
    "Scanner",
    "SiteData",
    "cohort_entries",
    "embedded_slice_index",
    "load_site",
    "parse_spec",
    "site_scanner",
]
