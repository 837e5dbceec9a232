"""Prometheus metrics for both services, always on an injected registry (tests use a fresh one).

- :class:`GeneratorMetrics` is the generator's :class:`~asyndgan.observer.StepObserver`:
  per-site bytes (wire and raw payload, fed by the same counters as ``summary.json``), client-side RPC latency,
  step time, iterations, active sites, drops and losses.
  :meth:`GeneratorMetrics.track` adds G's step and target steps and each site's state, read from the generator's
  Status at scrape time.
- :class:`SiteCollector` exposes a discriminator's own step count and loss terms at scrape time.
- :class:`GrpcServerMetrics` is a server interceptor with the go-grpc-prometheus series
  (``grpc_server_started_total``, ``grpc_server_handled_total``, ``grpc_server_handling_seconds``,
  ``grpc_server_msg_{received,sent}_total``) for unary and streaming calls alike.
- :func:`start_metrics_http` serves ``/metrics`` for one registry.

Directions are always from the generator's point of view: ``sent`` = generator -> site.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from asyndgan import __version__
from asyndgan.algorithm import StepOutcome
from asyndgan.messages import LossTerm, PrivacyState, TrainingState
from asyndgan.rpc import handler_behavior, rewrap_handler

__all__ = [
    "DIRECTIONS",
    "DROP_REASONS",
    "GeneratorMetrics",
    "GrpcServerMetrics",
    "MetricsHttpServer",
    "SiteCollector",
    "make_registry",
    "start_metrics_http",
]

log = logging.getLogger(__name__)

DIRECTIONS = ("sent", "received")
# Reasons the orchestrator leaves a site out of a step (see Orchestrator._drop and the bad-gradient check).
DROP_REASONS = ("deadline", "unavailable", "error", "bad_reply", "bad_gradient")
# Generator -> site calls that run every step or on (re)connect.
SITE_METHODS = ("Step", "NextBatch")
ALL_SITES = "all"

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# go-grpc-prometheus uses prometheus.DefBuckets.
GRPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LOSS_LABELS = ("network", "site", "modality", "term")


def make_registry(service: str, *, process: bool = True) -> CollectorRegistry:
    """A fresh registry with ``asyndgan_build_info`` and (optionally) process/platform/GC metrics."""
    registry = CollectorRegistry()
    Info("asyndgan_build", "asyndgan version and service kind", registry=registry).info(
        {"version": __version__, "service": service}
    )
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


# -- generator side ----------------------------------------------------------------------------------


class GeneratorMetrics:
    """The generator's training metrics; implements the orchestrator's ``StepObserver`` hooks.

    ``sites`` pre-creates every per-site series at zero, so rates and drop counts exist from the first scrape.
    """

    def __init__(self, registry: CollectorRegistry, sites: Sequence[str] = ()) -> None:
        self.wire_bytes = Counter(
            "asyndgan_wire_bytes_total",
            "Serialized message bytes between generator and site (after compression); direction from the generator",
            ["site", "direction"],
            registry=registry,
        )
        self.payload_bytes = Counter(
            "asyndgan_payload_bytes_total",
            "The same tensors as raw float32/uint8 bytes (before compression); direction from the generator",
            ["site", "direction"],
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "asyndgan_rpc_duration_seconds",
            "Generator -> site call latency as the generator sees it",
            ["site", "method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.rpcs = Counter(
            "asyndgan_rpcs_total",
            "Generator -> site calls by gRPC status code",
            ["site", "method", "code"],
            registry=registry,
        )
        self.step_duration = Histogram(
            "asyndgan_step_duration_seconds",
            "One whole training step at the generator (forward, exchange with all sites, update)",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.iterations = Counter(
            "asyndgan_iterations_total", "Generator updates applied (steps with at least one usable site)",
            registry=registry,
        )  # fmt: skip
        self.steps_attempted = Counter(
            "asyndgan_steps_attempted_total",
            "Step attempts, including those where no site could take part",
            registry=registry,
        )
        self.sites_active = Gauge("asyndgan_sites_active", "Sites counted in the last step", registry=registry)
        self.sites_configured = Gauge("asyndgan_sites_configured", "Sites G trains with", registry=registry)
        self.dropped = Counter(
            "asyndgan_site_dropped_total",
            "Times a site was left out of a step, by reason",
            ["site", "reason"],
            registry=registry,
        )
        self.loss = Gauge(
            "asyndgan_loss",
            "Last loss terms: G's weighted loss (site=all) and each site's D and G terms",
            list(LOSS_LABELS),
            registry=registry,
        )
        self.registry, self.lock = registry, threading.Lock()
        self.sites: list[str] = []
        for site in sites:
            self.add_site(site)

    def track(self, status: Callable[[], TrainingState]) -> None:
        """Expose G's step, the target and each site's state from ``status`` (the service's Status) at scrape time."""
        self.registry.register(_ProgressCollector(status))

    def add_site(self, site: str) -> None:
        """Create the site's series at zero (idempotent)."""
        with self.lock:
            if site in self.sites:
                return
            self.sites.append(site)
            self.sites_configured.set(len(self.sites))
        for d in DIRECTIONS:
            self.wire_bytes.labels(site, d)
            self.payload_bytes.labels(site, d)
        for m in SITE_METHODS:
            self.rpc_duration.labels(site, m)
        for r in DROP_REASONS:
            self.dropped.labels(site, r)

    # StepObserver ---------------------------------------------------------------------------------

    def on_rpc(self, site: str, method: str, seconds: float, code: str) -> None:
        self.rpc_duration.labels(site, method).observe(seconds)
        self.rpcs.labels(site, method, code).inc()

    def on_bytes(self, site: str, direction: str, wire: int, payload: int) -> None:
        self.wire_bytes.labels(site, direction).inc(wire)
        self.payload_bytes.labels(site, direction).inc(payload)

    def on_drop(self, site: str, reason: str) -> None:
        self.dropped.labels(site, reason).inc()

    def on_step(
        self,
        seconds: float,
        outcome: StepOutcome | None,
        active: int,
        site_losses: Mapping[str, Sequence[LossTerm]],
    ) -> None:
        self.steps_attempted.inc()
        self.sites_active.set(active)
        if outcome is None:  # no site could take part
            return
        self.step_duration.observe(seconds)
        if any(outcome.answered):
            self.iterations.inc()
        if not math.isnan(outcome.generator_loss):
            self.loss.labels("G", ALL_SITES, "", "total").set(outcome.generator_loss)
        for site, terms in site_losses.items():
            for t in terms:
                self.loss.labels(t.network, site, t.modality, t.term).set(t.value)


class _ProgressCollector:
    """``asyndgan_generator_step`` is G's own step count, restored from its checkpoint on ``--resume``: unlike
    ``asyndgan_iterations_total`` (a counter, 0 again in a new process) it carries on across restarts."""

    def __init__(self, status: Callable[[], TrainingState]) -> None:
        self.status = status

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("asyndgan_generator_step", "G's step count (restored from its checkpoint on --resume)"),
            GaugeMetricFamily("asyndgan_target_steps", "The step the generator trains to (--iterations)"),
            GaugeMetricFamily(
                "asyndgan_site_active", "1: the site takes part (its last step counted, or it is back)", labels=["site"]
            ),
            GaugeMetricFamily("asyndgan_site_finished", "1: the site has spent its privacy budget", labels=["site"]),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        state = self.status()
        step, target, active, finished = self._families()
        step.add_metric([], state.step)
        target.add_metric([], state.target_steps)
        for s in state.sites:
            active.add_metric([s.site_id], 1.0 if s.active else 0.0)
            finished.add_metric([s.site_id], 1.0 if s.finished else 0.0)
        return step, target, active, finished


# -- discriminator side ------------------------------------------------------------------------------


class _SiteLike(Protocol):
    site_id: str

    @property
    def steps(self) -> int: ...

    @property
    def last_losses(self) -> list[LossTerm]: ...

    def privacy(self) -> PrivacyState: ...


class SiteCollector:
    """Reads a site's step count, last loss terms and privacy guard at scrape time (no hook in the training path).

    ``asyndgan_privacy_guarded{site}`` is 1 under ``--privacy dp`` and 0 for an unguarded site;
    ``asyndgan_privacy_epsilon{site}`` is the epsilon spent (from the site's ledger) and
    ``asyndgan_privacy_epsilon_budget{site}`` the hospital's budget, both at the site's delta."""

    def __init__(self, site: _SiteLike) -> None:
        self.site = site

    def _families(self) -> tuple[Metric, ...]:
        return (
            CounterMetricFamily("asyndgan_site_steps", "Discriminator steps done at this site", labels=["site"]),
            GaugeMetricFamily(
                "asyndgan_loss", "Last loss terms computed at this site (D and G terms)", labels=list(LOSS_LABELS)
            ),
            GaugeMetricFamily("asyndgan_privacy_guarded", "1: DP guard on; 0: unguarded", labels=["site"]),
            GaugeMetricFamily("asyndgan_privacy_epsilon", "Epsilon spent by the site", labels=["site"]),
            GaugeMetricFamily(
                "asyndgan_privacy_epsilon_budget", "Privacy budget the site allows (epsilon)", labels=["site"]
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        steps, loss, guarded, spent, budget = self._families()
        site_id = self.site.site_id
        steps.add_metric([site_id], self.site.steps)  # type: ignore[attr-defined]
        for t in list(self.site.last_losses):
            loss.add_metric([t.network, site_id, t.modality, t.term], t.value)  # type: ignore[attr-defined]
        p = self.site.privacy()
        guarded.add_metric([site_id], 1.0 if p.guarded else 0.0)  # type: ignore[attr-defined]
        spent.add_metric([site_id], p.epsilon_spent)  # type: ignore[attr-defined]
        budget.add_metric([site_id], p.epsilon_budget)  # type: ignore[attr-defined]
        return steps, loss, guarded, spent, budget


# -- gRPC server interceptor -------------------------------------------------------------------------


def _grpc_type_of(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming and response_streaming:
        return "bidi_stream"
    if request_streaming:
        return "client_stream"
    if response_streaming:
        return "server_stream"
    return "unary"


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    return _grpc_type_of(bool(handler.request_streaming), bool(handler.response_streaming))


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class _Call:
    """Bookkeeping of one server call: records exactly once, on completion, error or cancellation.

    The code is the one the handler ended with, or CANCELLED when the client went away first. grpcio may show a
    cancelled stream's handler a plain end of input; that call is then counted with the handler's own code.
    """

    def __init__(self, metrics: GrpcServerMetrics, labels: tuple[str, str, str], context: grpc.ServicerContext):
        self.metrics, self.labels, self.context = metrics, labels, context
        self.start = time.perf_counter()
        self.done = False
        self.lock = threading.Lock()
        metrics.started.labels(*labels).inc()
        # A streaming call whose client goes away may never resume our iterator: catch its termination too.
        context.add_callback(lambda: self.finish(grpc.StatusCode.CANCELLED))

    def code(self, default: grpc.StatusCode) -> grpc.StatusCode:
        code = self.context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        # A client that cancels makes grpcio's request iterator raise in the handler's thread, racing the
        # termination callback: the call is still a cancelled one, not UNKNOWN.
        return default if self.context.is_active() else grpc.StatusCode.CANCELLED

    def finish(self, code: grpc.StatusCode) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        self.metrics.handled.labels(*self.labels, code.name).inc()
        self.metrics.seconds.labels(*self.labels).observe(time.perf_counter() - self.start)

    def received(self, requests: Iterator[Any]) -> Iterator[Any]:
        counter = self.metrics.msg_received.labels(*self.labels)
        for r in requests:
            counter.inc()
            yield r

    def sent(self, responses: Iterable[Any]) -> Iterator[Any]:
        counter = self.metrics.msg_sent.labels(*self.labels)
        try:
            for r in responses:
                counter.inc()
                yield r
        except GeneratorExit:
            self.finish(grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            self.finish(self.code(grpc.StatusCode.UNKNOWN))
            raise
        self.finish(self.code(grpc.StatusCode.OK))


class GrpcServerMetrics(grpc.ServerInterceptor):
    """Server interceptor with go-grpc-prometheus metric names; pass it to ``make_server(interceptors=...)``."""

    def __init__(self, registry: CollectorRegistry, services: Iterable[ServiceDescriptor] = ()) -> None:
        """``services``: their methods' series are created up front at zero (code OK), as go-grpc-prometheus does,
        so rates and quantiles exist from the first scrape."""
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started_total", "RPCs started on the server", labels, registry=registry)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server (until the last message for streams)",
            labels,
            buckets=GRPC_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total", "Messages received by the server", labels, registry=registry
        )
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Messages sent by the server", labels, registry=registry)
        for service in services:
            for m in service.methods:
                kind = _grpc_type_of(m.client_streaming, m.server_streaming)
                for metric in (self.started, self.seconds, self.msg_received, self.msg_sent):
                    metric.labels(kind, service.full_name, m.name)
                self.handled.labels(kind, service.full_name, m.name, grpc.StatusCode.OK.name)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        kind = _grpc_type(handler)
        service, method = _split_method(handler_call_details.method)  # type: ignore[attr-defined]
        labels = (kind, service, method)
        inner = handler_behavior(handler)
        streaming_in = bool(handler.request_streaming)
        if handler.response_streaming:
            return rewrap_handler(handler, self._stream_out(labels, inner, streaming_in), handler.request_deserializer)
        return rewrap_handler(handler, self._unary(labels, inner, streaming_in), handler.request_deserializer)

    def _unary(
        self, labels: tuple[str, str, str], behavior: Callable[..., Any], streaming_in: bool = False
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self, labels, context)
            if streaming_in:
                request = call.received(request)
            else:
                self.msg_received.labels(*labels).inc()
            try:
                response = behavior(request, context)
            except BaseException:
                call.finish(call.code(grpc.StatusCode.UNKNOWN))
                raise
            code = call.code(grpc.StatusCode.OK)
            if code == grpc.StatusCode.OK:
                self.msg_sent.labels(*labels).inc()
            call.finish(code)
            return response

        return wrapped

    def _stream_out(
        self, labels: tuple[str, str, str], behavior: Callable[..., Any], streaming_in: bool
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self, labels, context)
            if streaming_in:
                request = call.received(request)
            else:
                self.msg_received.labels(*labels).inc()
            try:
                responses = behavior(request, context)
            except BaseException:
                call.finish(call.code(grpc.StatusCode.UNKNOWN))
                raise
            return call.sent(responses)

        return wrapped


# -- /metrics over HTTP ------------------------------------------------------------------------------


@dataclass
class MetricsHttpServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (also when 0 was asked for)."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_http(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> MetricsHttpServer:
    """Serve ``registry`` on http://HOST:PORT/metrics in a daemon thread (port 0 = any free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port {port} is out of range")
    server, thread = _start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsHttpServer(host, bound, server, thread)
