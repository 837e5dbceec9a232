"""gRPC face of a site: unpack (:mod:`asyndgan.wire`) -> :class:`Site` -> pack. No training logic here.

:func:`answer` is shared by the Discriminator service (dial-in) and the Join stream of a dial-out site."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from asyndgan import wire
from asyndgan.rpc import translate_errors
from asyndgan.services.discriminator.site import Site
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc

__all__ = ["DiscriminatorServicer", "answer"]


def _describe(site: Site, request: pb.DescribeRequest) -> pb.DescribeResponse:
    return wire.site_info_to_proto(site.description)


def _next_batch(site: Site, request: pb.NextBatchRequest) -> pb.NextBatchResponse:
    label_codec = wire.batch_request_from_proto(request)
    batch = site.next_batch()
    return wire.batch_to_proto(batch.id, batch.labels, label_codec)


def _step(site: Site, request: pb.StepRequest) -> pb.StepResponse:
    # Everything is validated before the site trains: a refused request changes nothing.
    work = wire.step_request_from_proto(request, site.description)
    answer = site.step(work.batch_id, work.fakes, work.modalities, work.grad_codec)
    return wire.step_reply_to_proto(answer, work.grad_codec, work.label_codec)


def _checkpoint(site: Site, request: pb.CheckpointRequest) -> pb.CheckpointResponse:
    path = site.checkpoint()
    return wire.checkpoint_reply_to_proto(site.steps, path.name if path else "")


_HANDLERS: dict[str, Callable[[Site, Message], Message]] = {
    "Describe": _describe,  # type: ignore[dict-item]
    "NextBatch": _next_batch,  # type: ignore[dict-item]
    "Step": _step,  # type: ignore[dict-item]
    "Checkpoint": _checkpoint,  # type: ignore[dict-item]
}


def answer(site: Site, method: str, request: Message) -> Message:
    """The reply of Discriminator RPC ``method``; domain errors propagate (callers map them to a status)."""
    return _HANDLERS[method](site, request)


class DiscriminatorServicer(pb_grpc.DiscriminatorServiceServicer):
    def __init__(self, site: Site) -> None:
        self.site = site

    @translate_errors
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        return _describe(self.site, request)

    @translate_errors
    def NextBatch(self, request: pb.NextBatchRequest, context: grpc.ServicerContext) -> pb.NextBatchResponse:
        return _next_batch(self.site, request)

    @translate_errors
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        return _step(self.site, request)

    @translate_errors
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        return _checkpoint(self.site, request)

    @translate_errors
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return wire.site_status_to_proto(self.site.status())
