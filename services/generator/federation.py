"""gRPC face of the generator's join port: admits dial-out sites and hands their Join stream to :class:`JoinedSite`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping

import grpc

from asyndgan import wire
from asyndgan.errors import BadRequest
from asyndgan.rpc import peer_names
from asyndgan.services.generator.transport import JoinedSite, Session
from asyndgan.v1 import federation_pb2 as fpb
from asyndgan.v1 import federation_pb2_grpc as fpb_grpc

__all__ = ["FederationServicer"]

log = logging.getLogger(__name__)


class FederationServicer(fpb_grpc.FederationServiceServicer):
    """Admits a Join stream only from a site configured as dial-out (``--site NAME``); with mutual TLS the
    client certificate must also name that site."""

    def __init__(self, sites: Mapping[str, JoinedSite], tls: bool) -> None:
        self.sites, self.tls = sites, tls

    def _admit(self, first: fpb.JoinRequest, context: grpc.ServicerContext) -> JoinedSite:
        try:
            name, version = wire.hello_from_proto(first)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        site = self.sites.get(name)
        if site is None:
            expected = ", ".join(sorted(self.sites)) or "none"
            log.warning("refused a Join from %s: no dial-out site named %r is configured", context.peer(), name)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this generator expects no dial-out site named {name!r} (dial-out sites: {expected})",
            )
        names = peer_names(context)
        if self.tls and name not in names:
            log.warning("refused a Join as %r from %s: its certificate names %s", name, context.peer(), sorted(names))
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the client certificate names {sorted(names)}, not site {name!r}",
            )
        log.info("site %s dialed in from %s (version %s)", name, context.peer(), version or "?")
        return site

    @staticmethod
    def _read(site: JoinedSite, session: Session, messages: Iterator[fpb.JoinRequest]) -> None:
        details = "the site closed its stream"
        try:
            for message in messages:
                session.resolve(message)
        except grpc.RpcError as e:
            details = f"stream lost: {e}"
        except Exception as e:  # a malformed or out-of-protocol message ends this stream, not the generator
            details = f"stream ended: {e}"
        site.detach(session, details)

    def Join(
        self, request_iterator: Iterator[fpb.JoinRequest], context: grpc.ServicerContext
    ) -> Iterator[fpb.JoinResponse]:
        first = next(request_iterator, None)
        if first is None:
            return
        site = self._admit(first, context)
        session = site.attach(context.peer())
        context.add_callback(lambda: site.detach(session, "the stream ended"))
        threading.Thread(
            target=self._read, args=(site, session, request_iterator), name=f"join-{site.name}", daemon=True
        ).start()
        yield from session.outgoing()
        ended = session.ended
        if ended is not None and ended.code() == grpc.StatusCode.ABORTED:
            context.abort(ended.code(), ended.details())
