"""gRPC face of a site: unpack (:mod:`asyndgan.wire`) -> :class:`Site` -> pack. No training logic here."""

from __future__ import annotations

import grpc

from asyndgan import wire
from asyndgan.rpc import translate_errors
from asyndgan.services.discriminator.site import Site
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc

__all__ = ["DiscriminatorServicer"]


class DiscriminatorServicer(pb_grpc.DiscriminatorServicer):
    def __init__(self, site: Site) -> None:
        self.site = site

    @translate_errors
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.SiteInfo:
        return wire.site_info_to_proto(self.site.description)

    @translate_errors
    def NextBatch(self, request: pb.BatchRequest, context: grpc.ServicerContext) -> pb.ConditionBatch:
        label_codec = wire.batch_request_from_proto(request)
        batch = self.site.next_batch()
        return wire.batch_to_proto(batch.id, batch.labels, label_codec)

    @translate_errors
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        # Everything is validated before the site trains: a refused request changes nothing.
        work = wire.step_request_from_proto(request, self.site.description)
        answer = self.site.step(work.batch_id, work.fakes, work.modalities)
        return wire.step_reply_to_proto(answer, work.grad_codec, work.label_codec)

    @translate_errors
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        path = self.site.checkpoint()
        return wire.checkpoint_reply_to_proto(self.site.steps, path.name if path else "")

    @translate_errors
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.SiteStatus:
        return wire.site_status_to_proto(self.site.status())
