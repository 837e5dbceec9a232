"""The loopback link emulator: real sockets on 127.0.0.1 through the proxy (delay, bandwidth cap, order,
half-close, resets, a real gRPC call)."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import socketserver
import statistics
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyndgan.experiments.linkemu import LinkEmulator
from asyndgan.rpc import make_server


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads until EOF, records what and when, answers b"ok" (so the half-close went through) and closes."""

    def handle(self) -> None:
        chunks = []
        while data := self.request.recv(65536):
            chunks.append(data)
        self.server.received.append((time.perf_counter(), b"".join(chunks)))  # type: ignore[attr-defined]
        self.request.sendall(b"ok")


class _Reset(socketserver.BaseRequestHandler):
    """Resets the connection (RST, not FIN) as soon as it is accepted."""

    def handle(self) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()


def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def echo() -> Iterator[socketserver.ThreadingTCPServer]:
    yield from _serve(_Echo)


@pytest.fixture
def sink() -> Iterator[socketserver.ThreadingTCPServer]:
    yield from _serve(_Sink)


def _port(server: socketserver.ThreadingTCPServer) -> int:
    return int(server.server_address[1])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf


def _assert_closed(sock: socket.socket) -> None:
    """The peer ended the connection (EOF or reset), rather than leaving it open (recv would time out)."""
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""


def _round_trips(port: int, n: int = 5) -> list[float]:
    """Seconds per round trip of a 100-byte message, after one warm-up trip (the proxy's connection set-up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(n + 1):
            msg = bytes([i]) * 100
            t = time.perf_counter()
            s.sendall(msg)
            assert _recv_exactly(s, len(msg)) == msg
            times.append(time.perf_counter() - t)
        return times[1:]


def test_round_trip_takes_the_emulated_rtt(echo: socketserver.ThreadingTCPServer) -> None:
    with LinkEmulator("127.0.0.1", _port(echo), rtt_s=0.1) as link:
        slow = _round_trips(link.port)
    with LinkEmulator("127.0.0.1", _port(echo)) as link:
        fast = _round_trips(link.port)
    # never faster than the emulated RTT; the median bounds the overhead (a busy machine may delay one trip)
    assert min(slow) >= 0.1 and statistics.median(slow) < 0.2, slow
    assert statistics.median(fast) < 0.02, fast


def _send_through(port: int, payload: bytes) -> float:
    """Send ``payload``, half-close, wait for the sink's b"ok" and EOF; returns the start time."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.perf_counter()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert _recv_exactly(s, 2) == b"ok"
        assert s.recv(1) == b""  # the sink's close arrives as EOF
    return start


def test_bandwidth_cap_and_order(sink: socketserver.ThreadingTCPServer) -> None:
    payload = random.Random(0).randbytes(1_000_000)
    with LinkEmulator("127.0.0.1", _port(sink), bandwidth_bps=8e6) as link:
        start = _send_through(link.port, payload)
        assert link.bytes_forwarded == (1_000_000, 2)
    (end, received), *_ = sink.received  # type: ignore[attr-defined]
    assert received == payload  # intact and in order
    assert 0.9 <= end - start <= 1.6, end - start  # 8 Mbit at 8 Mbit/s: 1 s


def test_connections_share_one_links_bandwidth(sink: socketserver.ThreadingTCPServer) -> None:
    payloads = [bytes([i]) * 500_000 for i in range(2)]
    with LinkEmulator("127.0.0.1", _port(sink), bandwidth_bps=8e6) as link:
        starts: list[float] = []
        threads = [threading.Thread(target=lambda p=p: starts.append(_send_through(link.port, p))) for p in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ends = [end for end, _ in sink.received]  # type: ignore[attr-defined]
    assert sorted(data for _, data in sink.received) == payloads  # type: ignore[attr-defined]
    assert 0.9 <= max(ends) - min(starts) <= 1.6, max(ends) - min(starts)  # 2 x 4 Mbit over one 8 Mbit/s link


def test_resets_and_unreachable_targets_close_the_client_without_tracebacks(
    caplog: pytest.LogCaptureFixture, echo: socketserver.ThreadingTCPServer
) -> None:
    caplog.set_level(logging.DEBUG)
    for server in _serve(_Reset):
        with (
            LinkEmulator("127.0.0.1", _port(server), rtt_s=0.01) as link,
            socket.create_connection(("127.0.0.1", link.port), timeout=5) as s,
        ):
            _assert_closed(s)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with LinkEmulator("127.0.0.1", dead_port) as link, socket.create_connection(("127.0.0.1", link.port), 5) as s:
        _assert_closed(s)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    with LinkEmulator("127.0.0.1", _port(echo)) as link:  # and a fresh one still forwards
        assert len(_round_trips(link.port, 1)) == 1


def test_stop_closes_open_connections(caplog: pytest.LogCaptureFixture, echo: socketserver.ThreadingTCPServer) -> None:
    link = LinkEmulator("127.0.0.1", _port(echo), rtt_s=0.01).start()
    s = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    with s:
        s.sendall(b"x")
        assert _recv_exactly(s, 1) == b"x"
        t = time.perf_counter()
        link.stop()
        assert time.perf_counter() - t < 2
        _assert_closed(s)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", link.port), timeout=1):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_grpc_call_goes_through_the_emulated_link() -> None:
    server = make_server("127.0.0.1:0", lambda _s: None, [])
    server.set_serving(True)
    try:
        with LinkEmulator("127.0.0.1", server.port, rtt_s=0.05, bandwidth_bps=100e6) as link:
            with grpc.insecure_channel(link.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connection set-up
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    times.append(time.perf_counter() - t)
            up, down = link.bytes_forwarded
    finally:
        server.stop(0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert 0.05 <= min(times) < 0.15, times  # one round trip per call
    assert up > 0 and down > 0
