"""The one place that builds gRPC servers and channels, and maps domain errors to status codes."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asyndgan.codec import LimitExceeded
from asyndgan.errors import FailedPrecondition

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Server",
    "TlsConfig",
    "explain_rpc_error",
    "handler_behavior",
    "make_channel",
    "make_server",
    "rewrap_handler",
    "status_code_for",
    "stop_event_on_signals",
    "translate_errors",
    "wait_for",
]

log = logging.getLogger(__name__)

# Explicit limits everywhere (gRPC's default receive limit is 4 MB; never the 2 GB maximum).
MAX_MESSAGE_BYTES = 64 << 20

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for mutual TLS: our certificate and key, and the CA that signs our peers."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()


# Servers accept the clients' keepalive pings even on an idle stream (a dial-out site's Join stream between runs);
# the default policy would answer pings more often than every 5 minutes with GOAWAY.
_SERVER_PINGS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def _options(max_message: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        *_KEEPALIVE,
    ]


# A restarted site is noticed within seconds (gRPC's default reconnect backoff grows to 2 minutes).
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


@dataclass
class Server:
    """A started gRPC server with its health servicer and bound port."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    services: tuple[str, ...]

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to ``grace`` seconds."""
        self.set_serving(False)
        self.server.stop(grace).wait()


def stop_event_on_signals() -> threading.Event:
    """An event set on SIGTERM/SIGINT (call from the main thread of an entry point).

    The handler only writes the signal number to a pipe; a watcher thread sets the event. Setting it in the
    handler itself can deadlock: the handler runs on the main thread, which may at that moment hold the
    event's own (non-reentrant) lock inside ``stop.wait()``."""
    event = threading.Event()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def handler(signum: int, _frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a signal for the watcher
            os.write(write_fd, bytes([signum]))

    def watch() -> None:
        while data := os.read(read_fd, 64):
            for signum in data:
                log.info("signal %d: shutting down", signum)
            event.set()

    threading.Thread(target=watch, name="signal-watcher", daemon=True).start()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


def wait_for(stop: threading.Event) -> None:
    """Block the main thread until ``stop`` is set. It wakes every 0.2 s: a signal that the kernel delivers to
    another thread (any gRPC or torch thread can take it) only runs its Python handler once the main thread
    executes bytecode again, so an unbounded wait could sleep through SIGTERM."""
    while not stop.wait(0.2):
        pass


class _Malformed:
    """Stands in for a request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return _Malformed()

    return parse


def _reject(request: Any, context: grpc.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")


def handler_behavior(h: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The handler's own function, whichever of the four call shapes it has."""
    return h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream  # type: ignore[no-any-return]


def rewrap_handler(h: grpc.RpcMethodHandler, behavior: Callable[..., Any], deserializer: Any) -> grpc.RpcMethodHandler:
    """A handler of the same call shape as ``h`` running ``behavior`` instead (interceptors wrap with this)."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(h.request_streaming), bool(h.response_streaming))]
    return factory(behavior, deserializer, h.response_serializer)  # type: ignore[operator]


class RejectMalformed(grpc.ServerInterceptor):
    """Unparseable request bytes get INVALID_ARGUMENT (grpcio's default would be INTERNAL)."""

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        h = continuation(details)
        if h is None or h.request_deserializer is None:
            return h
        inner = handler_behavior(h)
        if not h.request_streaming:

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                _reject(request, context)
                return inner(request, context)

            return rewrap_handler(h, unary, _tolerant(h.request_deserializer))

        def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            def checked() -> Iterator[Any]:
                for request in requests:
                    _reject(request, context)
                    yield request

            return inner(checked(), context)

        return rewrap_handler(h, streaming, _tolerant(h.request_deserializer))


def peer_names(context: grpc.ServicerContext) -> set[str]:
    """The names (SANs, else the common name) in the client's verified TLS certificate; empty without TLS."""
    return {n.decode(errors="replace") for n in context.peer_identities() or ()}


class AllowClients(grpc.ServerInterceptor):
    """With mutual TLS: calls to ``services`` need a client certificate naming one of ``names`` (else
    PERMISSION_DENIED); other services (health, reflection) stay open to any certificate from the CA."""

    def __init__(self, names: Iterable[str], services: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.prefixes = tuple(f"/{s}/" for s in services)

    def _check(self, context: grpc.ServicerContext) -> None:
        if not peer_names(context) & self.names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "client certificate is not on this service's allow-list")

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        h = continuation(details)
        if h is None or not details.method.startswith(self.prefixes):  # type: ignore[attr-defined]
            return h
        inner = handler_behavior(h)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            self._check(context)
            return inner(request, context)

        return rewrap_handler(h, guarded, h.request_deserializer)


def make_server(
    listen: str,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    *,
    tls: TlsConfig | None = None,
    allowed_clients: Sequence[str] = (),
    max_message: int = MAX_MESSAGE_BYTES,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    workers: int = 8,
    open_services: Sequence[str] = (),
) -> Server:
    """Start a server on ``listen`` (HOST:PORT, port 0 = any) with health and reflection; NOT_SERVING.

    ``allowed_clients`` (needs ``tls``): certificate names that may call ``service_names``; empty = any
    certificate from the CA. ``open_services`` are served too but do their own admission (the join port)."""
    if allowed_clients and tls is None:
        raise ValueError("an allow-list of client names needs mutual TLS")
    guard = [AllowClients(allowed_clients, service_names)] if allowed_clients else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=[*interceptors, *guard, RejectMalformed()],  # denied calls still show in metrics
        options=_options(max_message) + _SERVER_PINGS,
        maximum_concurrent_rpcs=workers * 4,
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, *open_services, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls is not None:
        cert, key, ca = tls.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    srv = Server(server, health_servicer, port, (*service_names, *open_services))
    srv.set_serving(False)
    return srv


def make_channel(
    target: str,
    *,
    tls: TlsConfig | None = None,
    server_name: str | None = None,
    max_message: int = MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A channel to ``target``; with TLS, the server certificate must name ``server_name``."""
    options = _options(max_message) + _RECONNECT
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    cert, key, ca = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


_PROBLEMS = [  # (fragment of grpc's error text, what it means for the user)
    ("Connection refused", "connection refused: nothing listens at {target} (is the service up, is this its port?)"),
    (
        "before receiving SETTINGS",
        "no answer from {target}: a firewall or NetworkPolicy may drop the packets, or the host is down",
    ),
    ("resolving", "cannot resolve the host name of {target}: check the address"),
    (
        "Hostname Verification",
        "TLS name mismatch: the certificate at {target} does not name {name!r} "
        "(check the name given and the certificate's DNS names)",
    ),
    (
        "Tls handshake failed",
        "TLS handshake with {target} failed: a certificate was rejected (signed by another CA?) "
        "or {target} does not use TLS; check --tls-ca on both sides",
    ),
    (
        "Socket closed",
        "{target} closed the connection during setup: it may require TLS, or it rejected our certificate",
    ),
]


def explain_rpc_error(e: grpc.RpcError, target: str, server_name: str | None = None) -> str:
    """One line for a failed call to ``target`` that says what to check (not grpc's internal wording)."""
    code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        for fragment, message in _PROBLEMS:
            if fragment in details:
                return message.format(target=target, name=server_name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {target} in time: a firewall may drop the packets, or the peer is down or stopped"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"{target} refused us: {details}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{target} does not serve this AsynDGAN API: wrong port, or another service?"
    return f"{code.name}: {details}"


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of a domain error (:mod:`asyndgan.errors`); anything else is INTERNAL."""
    if isinstance(exc, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ValueError):  # BadRequest, SiteStepError, CodecError, DataError
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, FailedPrecondition):  # includes BudgetExhausted
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def translate_errors(method: F) -> F:
    """Servicer method decorator: domain exceptions -> gRPC status; never a crash, never pixel data."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except (ValueError, FailedPrecondition) as e:
            context.abort(status_code_for(e), str(e)[:500])
        except Exception:
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper  # type: ignore[return-value]
