"""A loopback link emulator: a TCP proxy on 127.0.0.1 that adds a round-trip time and caps bandwidth, with no
root and no kernel modules (no tc/netem).

One :class:`LinkEmulator` is one hospital's link: every connection through it shares its bandwidth, per
direction. A chunk of ``n`` bytes read at time ``t`` leaves the emulated wire at
``max(t, wire free) + 8n / bandwidth`` (serialization, first in first out) and is delivered ``rtt / 2`` later
(propagation), so order is kept and throughput honours the cap. With ``rtt_s = 0`` and no bandwidth cap it is a
plain forwarder. The proxy runs an asyncio loop in one background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["LinkEmulator"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# Bytes read but not yet delivered, per connection and direction, before the proxy stops reading (TCP
# backpressure then reaches the sender). Large enough for the bandwidth-delay product of any link emulated here.
BUFFER_BYTES = 16 * 1024 * 1024
_NETWORK_ERRORS = (ConnectionError, OSError, asyncio.IncompleteReadError)


@dataclass
class _Wire:
    """One direction of the emulated link, shared by all its connections."""

    half_rtt_s: float
    bits_per_s: float | None
    free_at: float = 0.0  # when the last scheduled chunk has been serialized
    bytes: int = 0

    def deliver_at(self, now: float, n: int) -> float:
        """When ``n`` bytes read at ``now`` arrive at the far end (and reserve the wire for them)."""
        self.bytes += n
        if self.bits_per_s is None:
            return now + self.half_rtt_s
        self.free_at = max(now, self.free_at) + n * 8 / self.bits_per_s
        return self.free_at + self.half_rtt_s


@dataclass
class _Pipe:
    """One connection's bytes in one direction: read, scheduled on the wire, written at delivery time."""

    wire: _Wire
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    queue: asyncio.Queue[tuple[float, bytes | None]] = field(default_factory=asyncio.Queue)
    queued: int = 0  # bytes read and not yet written
    last_at: float = 0.0  # delivery time of the last chunk queued
    room: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        """Read chunks until EOF (queued as ``b""``) or a reset (queued as None)."""
        loop = asyncio.get_running_loop()
        data: bytes | None = b""
        try:
            while data := await self.reader.read(CHUNK_BYTES):
                while self.queued > BUFFER_BYTES:
                    self.room.clear()
                    await self.room.wait()
                self.queued += len(data)
                self.last_at = self.wire.deliver_at(loop.time(), len(data))
                self.queue.put_nowait((self.last_at, data))
        except _NETWORK_ERRORS as e:
            log.debug("link emulator: read ended: %s", e)
            data = None
        # EOF or reset travels like data: after the bytes before it, half a round trip after it happened
        self.queue.put_nowait((max(self.last_at, loop.time() + self.wire.half_rtt_s), data))

    async def write(self) -> None:
        """Deliver queued chunks in order at their times; pass EOF on as a half-close; raise on a reset."""
        loop = asyncio.get_running_loop()
        while True:
            at, data = await self.queue.get()
            if (delay := at - loop.time()) > 0:
                await asyncio.sleep(delay)
            if data is None:
                raise ConnectionResetError("the other side reset the connection")
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.queued -= len(data)
            self.room.set()

    async def run(self) -> None:
        reading = asyncio.create_task(self.read())
        try:
            await self.write()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


class LinkEmulator:
    """A TCP proxy ``127.0.0.1:port`` -> ``target_host:target_port`` that emulates one network link.

    ``rtt_s``: added round-trip time (half in each direction); ``bandwidth_bps``: bits per second per direction,
    shared by all connections through this emulator (None = no cap). ``port`` 0 lets the OS choose; the bound
    port is :attr:`port` after :meth:`start`. Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rtt_s: float = 0.0,
        bandwidth_bps: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if rtt_s < 0 or (bandwidth_bps is not None and bandwidth_bps <= 0):
            raise ValueError("rtt_s must be >= 0 and bandwidth_bps > 0 (or None)")
        self.target = (target_host, target_port)
        self.rtt_s, self.bandwidth_bps = rtt_s, bandwidth_bps
        self.host, self.port = host, port
        self.up = _Wire(rtt_s / 2, bandwidth_bps)  # client -> target
        self.down = _Wire(rtt_s / 2, bandwidth_bps)  # target -> client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``host:port`` to dial instead of the target."""
        return f"{self.host}:{self.port}"

    @property
    def bytes_forwarded(self) -> tuple[int, int]:
        """Bytes read so far (client -> target, target -> client)."""
        return self.up.bytes, self.down.bytes

    def start(self) -> LinkEmulator:
        """Listen and forward in a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("link emulator already started")
        self._thread = threading.Thread(target=self._run, name=f"linkemu-{self.target[1]}", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._error is not None or not self._ready.is_set():
            self.stop()
            raise OSError(f"link emulator could not listen on {self.host}:{self.port}: {self._error}")
        log.debug("link emulator %s -> %s:%d (rtt %.3f s, %s bit/s)", self.address, *self.target,
                  self.rtt_s, self.bandwidth_bps)  # fmt: skip
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("link emulator %s: thread did not end within 10 s", self.address)
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the loop's thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported by start(); the thread must not die with a traceback
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                target_r, target_w = await asyncio.open_connection(*self.target)
            except OSError as e:
                client_w.transport.abort()
                log.warning("link emulator %s: cannot reach %s:%d: %s", self.address, *self.target, e)
                return
            await self._forward(_Pipe(self.up, client_r, target_w), _Pipe(self.down, target_r, client_w))
        except asyncio.CancelledError:  # stop(); end normally (Python 3.11's server callback logs a cancelled one)
            client_w.transport.abort()
        finally:
            self._connections.discard(task)

    async def _forward(self, up: _Pipe, down: _Pipe) -> None:
        """Both directions until both have ended; a reset or a failed write on one aborts both."""
        tasks = [asyncio.create_task(up.run()), asyncio.create_task(down.run())]
        clean = False
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            clean = all(not t.cancelled() and t.exception() is None for t in done) and len(done) == 2
            for t in done:
                if not t.cancelled() and (e := t.exception()) is not None:
                    log.debug("link emulator %s: connection reset: %s", self.address, e)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (up.writer, down.writer):
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            for w in (up.writer, down.writer):
                with contextlib.suppress(*_NETWORK_ERRORS, asyncio.CancelledError):
                    await w.wait_closed()
