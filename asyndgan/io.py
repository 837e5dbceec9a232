"""Atomic file writes: a crash never leaves a half-written checkpoint or report."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "remove_stale_temp", "save_checkpoint", "write_bytes_atomic", "write_json_atomic"]


_TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    """Temp files of ``path`` are ``.NAME.<random>.tmp`` in its folder (hidden, and findable after a crash)."""
    return f".{path.name}."


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (permissions ``mode``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp(path: Path) -> int:
    """Delete temp files that :func:`write_bytes_atomic` left beside ``path`` when its process was killed
    mid-write; call it before the owner of ``path`` starts writing (one writer per file). Returns how many."""
    path = Path(path)
    pattern = f"{glob.escape(_temp_prefix(path))}*{_TEMP_SUFFIX}"
    stale = list(path.parent.glob(pattern)) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale temp file(s) of %s", len(stale), path.name)
    return len(stale)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save ``state`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain types only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{Path(path).name} is not an asyndgan checkpoint")
    return state
