"""``asyndgan audit`` against a real discriminator process: what an unguarded site leaks.

The site runs as ``asyndgan discriminator`` in a subprocess on 127.0.0.1:0; the attacks speak only the
public Discriminator API to it. :func:`running_site` takes extra discriminator flags, so the same attacks
run against an unguarded site (``--privacy none``: they must show the leak) and a guarded one.
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
from asyndgan.clients.attacks import AttackRun, AuditError, SiteClient, SliceBook, run_active, run_passive
from asyndgan.data import load_site
from asyndgan.messages import SiteDescription

CLI = [sys.executable, "-m", "asyndgan.cli"]
SIZE = 32
BATCH = 8


def site_spec(site: int = 0, of: int = 3, size: int = SIZE) -> str:
    return f"embedded:icbm152?site={site}&of={of}&size={size}"


def _wait_port(path: Path, proc: subprocess.Popen[bytes], log_file: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"discriminator exited with {proc.returncode}: {log_file.read_text()[-2000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"no port file {path} after {timeout} s")


@contextmanager
def running_site(
    tmp_path: Path, extra: Sequence[str] = (), *, spec: str | None = None, batch_size: int = BATCH
) -> Iterator[str]:
    """A real ``asyndgan discriminator`` process (one torch thread); yields its HOST:PORT. ``extra`` flags
    go to the discriminator as they are (e.g. ``["--privacy", "dp"]``)."""
    name = f"site-{time.monotonic_ns()}"
    port_file, log_file = tmp_path / f"{name}.port", tmp_path / f"{name}.log"
    cmd = [*CLI, "discriminator", "--site-id", "hospital-0", "--data", spec or site_spec(), "--listen", "127.0.0.1:0",
           "--port-file", str(port_file), "--checkpoint-dir", str(tmp_path / name), "--no-resume",
           "--batch-size", str(batch_size), "--threads", "1", *extra]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with log_file.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            yield f"127.0.0.1:{_wait_port(port_file, proc, log_file)}"
        finally:
            proc.kill()
            proc.wait(timeout=30)


UNGUARDED = ("--privacy", "none")


def cli_args(*argv: str) -> argparse.Namespace:
    """``asyndgan audit`` flags as the CLI parses them."""
    from asyndgan.cli import add_common

    parser = argparse.ArgumentParser()
    audit.add_arguments(parser)
    add_common(parser)
    return parser.parse_args(argv)


def baseline_db(spec: str) -> float:
    data = load_site(spec)
    return audit.score_slices(dict(enumerate(audit.class_mean_baseline(data))), data).median_db


# -- without a process -----------------------------------------------------------------------------------


def test_roc_auc_is_the_rank_statistic() -> None:
    assert audit.roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert audit.roc_auc([0, 1], [2, 3]) == 0.0
    assert audit.roc_auc([1, 1, 1], [1, 1]) == 0.5
    assert audit.roc_auc([2, 2, 2], [1, 2, 3]) == 0.5
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 30).round(1)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert audit.roc_auc(pos, neg) == pytest.approx(brute)
    with pytest.raises(ValueError):
        audit.roc_auc([], [1.0])


def _augment(rng: np.random.Generator, lab: np.ndarray, img: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """One flip + shift exactly as the site's BatchSampler draws it."""
    if rng.random() < 0.5:
        lab, img = lab[:, ::-1], img[:, :, ::-1]
    dy, dx = rng.integers(-s, s + 1, 2)
    h, w = lab.shape
    lp, ip = np.pad(lab, s), np.pad(img, ((0, 0), (s, s), (s, s)), constant_values=-1.0)
    return lp[s + dy : s + dy + h, s + dx : s + dx + w], ip[:, s + dy : s + dy + h, s + dx : s + dx + w]


def test_slice_book_undoes_flip_and_shift_with_an_exact_oracle() -> None:
    """Against a noise-free sign oracle every visited slice is recovered far beyond 30 dB (pixels at the
    image border, hidden by some shifts, get fewer halvings), so recognising slices under the site's
    augmentation and mapping pixels in and out of each slice's canvas is exact."""
    data = load_site(site_spec(size=SIZE))
    rng = np.random.default_rng(1)
    book = SliceBook(SIZE, SIZE, 1, max_shift=2)
    chosen = rng.choice(len(data), 6, replace=False)
    for _ in range(40):
        views = [_augment(rng, data.labels[i], data.images[i], 2) for i in rng.choice(chosen, 4)]
        places = [book.locate(lab) for lab, _ in views]
        fakes = book.midpoints(places)
        book.bound(places, fakes, np.sign(fakes - np.stack([img for _, img in views])))
    assert len(book.slices) == len(chosen)
    matches = audit.match_slices(book, data)
    assert sorted(m.slice for m in matches.values()) == sorted(chosen)
    assert all(m.mismatches == 0 for m in matches.values())
    run = AttackRun(book, SiteDescription("toy", len(data), data.modalities, SIZE, SIZE, data.num_classes, 4))
    score = audit.score_run(run, data)
    assert score.seen == len(chosen) and min(v for v in score.per_slice if v is not None) > 60, score.per_slice


# -- against a real discriminator process ------------------------------------------------------------------

ACTIVE_STEPS = 120  # measured: >= 90 % of the 75 slices at >= 30 dB after 90 Steps (32 px, batch 8)


@pytest.mark.parametrize(
    ("flags", "leaks"),
    [pytest.param(UNGUARDED, True, id="unguarded"), pytest.param(("--privacy", "dp"), False, id="dp")],
)
def test_active_attack(tmp_path: Path, flags: Sequence[str], leaks: bool) -> None:
    """Chosen fakes + gradient signs: an unguarded site gives its slices away; a guarded one does not."""
    spec = site_spec()
    data = load_site(spec)
    base = baseline_db(spec)
    with running_site(tmp_path, flags) as target, SiteClient(target) as site:
        run = run_active(site, ACTIVE_STEPS if leaks else 60)
    score = audit.score_run(run, data)
    assert len(run.book.slices) == len(data)  # every slice recognised once, despite flips and shifts
    if leaks:
        assert run.steps == ACTIVE_STEPS and not run.stopped
        assert score.share_good >= 0.9, score.as_dict()
        assert score.median_db > base + 10
    else:
        assert score.median_db <= base + 1.0 and score.share_good < 0.1, score.as_dict()


@pytest.mark.slow
def test_passive_attack_beats_the_generators_own_output(tmp_path: Path, one_thread: None) -> None:
    """An honest-but-curious generator that only keeps the bounds a normal run hands it knows the real slices
    better than its own G does (measured: 31 vs 25 dB after 180 Steps; baseline 25.6 dB)."""
    spec = site_spec()
    data = load_site(spec)
    with running_site(tmp_path, UNGUARDED) as target, SiteClient(target) as site:
        run = run_passive(site, 180, seed=0)
    kept = audit.score_run(run, data, "projection")
    own = audit.score_generator(run, data)
    assert run.steps == 180 and kept.seen == len(data)
    assert kept.median_db > own.median_db + 2.0, (kept.median_db, own.median_db)
    assert kept.median_db > baseline_db(spec) + 1.0


@pytest.mark.slow
def test_audit_command_end_to_end_with_membership(tmp_path: Path, one_thread: None) -> None:
    """``run()`` as the CLI calls it: all three attacks, JSON report, against a site and a released G."""
    from asyndgan.clients.generator_client import GeneratorClient

    spec = site_spec()
    heldout = f"embedded:icbm152?split=heldout&scanner=0&of=3&size={SIZE}"
    out = tmp_path / "report.json"
    gen_port, gen_log = tmp_path / "gen.port", tmp_path / "gen.log"
    with running_site(tmp_path, UNGUARDED) as target, gen_log.open("wb") as gen_err:
        gen = subprocess.Popen(
            [*CLI, "generator", "--site", f"hospital-0={target}", "--iterations", "60", "--checkpoint-dir",
             str(tmp_path / "g"), "--listen", "127.0.0.1:0", "--port-file", str(gen_port), "--serve",
             "--threads", "1", "--codec", "f32"],
            stdout=subprocess.DEVNULL, stderr=gen_err,
        )  # fmt: skip
        try:
            generator = f"127.0.0.1:{_wait_port(gen_port, gen, gen_log)}"
            with GeneratorClient(generator, timeout=30) as client:
                deadline = time.monotonic() + 120
                while (status := client.status()).training or status.step < 60:
                    assert time.monotonic() < deadline and gen.poll() is None
                    time.sleep(0.5)
            args = cli_args("--target", target, "--data", spec, "--attack", "all", "--steps", "40",
                            "--generator", generator, "--heldout", heldout, "--out", str(out))  # fmt: skip
            assert audit.run(args) == 0
        finally:
            gen.kill()
            gen.wait(timeout=30)
    report = json.loads(out.read_text())
    assert report["site"]["privacy"] == "none" and report["site"]["num_samples"] == 75
    assert set(report["attacks"]) == {"active", "passive", "membership"}
    active = report["attacks"]["active"]
    assert active["steps"] == 40 and active["slices"] == 75 and len(active["per_slice_psnr_db"]) == 75
    passive = report["attacks"]["passive"]
    assert passive["generator_output"]["median_psnr_db"] is not None
    member = report["attacks"]["membership"]
    assert member["members"] == 75 and member["nonmembers"] > 0 and 0.0 <= member["auc"] <= 1.0
    assert report["baseline"]["median_psnr_db"] > 20


def test_audit_over_mutual_tls(tmp_path: Path) -> None:
    from asyndgan.certs import init_ca, issue
    from asyndgan.rpc import TlsConfig

    ca = tmp_path / "ca"
    init_ca(ca)
    issue(ca, "hospital-0")
    issue(ca, "auditor")
    flags = [*UNGUARDED, "--tls-cert", str(ca / "hospital-0.pem"), "--tls-key", str(ca / "hospital-0.key"),
             "--tls-ca", str(ca / "ca.pem")]  # fmt: skip
    with running_site(tmp_path, flags) as target:
        tls = TlsConfig(ca / "auditor.pem", ca / "auditor.key", ca / "ca.pem")
        with SiteClient(target, tls=tls, server_name="hospital-0") as site:
            assert run_active(site, 3).steps == 3
        with SiteClient(target) as plaintext, pytest.raises(AuditError, match=r"cannot reach|UNAVAILABLE"):
            plaintext.describe()


def test_unreachable_target_and_bad_input_fail_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = site_spec()
    with pytest.raises(
        AuditError, match=f"cannot reach the discriminator: connection refused: nothing listens at 127.0.0.1:{port}"
    ) as e:
        audit.run(cli_args("--target", f"127.0.0.1:{port}", "--data", spec, "--attack", "active"))
    assert "\n" not in str(e.value)
    with pytest.raises(AuditError, match="--data"):
        audit.run(cli_args("--target", f"127.0.0.1:{port}", "--data", "embedded:nope?x=1", "--attack", "active"))
    with pytest.raises(AuditError, match="--heldout"):
        audit.run(cli_args("--data", spec, "--attack", "membership", "--generator", "127.0.0.1:1"))
    with pytest.raises(AuditError, match="--tls-cert"):
        audit.run(cli_args("--target", "127.0.0.1:1", "--data", spec, "--tls-cert", "x.pem"))
