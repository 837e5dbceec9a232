"""gRPC face of the generator: Synthesize (stream) and Status, through :mod:`asyndgan.wire`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import torch

from asyndgan import codec, wire
from asyndgan.errors import FailedPrecondition
from asyndgan.rpc import status_code_for, translate_errors
from asyndgan.services.generator.readahead import READ_AHEAD, ReadAhead
from asyndgan.v1 import generator_pb2 as pb
from asyndgan.v1 import generator_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from asyndgan.services.generator.service import GeneratorService

__all__ = ["MAX_AHEAD", "GeneratorServicer"]

DECODE_AHEAD = 1  # decoded requests waiting for G
MAX_AHEAD = DECODE_AHEAD + READ_AHEAD  # requests taken beyond the replies handed to gRPC


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, service: GeneratorService) -> None:
        self.service = service

    def _decode(self, request: pb.SynthesizeRequest) -> tuple[torch.Tensor, codec.Codec, int | None]:
        svc = self.service  # FAILED_PRECONDITION while there is no model yet
        labels, out_codec, style = wire.synthesize_request_from_proto(
            request, svc.height, svc.width, svc.gen.num_classes
        )
        return labels, out_codec, svc.gen.style_index(style) if style else None

    def _generate(self, decoded: tuple[torch.Tensor, codec.Codec, int | None]) -> tuple[torch.Tensor, codec.Codec]:
        labels, out_codec, style = decoded
        return self.service.gen.synthesize(labels, style), out_codec  # waits for a training step that holds G

    def Synthesize(
        self, request_iterator: Iterator[pb.SynthesizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SynthesizeResponse]:
        """One reply per request, in order, through three stages that overlap, each in its own thread: read and
        decode the next request, run G, encode and send (this thread). Bounded: the server takes at most
        MAX_AHEAD requests beyond the replies it has handed to gRPC; a reply goes out as soon as it is ready.
        A bad request ends the stream after the replies before it."""
        decoded = ReadAhead(request_iterator, self._decode, DECODE_AHEAD, name="synthesize-read")
        generated = ReadAhead(decoded, self._generate, READ_AHEAD, name="synthesize-g")
        context.add_callback(generated.close)  # the call ended (a client gone away): stop both stages
        try:
            for images, out_codec in generated:
                yield wire.synthetic_batch_to_proto(images, self.service.gen.modalities, out_codec)
        except (ValueError, FailedPrecondition) as e:
            context.abort(status_code_for(e), str(e)[:500])

    @translate_errors
    def Status(
        self, request: pb.GeneratorServiceStatusRequest, context: grpc.ServicerContext
    ) -> pb.GeneratorServiceStatusResponse:
        return wire.training_status_to_proto(self.service.status())
