"""How the generator reaches a site: it dials the site's Discriminator service (dial-in), or the site holds a
Join stream to the generator (dial-out, no inbound port at the hospital).

Both give the orchestrator one surface, :class:`SiteTransport`: ``call(method, request, timeout)`` returns a
future whose result is the reply message or raises a :class:`grpc.RpcError` carrying the call's status code.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from asyndgan import wire
from asyndgan.rpc import TlsConfig, explain_rpc_error, make_channel
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc
from asyndgan.v1 import federation_pb2 as fpb

__all__ = ["DialedSite", "JoinedSite", "Pending", "RemoteError", "Session", "SiteTransport"]

log = logging.getLogger(__name__)

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class Pending(Protocol):
    """A call in flight (a grpc or a concurrent.futures future)."""

    def result(self, timeout: float | None = None) -> Any: ...
    def done(self) -> bool: ...
    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...


class SiteTransport(Protocol):
    @property
    def address(self) -> str: ...
    def call(self, method: str, request: Message, timeout: float) -> Pending: ...
    def explain(self, e: grpc.RpcError) -> str: ...
    def close(self) -> None: ...


class RemoteError(grpc.RpcError):
    """A failed call on a Join stream, shaped like the error of a unary gRPC call."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class DialedSite:
    """A dial-in site: the generator calls its Discriminator service at ``address``."""

    def __init__(self, name: str, address: str, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.server_name = name if tls else None
        self.channel = make_channel(address, tls=tls, server_name=self.server_name)
        self.stub = pb_grpc.DiscriminatorServiceStub(self.channel)

    def call(self, method: str, request: Message, timeout: float) -> Pending:
        return getattr(self.stub, method).future(request, timeout=timeout)  # type: ignore[no-any-return]

    def explain(self, e: grpc.RpcError) -> str:
        return explain_rpc_error(e, self.address, self.server_name)

    def close(self) -> None:
        self.channel.close()


class Session:
    """One Join stream: work goes out through :meth:`outgoing`, answers come back through :meth:`resolve`."""

    def __init__(self, site: str, peer: str) -> None:
        self.site, self.peer = site, peer
        self._outbox: queue.Queue[fpb.JoinResponse | None] = queue.Queue()
        self._pending: dict[int, tuple[str, Future[Message], threading.Timer]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.ended: RemoteError | None = None

    def send(self, method: str, request: Message, timeout: float) -> Future[Message]:
        fut: Future[Message] = Future()
        with self._lock:
            if self.ended is not None:
                fut.set_exception(self.ended)
                return fut
            call_id = next(self._ids)
            timer = threading.Timer(timeout, self._expire, (call_id, timeout))
            timer.daemon = True
            self._pending[call_id] = (method, fut, timer)
        timer.start()
        self._outbox.put(wire.work_to_proto(call_id, method, request))
        return fut

    def _take(self, call_id: int) -> tuple[str, Future[Message]] | None:
        with self._lock:
            entry = self._pending.pop(call_id, None)
        if entry is None:
            return None
        entry[2].cancel()
        return entry[0], entry[1]

    def _expire(self, call_id: int, timeout: float) -> None:
        entry = self._take(call_id)
        if entry is not None:
            entry[1].set_exception(RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s"))

    def resolve(self, message: fpb.JoinRequest) -> None:
        """The site's answer to one work item (late answers to expired calls are dropped)."""
        call_id, body = wire.site_message_from_proto(message)
        entry = self._take(call_id)
        if entry is None:
            return
        method, fut = entry
        if isinstance(body, fpb.WorkError):
            fut.set_exception(RemoteError(_CODES.get(body.code, grpc.StatusCode.UNKNOWN), body.message))
        elif message.WhichOneof("body") != wire.WORK_METHODS[method]:
            fut.set_exception(RemoteError(grpc.StatusCode.INTERNAL, f"site answered {method} with the wrong message"))
        else:
            fut.set_result(body)

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """Stop the stream: calls in flight fail with (code, details), :meth:`outgoing` returns."""
        with self._lock:
            if self.ended is not None:
                return
            self.ended = RemoteError(code, details)
            pending, self._pending = list(self._pending.values()), {}
        for _, fut, timer in pending:
            timer.cancel()
            fut.set_exception(self.ended)
        self._outbox.put(None)

    def outgoing(self) -> Iterator[fpb.JoinResponse]:
        while (work := self._outbox.get()) is not None:
            yield work


class JoinedSite:
    """A dial-out site as the generator sees it: calls go over its current Join stream, if it has one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._session: Session | None = None
        self._lock = threading.Lock()
        self.joined = threading.Event()  # set whenever a stream is attached

    @property
    def address(self) -> str:
        session = self._session
        return f"dial-out from {session.peer}" if session else "dial-out (not connected)"

    @property
    def connected(self) -> bool:
        return self._session is not None

    def attach(self, peer: str) -> Session:
        """A new stream from this site; the newest wins (an older one ends with ABORTED)."""
        session = Session(self.name, peer)
        with self._lock:
            old, self._session = self._session, session
        if old is not None:
            log.warning(
                "site %s connected again from %s: its older stream from %s is closed", self.name, peer, old.peer
            )
            old.end(grpc.StatusCode.ABORTED, f"replaced by a newer connection of site {self.name} from {peer}")
        self.joined.set()
        return session

    def detach(self, session: Session, details: str) -> None:
        with self._lock:
            if self._session is session:
                self._session = None
                self.joined.clear()
        session.end(grpc.StatusCode.UNAVAILABLE, details)

    def explain(self, e: grpc.RpcError) -> str:
        if not self.connected:
            return "has not dialed in yet (it runs `asyndgan discriminator --connect` to this generator's port)"
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]

    def call(self, method: str, request: Message, timeout: float) -> Pending:
        session = self._session
        if session is None:
            fut: Future[Message] = Future()
            fut.set_exception(RemoteError(grpc.StatusCode.UNAVAILABLE, "the site has not dialed in"))
            return fut
        return session.send(method, request, timeout)

    def close(self) -> None:
        session = self._session
        if session is not None:
            self.detach(session, "the generator is shutting down")
