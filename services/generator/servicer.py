"""gRPC face of the generator: Synthesize (stream) and Status, through :mod:`asyndgan.wire`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from asyndgan import wire
from asyndgan.errors import FailedPrecondition
from asyndgan.rpc import status_code_for, translate_errors
from asyndgan.v1 import generator_pb2 as pb
from asyndgan.v1 import generator_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from asyndgan.services.generator.service import GeneratorService

__all__ = ["GeneratorServicer"]


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, service: GeneratorService) -> None:
        self.service = service

    def _synthesize(self, request: pb.SynthesizeRequest) -> pb.SynthesizeResponse:
        gen, svc = self.service.gen, self.service  # FAILED_PRECONDITION while there is no model yet
        labels, out_codec = wire.synthesize_request_from_proto(request, svc.height, svc.width, gen.num_classes)
        images = gen.synthesize(labels)  # waits for the training step that holds G, if any
        return wire.synthetic_batch_to_proto(images, gen.modalities, out_codec)

    def Synthesize(
        self, request_iterator: Iterator[pb.SynthesizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SynthesizeResponse]:
        try:
            for request in request_iterator:
                yield self._synthesize(request)
        except (ValueError, FailedPrecondition) as e:
            context.abort(status_code_for(e), str(e)[:500])

    @translate_errors
    def Status(
        self, request: pb.GeneratorServiceStatusRequest, context: grpc.ServicerContext
    ) -> pb.GeneratorServiceStatusResponse:
        return wire.training_status_to_proto(self.service.status())
