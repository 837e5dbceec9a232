"""Faults with real processes: SIGKILL a site, SIGKILL the generator, kill during checkpoint writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.io import load_checkpoint, remove_stale_temp
from asyndgan.v1 import discriminator_pb2 as dpb
from asyndgan.v1 import discriminator_pb2_grpc as dpb_grpc
from asyndgan.v1 import generator_pb2 as gpb

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLI = [sys.executable, "-m", "asyndgan.cli"]
SMALL = ["--ngf", "8", "--ndf", "8", "--threads", "1"]
DEADLINE = 5.0


class Cluster:
    """Two discriminator processes and a generator process, as a user starts them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def start_site(self, j: int, port: int = 0) -> int:
        name = f"h{j}"
        port_file = self.tmp / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.procs[name] = subprocess.Popen(
            [*CLI, "discriminator", "--site-id", name, "--data", f"embedded:icbm152?site={j}&of=2&size=32",
             "--listen", f"127.0.0.1:{port}", "--port-file", str(port_file), "--batch-size", "4",
             "--checkpoint-dir", str(self.tmp / name), *SMALL],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.ports[name] = self._wait_port(port_file, self.procs[name])
        return self.ports[name]

    def start_generator(self, iterations: int, resume: bool = False) -> GeneratorClient:
        port_file = self.tmp / "gen.port"
        port_file.unlink(missing_ok=True)
        sites = [f for name, port in self.ports.items() for f in ("--site", f"{name}=127.0.0.1:{port}")]
        self.procs["gen"] = subprocess.Popen(
            [*CLI, "generator", *sites, "--iterations", str(iterations), "--checkpoint-dir", str(self.tmp / "g"),
             "--checkpoint-every", "2", "--deadline", str(DEADLINE), "--listen", "127.0.0.1:0",
             "--port-file", str(port_file), "--serve", *(["--resume"] if resume else []), *SMALL],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return GeneratorClient(f"127.0.0.1:{self._wait_port(port_file, self.procs['gen'])}", timeout=30)

    @staticmethod
    def _wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, f"exited with {proc.returncode}"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return int(path.read_text())

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def site_state(client: GeneratorClient, name: str) -> gpb.SiteState:
    return next(s for s in client.status().sites if s.site_id == name)


def test_killed_site_is_dropped_then_resumes_from_its_checkpoint(cluster: Cluster) -> None:
    cluster.start_site(0)
    port1 = cluster.start_site(1)
    gen = cluster.start_generator(iterations=100_000)
    wait_for(lambda: gen.status().step >= 6, 120, "training to start")
    cluster.kill("h1")
    killed_at = gen.status().step
    t_kill = time.monotonic()
    wait_for(lambda: not site_state(gen, "h1").active, DEADLINE + 10, "the generator to report h1 down")
    wait_for(lambda: gen.status().step >= killed_at + 5, 60, "training to go on with h0 alone")
    assert time.monotonic() - t_kill < 60
    assert site_state(gen, "h1").steps_dropped >= 1
    checkpointed = load_checkpoint(cluster.tmp / "h1" / "discriminator.pt")["steps"]
    assert checkpointed >= 2
    stale = cluster.tmp / "h1" / ".discriminator.pt.x1y2z3.tmp"  # as a kill during a write would leave it
    stale.write_bytes(b"half")
    cluster.start_site(1, port=port1)  # the hospital restarts its container
    assert not stale.exists(), "the restarted site removed its stale temp file"
    channel = grpc.insecure_channel(f"127.0.0.1:{port1}")
    resumed = dpb_grpc.DiscriminatorServiceStub(channel).Status(dpb.StatusRequest(), timeout=30).steps
    channel.close()
    assert resumed == checkpointed, "the restarted site resumed from its own checkpoint"
    before = site_state(gen, "h1").steps_contributed
    wait_for(lambda: site_state(gen, "h1").steps_contributed > before + 2, 60, "h1 to be taken back in")
    assert site_state(gen, "h1").active
    gen.close()


def test_killed_generator_resumes_from_its_last_checkpoint(cluster: Cluster) -> None:
    cluster.start_site(0)
    cluster.start_site(1)
    gen = cluster.start_generator(iterations=100_000)
    wait_for(lambda: gen.status().step >= 7, 120, "training")
    cluster.kill("gen")
    gen.close()
    saved = load_checkpoint(cluster.tmp / "g" / "generator.pt")["steps"]
    assert saved >= 6
    stale = cluster.tmp / "g" / ".generator.pt.x1y2z3.tmp"
    stale.write_bytes(b"half")
    gen = cluster.start_generator(iterations=saved + 6, resume=True)
    assert not stale.exists(), "the restarted generator removed its stale temp file"
    first = gen.status().step
    assert saved <= first <= saved + 6, "continues from the checkpoint, not from zero"
    wait_for(lambda: gen.status().step == saved + 6 and not gen.status().training, 120, "resumed training")
    gen.close()


def test_checkpoint_is_never_half_written(tmp_path: Path) -> None:
    """A writer saving checkpoints in a loop is SIGKILLed at random moments; the file always loads."""
    path = tmp_path / "ck.pt"
    writer = (
        "import sys, torch\n"
        "from asyndgan.io import save_checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    save_checkpoint(sys.argv[1], {'step': i, 'w': torch.full((2_000_000,), float(i))})\n"
        "    print(i, flush=True)\n"
    )
    for delay in (1.0, 1.3, 1.7, 2.1, 2.6):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)
        assert float(state["w"][0]) == float(state["w"][-1]) == state["step"]
    # A kill mid-write can leave the writer's temp file; the next owner of the checkpoint removes it.
    (tmp_path / ".ck.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"not ours")
    leftovers = sorted(tmp_path.glob(".ck.pt.*.tmp"))
    assert remove_stale_temp(path) == len(leftovers) >= 1
    assert not list(tmp_path.glob(".ck.pt.*.tmp")) and (tmp_path / ".other.pt.abc123.tmp").exists()
    assert load_checkpoint(path)["step"] == state["step"]
