"""``asyndgan audit`` against a real discriminator process: what an unguarded site leaks.

The site runs as ``asyndgan discriminator`` in a subprocess on 127.0.0.1:0; the attacks speak only the
public Discriminator API to it. :func:`running_site` takes extra discriminator flags, so the same attacks
can be pointed at a guarded site (``--privacy dp``) once it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from asyndgan.clients import audit
from asyndgan.clients.attacks import AuditError, SiteClient, SliceBook, run_active, run_passive
from asyndgan.data import load_site
from asyndgan.nets import NetConfig

CLI = [sys.executable, "-m", "asyndgan.cli"]
SIZE = 32
BATCH = 8


def site_spec(site: int = 0, of: int = 3, size: int = SIZE) -> str:
    return f"embedded:icbm152?site={site}&of={of}&size={size}"


def _wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"discriminator exited with {proc.returncode}: {err}")
        time.sleep(0.1)
    raise TimeoutError(f"no port file {path} after {timeout} s")


@contextmanager
def running_site(
    tmp_path: Path, extra: Sequence[str] = (), *, spec: str | None = None, batch_size: int = BATCH
) -> Iterator[str]:
    """A real ``asyndgan discriminator`` process (one torch thread); yields its HOST:PORT. ``extra`` flags
    go to the discriminator as they are (e.g. ``["--privacy", "dp"]``)."""
    port_file = tmp_path / f"site-{time.monotonic_ns()}.port"
    cmd = [*CLI, "discriminator", "--site-id", "hospital-0", "--data", spec or site_spec(), "--listen", "127.0.0.1:0",
           "--port-file", str(port_file), "--checkpoint-dir", str(tmp_path / "ck"), "--no-resume",
           "--batch-size", str(batch_size), "--threads", "1", *extra]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        yield f"127.0.0.1:{_wait_port(port_file, proc)}"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
