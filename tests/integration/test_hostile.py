"""Hostile input: thousands of malformed messages to a running discriminator and generator (real processes).

Every call gets a non-OK status of the expected kind, the services keep serving correct requests, and their
resident memory grows by less than RSS_BOUND_MB.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import zstandard

from asyndgan import codec
from asyndgan.v1 import discriminator_pb2 as dpb
from asyndgan.v1 import discriminator_pb2_grpc as dpb_grpc
from asyndgan.v1 import generator_pb2 as gpb
from asyndgan.v1 import generator_pb2_grpc as gpb_grpc
from asyndgan.v1 import tensor_pb2

pytestmark = pytest.mark.slow

N_MESSAGES = 5000
RSS_BOUND_MB = 150
CLI = [sys.executable, "-m", "asyndgan.cli"]
SIZE, BATCH = 32, 4

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_port(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "service did not start"
        time.sleep(0.1)
    return int(path.read_text())


def tensor(shape: list[int], dtype: int, data: bytes, **kw: int) -> tensor_pb2.Tensor:
    raw = kw.pop("raw_size", len(data))
    crc = kw.pop("crc32", zlib.crc32(data))
    return tensor_pb2.Tensor(shape=shape, dtype=dtype, data=data, raw_size=raw, crc32=crc, **kw)  # type: ignore[arg-type]


def bomb(n_bytes: int) -> tensor_pb2.Tensor:
    """A small message whose zstd payload claims/expands to n_bytes of zeros."""
    data = zstandard.ZstdCompressor(level=19).compress(bytes(n_bytes))
    n = n_bytes // 4
    return tensor_pb2.Tensor(shape=[n, 1, 1, 1], dtype=tensor_pb2.DTYPE_FLOAT32,
                             compression=tensor_pb2.COMPRESSION_ZSTD, data=data, raw_size=n_bytes, crc32=0)  # fmt: skip


def fake_cases(rng: np.random.Generator) -> list[tuple[tensor_pb2.Tensor, set[grpc.StatusCode]]]:
    """(fakes tensor, acceptable codes) — each malformed in its own way."""
    ok = torch.zeros(BATCH, 1, SIZE, SIZE)
    good = codec.encode(ok, "f32")
    short = tensor([BATCH, 1, SIZE, SIZE], tensor_pb2.DTYPE_FLOAT32, good.data[:-4])
    bad_crc = tensor([BATCH, 1, SIZE, SIZE], tensor_pb2.DTYPE_FLOAT32, good.data, crc32=good.crc32 ^ 1)
    nan = codec.encode(torch.full((BATCH, 1, SIZE, SIZE), float("nan")), "f32")
    inf = codec.encode(torch.full((BATCH, 1, SIZE, SIZE), float("inf")), "bf16")
    return [
        (codec.encode(torch.zeros(BATCH + 1, 1, SIZE, SIZE), "f32"), {INVALID}),  # wrong batch
        (codec.encode(torch.zeros(BATCH, 1, SIZE // 2, SIZE), "f32"), {INVALID}),  # wrong shape
        (codec.encode(torch.zeros(BATCH, SIZE, SIZE), "f32"), {INVALID}),  # wrong rank
        (codec.encode(torch.zeros(BATCH, 1, SIZE, SIZE, dtype=torch.uint8), "u8"), {INVALID}),  # wrong dtype
        (short, {INVALID}),  # payload does not match the declared shape
        (bad_crc, {INVALID}),
        (tensor([BATCH, 1, SIZE, SIZE], 99, good.data), {INVALID}),  # unknown dtype
        (tensor([-1, 1, SIZE, SIZE], tensor_pb2.DTYPE_FLOAT32, good.data), {INVALID}),
        (tensor([2**40, 2**40], tensor_pb2.DTYPE_FLOAT32, b""), {EXHAUSTED}),
        (codec.encode(torch.zeros(64, 16, SIZE, SIZE), "bf16+zstd"), {EXHAUSTED}),  # oversized batch
        (bomb(256 << 20), {EXHAUSTED}),  # decompression bomb
        (nan, {INVALID}),
        (inf, {INVALID}),
        (
            tensor(
                [BATCH, 1, SIZE, SIZE],
                tensor_pb2.DTYPE_FLOAT32,
                rng.bytes(100),
                compression=tensor_pb2.COMPRESSION_ZSTD,
                raw_size=BATCH * SIZE * SIZE * 4,
            ),
            {INVALID},
        ),
    ]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, int, int]]:
    tmp = tmp_path_factory.mktemp("hostile")
    small = ["--ngf", "8", "--ndf", "8", "--threads", "1"]
    site = subprocess.Popen(
        [*CLI, "discriminator", "--site-id", "h0", "--data", f"embedded:icbm152?site=0&of=2&size={SIZE}",
         "--listen", "127.0.0.1:0", "--port-file", str(tmp / "site.port"), "--batch-size", str(BATCH),
         "--checkpoint-dir", str(tmp / "site"), *small],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs = [site]
    try:
        site_port = wait_port(tmp / "site.port", site)
        gen = subprocess.Popen(
            [*CLI, "generator", "--site", f"h0=127.0.0.1:{site_port}", "--iterations", "1", "--serve",
             "--checkpoint-dir", str(tmp / "g"), "--listen", "127.0.0.1:0", "--port-file", str(tmp / "gen.port"),
             *small],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(gen)
        gen_port = wait_port(tmp / "gen.port", gen)
        yield site_port, gen_port, site.pid, gen.pid
    finally:
        for p in procs:
            p.kill()
            p.wait()


def expect(call: Callable[[], object], codes: set[grpc.StatusCode], what: str) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in codes, f"{what}: got {e.code()} ({e.details()}), expected {codes}"
        return
    raise AssertionError(f"{what}: accepted")


def test_malformed_messages_are_refused_and_services_survive(services: tuple[int, int, int, int]) -> None:
    site_port, gen_port, site_pid, gen_pid = services
    rng = np.random.default_rng(0)
    site_ch = grpc.insecure_channel(f"127.0.0.1:{site_port}")
    gen_ch = grpc.insecure_channel(f"127.0.0.1:{gen_port}")
    site = dpb_grpc.DiscriminatorServiceStub(site_ch)
    gen = gpb_grpc.GeneratorServiceStub(gen_ch)
    grpc.channel_ready_future(site_ch).result(timeout=30)
    # Wait until the generator finished its one training step (the site is then idle and consistent).
    deadline = time.monotonic() + 120
    while (s := gen.Status(gpb.GeneratorServiceStatusRequest(), timeout=30)).training or s.step < 1:
        assert time.monotonic() < deadline, "the generator did not train its step"
        time.sleep(0.2)

    def valid_round() -> None:
        batch = site.NextBatch(dpb.NextBatchRequest(), timeout=30)
        fakes = codec.encode(torch.zeros(BATCH, 1, SIZE, SIZE))
        reply = site.Step(dpb.StepRequest(batch_id=batch.batch_id, fakes=fakes, modalities=["t1"]), timeout=30)
        assert reply.next.batch_id == batch.batch_id + 1
        # Replaying the batch id that was just used:
        expect(lambda: site.Step(dpb.StepRequest(batch_id=batch.batch_id, fakes=fakes, modalities=["t1"]),
                                 timeout=30), {PRECONDITION}, "replayed batch id")  # fmt: skip
        labels = codec.encode(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), "labels")
        out = list(gen.Synthesize(iter([gpb.SynthesizeRequest(labels=labels)]), timeout=30))
        assert codec.decode(out[0].images).shape == (3, 1, SIZE, SIZE)

    valid_round()
    rss_before = rss_mb(site_pid), rss_mb(gen_pid)
    methods = {
        "/asyndgan.v1.DiscriminatorService/Step": site_ch,
        "/asyndgan.v1.DiscriminatorService/NextBatch": site_ch,
        "/asyndgan.v1.DiscriminatorService/Describe": site_ch,
        "/asyndgan.v1.DiscriminatorService/Checkpoint": site_ch,
        "/asyndgan.v1.DiscriminatorService/Status": site_ch,
        "/asyndgan.v1.GeneratorService/Status": gen_ch,
    }
    cases = fake_cases(rng)
    labels_ok = codec.encode(torch.zeros(2, SIZE, SIZE, dtype=torch.uint8), "labels")
    synth_cases: list[tuple[tensor_pb2.Tensor, set[grpc.StatusCode]]] = [
        (codec.encode(torch.full((2, SIZE, SIZE), 9, dtype=torch.uint8), "labels"), {INVALID}),  # class 9 of 4
        (codec.encode(torch.zeros(2, SIZE, SIZE + 1, dtype=torch.uint8), "labels"), {INVALID}),
        (codec.encode(torch.zeros(2, SIZE, SIZE)), {INVALID}),  # float labels
        (codec.encode(torch.zeros(512, SIZE, SIZE, dtype=torch.uint8), "labels"), {EXHAUSTED}),
        (bomb(64 << 20), {EXHAUSTED, INVALID}),
        (tensor([2, SIZE, SIZE], tensor_pb2.DTYPE_UINT8, labels_ok.data[:-1]), {INVALID}),
    ]
    sent = 0
    outstanding = site.NextBatch(dpb.NextBatchRequest(), timeout=30).batch_id
    while sent < N_MESSAGES:
        kind = sent % 5
        if kind == 0:  # random bytes to every method
            for method, ch in methods.items():
                call = ch.unary_unary(method)
                payload = rng.bytes(int(rng.integers(1, 2000)))
                try:
                    call(payload, timeout=30)  # bytes that happen to parse as an empty request are valid
                except grpc.RpcError as e:
                    assert e.code() in {INVALID, PRECONDITION}, (method, e.code(), e.details())
                sent += 1
            synth = gen_ch.stream_stream("/asyndgan.v1.GeneratorService/Synthesize")
            payload = rng.bytes(int(rng.integers(1, 2000)))
            expect(lambda p=payload, f=synth: list(f(iter([p]), timeout=30)), {INVALID}, "random stream")
            sent += 1
        elif kind in (1, 2):  # malformed fakes for the outstanding batch
            t, codes = cases[int(rng.integers(len(cases)))]
            req = dpb.StepRequest(batch_id=outstanding, fakes=t, modalities=["t1"])
            expect(lambda req=req: site.Step(req, timeout=30), codes, "bad fakes")
            sent += 1
        elif kind == 3:  # unknown batch ids, bad codecs, missing fields, wrong modality names
            good = codec.encode(torch.zeros(BATCH, 1, SIZE, SIZE))
            unknown = int(rng.integers(10**6, 10**9))
            variants = [
                (dpb.StepRequest(batch_id=unknown, fakes=good, modalities=["t1"]), {PRECONDITION}),
                (dpb.StepRequest(batch_id=outstanding, fakes=good, modalities=["t9"]), {INVALID}),
                (dpb.StepRequest(batch_id=outstanding, modalities=["t1"]), {INVALID}),
                (dpb.StepRequest(batch_id=outstanding, fakes=good, modalities=["t1"], grad_codec="gzip"), {INVALID}),
                (dpb.StepRequest(batch_id=outstanding, fakes=good, modalities=["t1"], label_codec="f99"), {INVALID}),
            ]  # fmt: skip
            for req, codes in variants:
                expect(lambda req=req: site.Step(req, timeout=30), codes, "bad step request")
                sent += 1
        else:  # the generator's Synthesize stream
            t, codes = synth_cases[int(rng.integers(len(synth_cases)))]
            req = gpb.SynthesizeRequest(labels=t)
            expect(lambda req=req: list(gen.Synthesize(iter([req]), timeout=30)), codes, "bad labels")
            sent += 1
    valid_round()  # still serving correct requests
    growth = rss_mb(site_pid) - rss_before[0], rss_mb(gen_pid) - rss_before[1]
    assert max(growth) < RSS_BOUND_MB, f"RSS grew by {growth} MB"
    site_ch.close()
    gen_ch.close()
