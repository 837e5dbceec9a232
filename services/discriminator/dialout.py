"""A dial-out site: no listening port; one long-lived Join stream to the generator, kept up with backoff.

Each Work item on the stream is answered with the same logic the Discriminator service runs
(:func:`asyndgan.services.discriminator.servicer.answer`). Keepalive pings (every 30 s, see
:mod:`asyndgan.rpc`) keep NAT and firewall mappings open while the stream is idle.
"""

from __future__ import annotations

import logging
import queue
import random
import threading

import grpc
from google.protobuf.message import Message

from asyndgan import __version__, wire
from asyndgan.errors import FailedPrecondition
from asyndgan.rpc import TlsConfig, explain_rpc_error, make_channel, status_code_for
from asyndgan.services.discriminator.servicer import answer
from asyndgan.services.discriminator.site import Site
from asyndgan.v1 import federation_pb2 as fpb
from asyndgan.v1 import federation_pb2_grpc as fpb_grpc

__all__ = ["DialOut"]

log = logging.getLogger(__name__)


class DialOut:
    """Keeps ``site`` joined to the generator at ``target`` until :meth:`stop`."""

    def __init__(
        self,
        site: Site,
        target: str,
        *,
        tls: TlsConfig | None = None,
        server_name: str = "generator",
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.site, self.target, self.tls, self.server_name = site, target, tls, server_name
        self.backoff = backoff
        self.joined = threading.Event()  # set while the generator is sending us work
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="dial-out", daemon=True)
        self._last_problem = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the stream (an answer being computed finishes first) and stop reconnecting."""
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            if self._stream():
                delay = self.backoff[0]
            if self._stop.wait(delay * (0.5 + random.random())):
                break
            delay = min(delay * 2, self.backoff[1])

    def _answer(self, work: fpb.JoinResponse) -> fpb.JoinRequest:
        call_id, method, request = wire.work_from_proto(work)
        reply: Message | None = None
        try:
            reply = answer(self.site, method, request)
        except (ValueError, FailedPrecondition) as e:
            return wire.site_message_to_proto(call_id, method, None, status_code_for(e).value[0], str(e))
        except Exception:
            log.exception("internal error in %s", method)
            return wire.site_message_to_proto(
                call_id, method, None, grpc.StatusCode.INTERNAL.value[0], "internal error"
            )
        return wire.site_message_to_proto(call_id, method, reply)

    def _stream(self) -> bool:
        """One Join stream until it ends; True if the generator sent work over it."""
        channel = make_channel(self.target, tls=self.tls, server_name=self.server_name if self.tls else None)
        outbox: queue.Queue[fpb.JoinRequest | None] = queue.Queue()
        outbox.put(wire.hello_to_proto(self.site.site_id, __version__))
        worked = False
        try:
            self._call = call = fpb_grpc.FederationServiceStub(channel).Join(iter(outbox.get, None))
            if self._stop.is_set():
                call.cancel()
            for work in call:
                if not worked:
                    worked = True
                    self.joined.set()
                    self._last_problem = ""
                    log.info("joined the generator at %s", self.target)
                outbox.put(self._answer(work))
        except grpc.RpcError as e:
            self._report(e)
        finally:
            self.joined.clear()
            outbox.put(None)
            channel.close()
        return worked

    def _report(self, e: grpc.RpcError) -> None:
        if self._stop.is_set() and e.code() == grpc.StatusCode.CANCELLED:
            return
        problem = explain_rpc_error(e, self.target, self.server_name if self.tls else None)
        if problem != self._last_problem:  # one line per change, not one per retry
            log.warning("generator at %s: %s; retrying with backoff", self.target, problem)
            self._last_problem = problem
