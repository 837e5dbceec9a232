"""gRPC face of a site: unpack -> :class:`Site` -> pack. No training logic here."""

from __future__ import annotations

import grpc

from asyndgan import codec
from asyndgan.algorithm import Batch, LossTerm
from asyndgan.rpc import translate_errors
from asyndgan.services.discriminator.site import Site
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc

__all__ = ["DiscriminatorServicer", "losses_to_proto"]

MAX_CHANNELS = 16


def losses_to_proto(losses: list[LossTerm]) -> list[pb.Loss]:
    return [pb.Loss(network=t.network, modality=t.modality, term=t.term, value=t.value) for t in losses]


class DiscriminatorServicer(pb_grpc.DiscriminatorServicer):
    def __init__(self, site: Site) -> None:
        self.site = site
        d = site.description
        # Nothing larger than a batch of MAX_CHANNELS-channel images is ever decoded.
        self.limits = codec.Limits(max_elements=d.batch_size * MAX_CHANNELS * d.height * d.width)

    @staticmethod
    def _codec(spec: str, default: codec.Codec) -> codec.Codec:
        return codec.Codec.parse(spec) if spec else default

    @staticmethod
    def _batch(batch: Batch, label_codec: codec.Codec) -> pb.ConditionBatch:
        return pb.ConditionBatch(batch_id=batch.id, labels=codec.encode(batch.labels, label_codec))

    @translate_errors
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.SiteInfo:
        d = self.site.description
        return pb.SiteInfo(
            site_id=d.site_id,
            num_samples=d.num_samples,
            modalities=list(d.modalities),
            height=d.height,
            width=d.width,
            num_classes=d.num_classes,
            batch_size=d.batch_size,
            version=d.version,
        )

    @translate_errors
    def NextBatch(self, request: pb.BatchRequest, context: grpc.ServicerContext) -> pb.ConditionBatch:
        label_codec = self._codec(request.label_codec, codec.LABEL_CODEC)
        return self._batch(self.site.next_batch(), label_codec)

    @translate_errors
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        # Everything is validated before the site trains: a refused request changes nothing.
        grad_codec = self._codec(request.grad_codec, codec.IMAGE_CODEC)
        label_codec = self._codec(request.label_codec, codec.LABEL_CODEC)
        if not request.HasField("fakes"):
            raise ValueError("fakes missing")
        fakes = codec.decode(request.fakes, self.limits)
        result = self.site.step(request.batch_id, fakes, list(request.modalities))
        return pb.StepReply(
            batch_id=request.batch_id,
            grad=codec.encode(result.grad, grad_codec),
            losses=losses_to_proto(result.losses),
            next=self._batch(result.next, label_codec),
        )

    @translate_errors
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        path = self.site.checkpoint()
        return pb.CheckpointReply(steps=self.site.steps, file=path.name if path else "")

    @translate_errors
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.SiteStatus:
        return pb.SiteStatus(
            site_id=self.site.site_id,
            steps=self.site.steps,
            last_losses=losses_to_proto(self.site.last_losses),
            serving=True,
        )
