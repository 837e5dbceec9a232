"""The active reconstruction attack against a real discriminator process (``asyndgan discriminator`` in a
subprocess on 127.0.0.1:0): :func:`~asyndgan.clients.attacks.run_active` speaks only the public API to it,
:func:`~asyndgan.clients.audit.score_run` scores what it rebuilt against the site's real slices."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asyndgan.clients.attacks import AttackRun, SiteClient, run_active
from asyndgan.clients.audit import LEAK_MARGIN_DB, class_mean_baseline, score_run, score_slices
from asyndgan.data import load_site
from asyndgan.experiments.privacy_common import PhaseClock, PrivacyOptions, active_spec, finite, mode_epsilon, mode_key

__all__ = ["active_task", "discriminator_flags", "running_discriminator"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0


def _wait_port(path: Path, proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"discriminator exited with {proc.returncode}: {tail}")
        time.sleep(0.1)
    raise TimeoutError(f"the discriminator wrote no port file {path} in {timeout:.0f} s")


@contextmanager
def running_discriminator(work: Path, spec: str, flags: Sequence[str]) -> Iterator[str]:
    """A real ``asyndgan discriminator`` process for data ``spec`` (one torch thread); yields HOST:PORT."""
    port_file, log_file = work / "site.port", work / "site.log"
    cmd = [sys.executable, "-m", "asyndgan.cli", "discriminator", "--site-id", "hospital-0", "--data", spec,
           "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--checkpoint-dir", str(work / "ckpt"),
           "--no-resume", "--threads", "1", *flags]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with log_file.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            yield f"127.0.0.1:{_wait_port(port_file, proc, log_file, START_TIMEOUT_S)}"
        finally:
            proc.kill()
            proc.wait(timeout=30)


def discriminator_flags(o: PrivacyOptions, mode: str) -> list[str]:
    """``--privacy none``, or ``--privacy dp`` with the mode's epsilon and a budget planned for exactly the
    attack's Steps (the most any one client can get out of the site's epsilon)."""
    common = ["--batch-size", str(o.batch), "--ndf", str(o.ndf)]
    eps = mode_epsilon(mode)
    if eps is None:
        return [*common, "--privacy", "none"]
    return [*common, "--privacy", "dp", "--privacy-epsilon", f"{eps:g}", "--privacy-delta", f"{o.delta:g}",
            "--privacy-steps", str(o.active_steps)]  # fmt: skip


def _attack(o: PrivacyOptions, mode: str, spec: str) -> AttackRun:
    clock = PhaseClock(f"active attack {mode_key(mode)}", o.active_steps, every=max(1, o.active_steps // 5))
    with (
        tempfile.TemporaryDirectory(prefix="asyndgan-active-") as tmp,
        running_discriminator(Path(tmp), spec, discriminator_flags(o, mode)) as target,
        SiteClient(target, timeout=120.0) as client,
    ):
        return run_active(client, o.active_steps, max_shift=2, on_step=lambda i, _r: clock.update(i))


def active_task(o: PrivacyOptions, mode: str) -> dict[str, Any]:
    """Active reconstruction against a site process in mode ``mode``: median PSNR and share of slices >= 30 dB
    (midpoint estimator) vs the class-mean baseline."""
    spec = active_spec(o)
    data = load_site(spec)
    t0 = time.perf_counter()
    run = _attack(o, mode, spec)
    score = score_run(run, data, "midpoint")
    baseline = score_slices(dict(enumerate(class_mean_baseline(data))), data)
    out = {k: v for k, v in score.as_dict().items() if k != "per_slice_psnr_db"} | {
        "mode": mode,
        "spec": spec,
        "steps": run.steps,
        "requested_steps": o.active_steps,
        "stopped": run.stopped or None,
        "attack_seconds": round(run.seconds, 2),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "keys": len(run.book.slices),
        "site_privacy": run.site.privacy.mode,
        "baseline_median_psnr_db": finite(baseline.median_db, 2),
        "baseline_share_ge_30db": round(baseline.share_good, 4),
        "leaks": bool(score.median_db > baseline.median_db + LEAK_MARGIN_DB),
    }
    log.info(
        "active %s: median %.2f dB, %.0f %% of slices >= 30 dB after %d Steps; baseline %.2f dB%s",
        mode_key(mode),
        score.median_db,
        100 * score.share_good,
        run.steps,
        baseline.median_db,
        f" (site stopped: {run.stopped})" if run.stopped else "",
    )
    return out
