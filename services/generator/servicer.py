"""gRPC face of the generator: Synthesize (stream) and Status."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from asyndgan import codec
from asyndgan.algorithm import GeneratorTrainer
from asyndgan.rpc import status_code_for, translate_errors
from asyndgan.v1 import generator_pb2 as pb
from asyndgan.v1 import generator_pb2_grpc as pb_grpc

__all__ = ["GeneratorServicer"]

log = logging.getLogger(__name__)

MAX_SYNTH_BATCH = 64


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(
        self,
        gen: GeneratorTrainer,
        lock: Any,
        height: int,
        width: int,
        status: Callable[[], pb.TrainingStatus],
    ) -> None:
        self.gen = gen
        self.lock = lock
        self.height, self.width = height, width
        self.status = status
        self.limits = codec.Limits(max_elements=MAX_SYNTH_BATCH * height * width)

    def _synthesize(self, request: pb.SynthesizeRequest) -> pb.SyntheticBatch:
        out_codec = codec.Codec.parse(request.image_codec) if request.image_codec else codec.LOSSLESS
        if not request.HasField("labels"):
            raise ValueError("labels missing")
        labels = codec.decode(request.labels, self.limits)
        if labels.dim() != 3 or tuple(labels.shape[1:]) != (self.height, self.width):
            raise ValueError(f"labels must have shape (B, {self.height}, {self.width}), got {tuple(labels.shape)}")
        if labels.dtype != torch.uint8:
            raise ValueError("labels must be uint8 class indices")
        if labels.numel() and int(labels.max()) >= self.gen.num_classes:
            raise ValueError(f"label values must be < {self.gen.num_classes}")
        with self.lock:
            images = self.gen.synthesize(labels)
        return pb.SyntheticBatch(images=codec.encode(images, out_codec), modalities=list(self.gen.modalities))

    def Synthesize(
        self, request_iterator: Iterator[pb.SynthesizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SyntheticBatch]:
        try:
            for request in request_iterator:
                yield self._synthesize(request)
        except (codec.CodecError, ValueError) as e:
            context.abort(status_code_for(e), str(e)[:500])

    @translate_errors
    def Status(self, request: pb.GeneratorStatusRequest, context: grpc.ServicerContext) -> pb.TrainingStatus:
        return self.status()
