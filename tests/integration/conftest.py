"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyndgan.certs import init_ca, issue


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A development CA with certificates for site-0, site-1 and the generator, and another CA's generator."""
    good, other = tmp_path_factory.mktemp("ca"), tmp_path_factory.mktemp("other-ca")
    init_ca(good)
    init_ca(other)
    for name in ("site-0", "site-1", "generator"):
        issue(good, name)
    issue(other, "generator")
    return good, other
