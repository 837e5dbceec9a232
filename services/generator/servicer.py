"""gRPC face of the generator: Synthesize (stream) and Status, through :mod:`asyndgan.wire`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from asyndgan import wire
from asyndgan.algorithm import GeneratorTrainer
from asyndgan.errors import FailedPrecondition
from asyndgan.messages import TrainingState
from asyndgan.rpc import status_code_for, translate_errors
from asyndgan.v1 import generator_pb2 as pb
from asyndgan.v1 import generator_pb2_grpc as pb_grpc

__all__ = ["GeneratorServicer"]


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, gen: GeneratorTrainer, height: int, width: int, status: Callable[[], TrainingState]) -> None:
        self.gen = gen
        self.height, self.width = height, width
        self.status = status

    def _synthesize(self, request: pb.SynthesizeRequest) -> pb.SyntheticBatch:
        labels, out_codec = wire.synthesize_request_from_proto(request, self.height, self.width, self.gen.num_classes)
        images = self.gen.synthesize(labels)  # waits for the training step that holds G, if any
        return wire.synthetic_batch_to_proto(images, self.gen.modalities, out_codec)

    def Synthesize(
        self, request_iterator: Iterator[pb.SynthesizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SyntheticBatch]:
        try:
            for request in request_iterator:
                yield self._synthesize(request)
        except (ValueError, FailedPrecondition) as e:
            context.abort(status_code_for(e), str(e)[:500])

    @translate_errors
    def Status(self, request: pb.GeneratorStatusRequest, context: grpc.ServicerContext) -> pb.TrainingStatus:
        return wire.training_status_to_proto(self.status())
