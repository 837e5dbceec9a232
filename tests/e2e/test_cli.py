"""The CLI as a user runs it: real processes on 127.0.0.1, free ports, clean exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from asyndgan.clients.generator_client import GeneratorClient

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "asyndgan.cli"]
SMALL = ["--ngf", "8", "--ndf", "8"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        time.sleep(0.1)
    raise TimeoutError(path)


def test_demo_trains_writes_outputs_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = run("demo", "--sites", "2", "--iterations", "4", "--size", "32", "--batch-size", "4", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("iterations", "sites", "seconds", "wire_bytes_sent", "wire_bytes_received", "payload_bytes",
                "generator_loss", "l1_heldout"):  # fmt: skip
        assert key in summary, key
    assert summary["iterations"] == 4 and len(summary["sites"]) == 2
    assert 0 < summary["wire_bytes_sent"] + summary["wire_bytes_received"] < summary["payload_bytes"]
    assert (out / "samples.png").stat().st_size > 1000
    assert "demo done" in res.stderr
    ports = [int(p.read_text()) for p in (out / "run" / "ports").iterdir()]
    assert len(ports) == 2 and all(port_closed(p) for p in ports), "every process the demo started is gone"


def test_multimodal_sites_and_synthesize_complete_a_missing_modality(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        sites = []
        for j, mods in enumerate(["t1", "t1,t2"]):
            port_file = tmp_path / f"site{j}.port"
            spec = f"embedded:icbm152?site={j}&of=2&size=32&modalities={mods}"
            p = subprocess.Popen(
                [*CLI, "discriminator", "--site-id", f"h{j}", "--data", spec, "--listen", "127.0.0.1:0",
                 "--port-file", str(port_file), "--checkpoint-dir", str(tmp_path / f"ck{j}"), "--batch-size", "4",
                 "--threads", "1", *SMALL],
                stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            procs.append(p)
            sites.append((p, port_file))
        flags = []
        for j, (p, port_file) in enumerate(sites):
            flags += ["--site", f"h{j}=127.0.0.1:{wait_file(port_file, p)}"]
        gen_port = tmp_path / "gen.port"
        gen = subprocess.Popen(
            [*CLI, "generator", *flags, "--iterations", "3", "--checkpoint-dir", str(tmp_path / "g"),
             "--listen", "127.0.0.1:0", "--port-file", str(gen_port), "--serve", "--site-styles", *SMALL],
            stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        procs.append(gen)
        port = int(wait_file(gen_port, gen))
        with GeneratorClient(f"127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while (status := client.status()).training or status.step < 3:
                assert time.monotonic() < deadline and gen.poll() is None
                time.sleep(0.5)
        assert list(status.modalities) == ["t1", "t2"] and list(status.styles) == ["h0", "h1"]
        out = tmp_path / "synth"
        site0 = "embedded:icbm152?site=0&of=2&size=32&modalities=t1"
        # site h0's label maps with the t2 it lacks, in the style of h1's scanner (the site that has t2)
        res = run("synthesize", "--generator", f"127.0.0.1:{port}", "--labels", site0, "--out", str(out),
                  "--style", "h1")  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        bad = run("synthesize", "--generator", f"127.0.0.1:{port}", "--labels", site0, "--out", str(tmp_path / "x"),
                  "--style", "h9")  # fmt: skip
        assert bad.returncode != 0 and "unknown style 'h9'" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        with np.load(out / "synthetic.npz") as z:
            assert list(z["modalities"]) == ["t1", "t2"]
            assert z["images"].shape[1:] == (2, 32, 32) and len(z["images"]) == len(z["labels"])
        assert (out / "png" / "00000_t2.png").exists()

        # Labels from NIfTI: the synthetic volumes come back in the label volume's grid and affine.
        lab = np.zeros((32, 28, 6), np.uint8)
        lab[4:28, 4:24, 1:5] = 1
        lab[8:24, 8:20, 2:4] = 2
        affine = np.diag([1.5, 1.5, 3.0, 1.0])
        nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "seg.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.float32) * 100, affine), str(tmp_path / "t1.nii.gz"))
        spec = f"nifti:labels={tmp_path / 'seg.nii.gz'}&t1={tmp_path / 't1.nii.gz'}"
        out = tmp_path / "synth-nifti"
        res = run("synthesize", "--generator", f"127.0.0.1:{port}", "--labels", spec, "--size", "32",
                  "--out", str(out))  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        back = nib.load(str(out / "labels.nii.gz"))
        np.testing.assert_array_equal(np.asarray(back.dataobj), lab)
        np.testing.assert_allclose(back.affine, affine)
        for m in ("t1", "t2"):
            vol = np.asarray(nib.load(str(out / f"synthetic_{m}.nii.gz")).dataobj)
            assert vol.shape == lab.shape and vol.dtype == np.float32
            assert (vol[..., [0, 5]] == -1).all() and (vol[..., 1:5] != -1).any()  # only foreground slices
        for p in procs[::-1]:
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=60) == 0, "graceful shutdown exits 0"
        assert (tmp_path / "ck0" / "discriminator.pt").exists() and (tmp_path / "g" / "generator.pt").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["discriminator", "--site-id", "x", "--data", "bogus:thing"], "error"),
        (["discriminator", "--site-id", "x", "--data", "embedded:icbm152?site=5&of=3"], "site"),
        (["train-local", "--data", "npz:/nonexistent.npz", "--iterations", "1"], "error"),
        (["generator", "--site", "h0=nohostport", "--checkpoint-dir", "/tmp/x"], "NAME=HOST:PORT"),
        (["generator", "--site", "h0", "--checkpoint-dir", "/tmp/x", "--ema", "1"], "ema (decay) must be in [0, 1)"),
        (
            [
                "synthesize",
                "--generator",
                "127.0.0.1:1",
                "--labels",
                "embedded:icbm152?site=0&of=1",
                "--out",
                "/tmp/x",
                "--tls-cert",
                "a.pem",
            ],
            "go together",
        ),
    ],
)
def test_cli_errors_are_one_readable_line(args: list[str], needle: str) -> None:
    res = run(*args, timeout=120)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in res.stderr


def test_demo_with_mutual_tls_trains(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    res = run(
        "demo", "--sites", "2", "--iterations", "3", "--size", "32", "--batch-size", "4", "--tls", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 3 and all(s["steps_contributed"] == 3 for s in summary["sites"])
    assert (out / "run" / "certs" / "hospital-1.pem").exists()


@pytest.fixture(scope="module")
def bad_targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An address where nothing listens, an HTTP server (the wrong protocol), and a development CA."""
    import http.server
    import threading

    tmp = tmp_path_factory.mktemp("targets")
    http_srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=http_srv.serve_forever, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    assert run("certs", "init", "--dir", str(tmp)).returncode == 0
    assert run("certs", "issue", "client", "--dir", str(tmp)).returncode == 0
    tls = ["--tls-cert", str(tmp / "client.pem"), "--tls-key", str(tmp / "client.key"), "--tls-ca", str(tmp / "ca.pem")]
    yield {"refused": f"127.0.0.1:{closed.getsockname()[1]}", "http": f"127.0.0.1:{http_srv.server_port}", "tls": tls}
    http_srv.shutdown()
    closed.close()


LABELS = "embedded:icbm152?site=0&of=3&size=32"


@pytest.mark.parametrize(
    ("command", "target"),
    [
        ("synthesize", "refused"),
        ("synthesize", "http"),
        ("synthesize", "tls-to-plaintext"),
        ("audit-active", "refused"),
        ("audit-active", "http"),
        ("audit-membership", "tls-to-plaintext"),
    ],
)
def test_unreachable_wrong_tls_or_protocol_is_one_line(
    bad_targets: dict[str, Any], tmp_path: Path, command: str, target: str
) -> None:
    address = bad_targets["refused" if target == "refused" else "http"]
    tls = bad_targets["tls"] if target == "tls-to-plaintext" else []
    args = {
        "synthesize": ["synthesize", "--generator", address, "--labels", LABELS, "--out", str(tmp_path)],
        "audit-active": ["audit", "--target", address, "--data", LABELS, "--attack", "active", "--steps", "2",
                         "--timeout", "10"],
        "audit-membership": ["audit", "--generator", address, "--data", LABELS, "--heldout", LABELS,
                             "--attack", "membership"],
    }[command]  # fmt: skip
    res = run(*args, *tls, timeout=180)
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "terminate called" not in res.stderr, res.stderr[-2000:]
    assert address in lines[0] or "TLS" in lines[0], lines[0]
