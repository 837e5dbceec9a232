"""Synthesize's bounded read-ahead: the helper on its own (bound, order, errors, close), then the generator
service over real gRPC on loopback (lock-step and eager clients, the bound, errors mid-stream, cancellation)."""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from asyndgan import codec
from asyndgan.clients.generator_client import REQUESTS_AHEAD, GeneratorClient
from asyndgan.errors import FailedPrecondition
from asyndgan.services.generator import servicer as servicer_module
from asyndgan.services.generator.readahead import ReadAhead
from asyndgan.services.generator.service import GeneratorService
from asyndgan.services.generator.servicer import MAX_AHEAD
from asyndgan.v1 import generator_pb2 as gpb
from asyndgan.v1 import generator_pb2_grpc as gpb_grpc
from tests.integration.cluster import SIZE, generator_config, start_sites, stop_sites

THREAD_PREFIX = "synthesize-"  # the servicer's stages: synthesize-read-N, synthesize-g-N
WAIT_S = 30.0  # a stall fails the test after this long instead of hanging it


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def taken_at_least(ra: ReadAhead[Any, Any], n: int) -> bool:
    return ra.taken >= n


def settle(ra: ReadAhead[Any, Any]) -> None:
    """Wait until the server's read-ahead stops taking requests (its buffer full, gRPC's send blocked)."""
    wait_until(lambda: ra.taken > 0, "the server took no request")
    last = -1
    while ra.taken != last:
        last = ra.taken
        time.sleep(0.5)


def readahead_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


# -- the helper ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_helper_is_bounded_to_depth_items_beyond_what_the_consumer_has(depth: int) -> None:
    ra = ReadAhead(itertools.count(), lambda i: i * 10, depth, name="test-bound")
    it = iter(ra)
    try:
        for k in range(1, 4):
            assert next(it) == (k - 1) * 10
            wait_until(functools.partial(taken_at_least, ra, k + depth), "the read-ahead did not fill up")
            time.sleep(0.2)  # an unbounded read-ahead would have taken millions of items of itertools.count()
            assert (ra.taken, ra.delivered) == (k + depth, k)
    finally:
        ra.close()
    assert ra.join(5)


def test_helper_keeps_order_and_raises_the_first_error_after_the_results_before_it() -> None:
    boom = ValueError("item 13 is bad")

    def work(i: int) -> int:
        if i == 13:
            raise boom
        time.sleep(0.002 * (i % 3))  # uneven work times
        return i

    ra = ReadAhead(iter(range(20)), work, 2, name="test-error")
    got: list[int] = []
    with pytest.raises(ValueError) as err:
        for r in ra:
            got.append(r)
            time.sleep(0.01)  # a slow consumer: results queue up
    assert err.value is boom
    assert got == list(range(13))
    assert ra.taken == 14  # nothing is read past the bad item
    assert ra.join(5)


def test_helper_hands_each_result_over_before_the_next_item_exists() -> None:
    """A lock-step producer: item i+1 is made only after result i has arrived."""
    inbox: queue.Queue[int] = queue.Queue()

    def items() -> Iterator[int]:
        for _ in range(5):
            yield inbox.get(timeout=WAIT_S)

    ra = ReadAhead(items(), lambda i: -i, 2, name="test-lockstep")
    inbox.put(0)
    it = iter(ra)
    for i in range(5):
        assert next(it) == -i
        inbox.put(i + 1)
    assert list(it) == []
    assert ra.join(5)


def test_helper_close_stops_the_thread_and_drops_pending_results() -> None:
    def slow(i: int) -> int:
        time.sleep(0.01)
        return i

    ra = ReadAhead(itertools.count(), slow, 2, name="test-close")
    it = iter(ra)
    assert next(it) == 0
    ra.close()
    assert ra.join(5)
    assert list(it) == []
    with pytest.raises(ValueError):
        ReadAhead(iter(()), lambda i: i, 0)


def test_chained_stages_keep_order_pass_errors_on_and_close_together() -> None:
    boom = ValueError("item 5 is bad")

    def first(i: int) -> int:
        if i == 5:
            raise boom
        return i + 1

    chain = ReadAhead(ReadAhead(iter(range(9)), first, 1, name="test-a"), lambda i: i * 2, 2, name="test-b")
    got: list[int] = []
    with pytest.raises(ValueError) as err:
        for r in chain:
            got.append(r)
            time.sleep(0.01)
    assert err.value is boom and got == [2, 4, 6, 8, 10]

    upstream = ReadAhead(itertools.count(), lambda i: i, 1, name="test-a")
    downstream = ReadAhead(upstream, lambda i: i, 2, name="test-b")
    assert next(iter(downstream)) == 0
    downstream.close()
    assert upstream.join(5) and downstream.join(5)


# -- over gRPC -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratorService]:
    tmp = tmp_path_factory.mktemp("readahead")
    sites = start_sites(1, tmp)
    svc = GeneratorService.start(generator_config(sites, tmp, iterations=0))
    yield svc
    svc.stop(0)
    stop_sites(sites)


@pytest.fixture
def stub(generator: GeneratorService) -> Iterator[gpb_grpc.GeneratorServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{generator.server.port}") as channel:
        yield gpb_grpc.GeneratorServiceStub(channel)


@pytest.fixture
def instances(monkeypatch: pytest.MonkeyPatch) -> list[ReadAhead[Any, Any]]:
    """Every ReadAhead the servicer makes, to look at its counters."""
    made: list[ReadAhead[Any, Any]] = []

    def recording(*args: Any, **kw: Any) -> ReadAhead[Any, Any]:
        made.append(ReadAhead(*args, **kw))
        return made[-1]

    monkeypatch.setattr(servicer_module, "ReadAhead", recording)
    return made


def labels(i: int, batch: int = 2, num_classes: int = 4) -> np.ndarray:
    """Label maps that differ per request ``i`` (so the replies' order shows)."""
    rng = np.random.default_rng(i)
    return rng.integers(0, num_classes, (batch, SIZE, SIZE)).astype(np.uint8)


def request(lab: np.ndarray) -> gpb.SynthesizeRequest:
    return gpb.SynthesizeRequest(labels=codec.encode(torch.from_numpy(lab), codec.LABEL_CODEC), image_codec="f32")


BIG = request(labels(0, batch=64))  # 256 KiB of f32 images per reply


def expected(gen: GeneratorService, lab: np.ndarray) -> np.ndarray:
    return gen.gen.synthesize(torch.from_numpy(lab)).numpy()


def images(reply: gpb.SynthesizeResponse) -> np.ndarray:
    return codec.decode(reply.images).numpy()


def test_lock_step_client_gets_every_reply(generator: GeneratorService, stub: gpb_grpc.GeneratorServiceStub) -> None:
    inbox: queue.Queue[gpb.SynthesizeRequest | None] = queue.Queue()

    def requests() -> Iterator[gpb.SynthesizeRequest]:
        while (r := inbox.get(timeout=WAIT_S)) is not None:
            yield r

    n = 6
    replies = stub.Synthesize(requests(), timeout=WAIT_S)  # a stall ends in DEADLINE_EXCEEDED
    for i in range(n):
        inbox.put(request(labels(i)))
        np.testing.assert_allclose(images(next(replies)), expected(generator, labels(i)), atol=1e-5)
    inbox.put(None)
    assert list(replies) == []


def test_eager_client_gets_all_replies_in_order(
    generator: GeneratorService, stub: gpb_grpc.GeneratorServiceStub
) -> None:
    n = 16
    batches = [labels(i, batch=1 + i % 5) for i in range(n)]
    replies = list(stub.Synthesize(iter([request(b) for b in batches]), timeout=WAIT_S))
    assert len(replies) == n
    for b, reply in zip(batches, replies, strict=True):
        np.testing.assert_allclose(images(reply), expected(generator, b), atol=1e-5)


def test_server_reads_ahead_a_bounded_number_of_requests(
    stub: gpb_grpc.GeneratorServiceStub, instances: list[ReadAhead[Any, Any]]
) -> None:
    """A client sends many large requests up front and reads no reply: the server stops taking requests once
    gRPC's send buffers and the read-ahead are full."""
    n = 60
    call = stub.Synthesize(iter([BIG] * n), timeout=WAIT_S)
    try:
        wait_until(lambda: len(instances) == 2, "the call did not start")
        read, generate = instances  # requests taken from gRPC; replies handed to gRPC
        settle(read)
        assert read.taken <= generate.delivered + MAX_AHEAD
        assert read.taken < n, "the server took every request although the client read no reply"
    finally:
        call.cancel()
    wait_until(lambda: not readahead_threads(), "read-ahead thread left after cancel")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION])
def test_bad_request_mid_stream_aborts_after_the_earlier_replies(
    generator: GeneratorService,
    stub: gpb_grpc.GeneratorServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    code: grpc.StatusCode,
) -> None:
    bad = 3
    reqs = [request(labels(i)) for i in range(8)]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        reqs[bad] = request(np.full((2, SIZE, SIZE), 200, np.uint8))  # label values out of range
    else:
        real = generator.gen.synthesize
        calls = itertools.count()

        def failing(lab: torch.Tensor, style: int | None = None) -> torch.Tensor:
            if next(calls) == bad:
                raise FailedPrecondition("no model right now")
            return real(lab, style)

        monkeypatch.setattr(generator.gen, "synthesize", failing)
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in stub.Synthesize(iter(reqs), timeout=WAIT_S):
            got.append(images(reply))
    assert err.value.code() == code
    assert len(got) == bad
    monkeypatch.undo()
    for i, img in enumerate(got):
        np.testing.assert_allclose(img, expected(generator, labels(i)), atol=1e-5)
    wait_until(lambda: not readahead_threads(), "read-ahead thread left after an abort")


@pytest.mark.parametrize("blocked", ["reading", "buffer full"])
def test_cancel_mid_stream_leaves_no_background_thread(
    stub: gpb_grpc.GeneratorServiceStub, instances: list[ReadAhead[Any, Any]], blocked: str
) -> None:
    """The client reads one reply and cancels while the server's stages wait for its next request (the client
    sent 2 and waits) or for room (the client sent 40 large ones up front): both stage threads end."""
    release = threading.Event()

    def requests() -> Iterator[gpb.SynthesizeRequest]:
        if blocked == "reading":
            yield from (request(labels(i)) for i in range(2))
        else:
            yield from [BIG] * 40
        release.wait(WAIT_S)

    call = stub.Synthesize(requests(), timeout=WAIT_S)
    try:
        next(call)
        settle(instances[0])
        assert len(readahead_threads()) == 2
        call.cancel()
        wait_until(lambda: not readahead_threads(), "read-ahead thread left after cancel", timeout=5)
        assert not any(ra.alive for ra in instances)
    finally:
        release.set()


# -- the Python client -----------------------------------------------------------------------------------


class Recorded:
    """Label batches that record which thread took each one from the iterable."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches
        self.threads: list[str] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in self.batches:
            self.threads.append(threading.current_thread().name)
            yield b


def test_client_encodes_in_its_own_thread_a_bounded_number_ahead(generator: GeneratorService) -> None:
    """GeneratorClient.stream takes and encodes the batches in the caller's thread, never more than
    REQUESTS_AHEAD beyond the replies read, and gets every reply in order."""
    batches = Recorded([labels(i) for i in range(10)])
    with GeneratorClient(f"127.0.0.1:{generator.server.port}", timeout=WAIT_S) as client:
        got = 0
        for img, _ in client.stream(batches):
            assert len(batches.threads) <= got + 1 + REQUESTS_AHEAD
            np.testing.assert_allclose(img, expected(generator, batches.batches[got]), atol=1e-5)
            got += 1
    assert got == 10 and set(batches.threads) == {threading.current_thread().name}


def test_client_whose_call_fails_leaves_no_request_thread_busy(generator: GeneratorService) -> None:
    """A call that fails (here: the server refuses a bad request) encodes nothing more and ends gRPC's request
    thread: nothing of the stream is left running when the caller goes on (or the process exits)."""
    before = {t.ident for t in threading.enumerate()}
    bad = np.full((2, SIZE, SIZE), 200, np.uint8)  # label values far past the classes: INVALID_ARGUMENT
    batches = Recorded([bad] + [labels(i) for i in range(20)])
    with GeneratorClient(f"127.0.0.1:{generator.server.port}", timeout=WAIT_S) as client:
        with pytest.raises(grpc.RpcError) as e:
            list(client.stream(batches))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(batches.threads) <= 1 + REQUESTS_AHEAD  # the rest was never encoded
    wait_until(lambda: not {t.ident for t in threading.enumerate()} - before, "a stream thread was left")


def test_a_style_for_a_generator_without_site_styles_is_failed_precondition(
    generator: GeneratorService, stub: gpb_grpc.GeneratorServiceStub
) -> None:
    styled = gpb.SynthesizeRequest(labels=request(labels(0)).labels, style="site-0")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Synthesize(iter([styled]), timeout=WAIT_S))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "trained without site styles" in (err.value.details() or "")
    assert list(stub.Status(gpb.GeneratorServiceStatusRequest(), timeout=WAIT_S).styles) == []
