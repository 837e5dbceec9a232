"""Python client for the generator service: stream label maps in, get synthetic images out."""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator
from types import TracebackType

import numpy as np
import torch

from asyndgan import wire
from asyndgan.rpc import TlsConfig, make_channel
from asyndgan.v1 import generator_pb2 as pb
from asyndgan.v1 import generator_pb2_grpc as pb_grpc

__all__ = ["REQUESTS_AHEAD", "GeneratorClient"]

REQUESTS_AHEAD = 4  # encoded requests queued beyond the replies read (the server reads 3 ahead of its replies)


class GeneratorClient:
    """``with GeneratorClient("127.0.0.1:50051") as g: images = g.synthesize(labels)``."""

    def __init__(
        self,
        target: str,
        *,
        tls: TlsConfig | None = None,
        server_name: str | None = None,
        timeout: float = 300.0,
        image_codec: str = "f32",
    ) -> None:
        self.channel = make_channel(target, tls=tls, server_name=server_name)
        self.stub = pb_grpc.GeneratorServiceStub(self.channel)
        self.timeout = timeout
        self.image_codec = image_codec

    def status(self) -> pb.GeneratorServiceStatusResponse:
        return self.stub.Status(pb.GeneratorServiceStatusRequest(), timeout=self.timeout)

    def stream(
        self, batches: Iterable[np.ndarray | torch.Tensor], style: str = ""
    ) -> Iterator[tuple[np.ndarray, list[str]]]:
        """One (images (B, C, H, W) float32 in [-1, 1], modality names) per label batch (B, H, W); ``style``:
        the site whose scanner a generator with site styles renders ("" = every site's in turn).

        The requests are encoded here, at most :data:`REQUESTS_AHEAD` ahead of the replies read; gRPC's request
        thread only hands them on. So a failed call leaves no thread inside torch or the codec when the process
        exits (a daemon thread stopped in C++ code at exit aborts the process: "terminate called ...")."""
        pending: queue.SimpleQueue[pb.SynthesizeRequest | None] = queue.SimpleQueue()
        todo = iter(batches)

        def feed(n: int) -> bool:
            """Queue up to ``n`` more requests; False (and the end mark queued) once ``batches`` is used up."""
            for _ in range(n):
                b = next(todo, None)
                if b is None:
                    pending.put(None)
                    return False
                pending.put(wire.synthesize_request_to_proto(torch.as_tensor(b), self.image_codec, style))
            return True

        more = feed(REQUESTS_AHEAD)
        try:
            for reply in self.stub.Synthesize(iter(pending.get, None), timeout=self.timeout):
                more = more and feed(1)
                images, modalities = wire.synthetic_batch_from_proto(reply)
                yield images.numpy(), modalities
        finally:
            if more:
                pending.put(None)  # the call ended early: let gRPC's request thread finish

    def synthesize(self, labels: np.ndarray, batch_size: int = 16, style: str = "") -> tuple[np.ndarray, list[str]]:
        """All of ``labels`` (N, H, W) -> images (N, C, H, W) and modality names (``style``: as :meth:`stream`)."""
        parts: list[np.ndarray] = []
        names: list[str] = []
        batches = (labels[i : i + batch_size] for i in range(0, len(labels), batch_size))
        for images, batch_names in self.stream(batches, style):
            parts.append(images)
            names = batch_names
        return np.concatenate(parts), names

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
