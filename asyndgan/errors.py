"""Domain errors of the core. The core raises these; only :mod:`asyndgan.rpc` turns them into gRPC status codes.

- :class:`BadRequest` (a ``ValueError``): the caller sent something malformed -> INVALID_ARGUMENT.
  ``ValueError`` itself, :class:`~asyndgan.codec.CodecError` and :class:`~asyndgan.data.DataError` map the same way.
- :class:`~asyndgan.codec.LimitExceeded`: a payload over the stated limits -> RESOURCE_EXHAUSTED.
- :class:`FailedPrecondition`: well-formed, but not in this state (unknown batch id, ...) -> FAILED_PRECONDITION.
- :class:`BudgetExhausted`: the site's privacy budget would be exceeded -> FAILED_PRECONDITION; the generator
  treats the site as finished, not failed.
"""

from __future__ import annotations

__all__ = [
    "BUDGET_EXHAUSTED_PREFIX",
    "BadRequest",
    "BudgetExhausted",
    "FailedPrecondition",
    "IncompatibleSites",
    "SiteStepError",
]

# The status message of a BudgetExhausted error starts with this; the generator recognises a finished site by it.
BUDGET_EXHAUSTED_PREFIX = "privacy budget exhausted"


class BadRequest(ValueError):
    """The request is malformed (missing field, wrong shape, out-of-range value)."""


class SiteStepError(BadRequest):
    """The generator's message does not fit this site (shape, modality, non-finite values)."""


class IncompatibleSites(ValueError):
    """The sites cannot train one generator together (geometry, classes or settings differ)."""


class FailedPrecondition(Exception):
    """A call arrived in a state where it cannot be served (e.g. unknown or stale batch id)."""


class BudgetExhausted(FailedPrecondition):
    """Answering would spend more privacy budget than the site allows."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{BUDGET_EXHAUSTED_PREFIX}: {detail}")
