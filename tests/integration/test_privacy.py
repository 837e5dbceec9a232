"""Privacy: nothing a discriminator sends carries a real image of its site.

A server interceptor records every message leaving the discriminators during a short real run. Each
tensor in them is decoded and compared with every real sample of that site in every flip and shift the
site's augmentation can apply: no tensor equals a real image,
none is close to one, and none is even an affine rescaling of one. Label maps, the intended output, are
integer class maps. Losses are scalars. Raw bytes of real images appear in no message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from asyndgan import codec
from asyndgan.services.generator.service import GeneratorService
from asyndgan.v1 import tensor_pb2
from tests.integration.cluster import generator_config, start_sites, stop_sites


class Recorder(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, details.method

        def record(request: Any, context: grpc.ServicerContext) -> Any:
            reply = inner(request, context)
            self.sent.append((method, reply))
            return reply

        return grpc.unary_unary_rpc_method_handler(record, handler.request_deserializer, handler.response_serializer)


def tensors(msg: Message) -> list[tensor_pb2.Tensor]:
    """Every Tensor anywhere inside ``msg``."""
    found: list[tensor_pb2.Tensor] = []
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        items = [value] if isinstance(value, Message) else list(value)
        for item in items:
            found += [item] if isinstance(item, tensor_pb2.Tensor) else tensors(item)
    return found


def affine_residual(x: np.ndarray, reals: np.ndarray) -> float:
    """min over real images r of min_{a,b} ||a*x + b - r|| / ||r - mean(r)||, vectorised."""
    x = x.ravel().astype(np.float64)
    xc = x - x.mean()
    r = reals.reshape(len(reals), -1).astype(np.float64)
    rc = r - r.mean(1, keepdims=True)
    denom = max(float(xc @ xc), 1e-30)
    a = rc @ xc / denom
    resid = rc - a[:, None] * xc[None]
    return float((np.linalg.norm(resid, axis=1) / np.maximum(np.linalg.norm(rc, axis=1), 1e-12)).min())


def augmented(images: np.ndarray, s: int) -> np.ndarray:
    """Every flip and shift the site's sampler can apply to its (N, H, W) real images."""
    h, w = images.shape[1:]
    out = []
    for flipped in (images, images[:, :, ::-1]):
        padded = np.pad(flipped, ((0, 0), (s, s), (s, s)), constant_values=-1.0)
        out += [
            padded[:, s + dy : s + dy + h, s + dx : s + dx + w] for dy in range(-s, s + 1) for dx in range(-s, s + 1)
        ]
    return np.concatenate(out)


def test_no_real_image_leaves_a_site(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    recorders = {j: Recorder() for j in range(2)}
    sites = start_sites(2, tmp_path, interceptors={j: (r,) for j, r in recorders.items()})
    svc = GeneratorService.start(generator_config(sites, tmp_path, 6, "f32"))
    try:
        svc.train()
    finally:
        svc.stop(grace=0)
        stop_sites(sites)

    for j, (site, _) in enumerate(sites):
        data = site.trainer.data
        reals = augmented(data.images[:, 0], site.trainer.cfg.max_shift)
        real_bytes = data.images.astype(np.float32).tobytes()
        windows = [real_bytes[i : i + 64] for i in range(0, len(real_bytes) - 64, 4096)]
        sent = recorders[j].sent
        assert {m.rsplit("/", 1)[1] for m, _ in sent} >= {"Describe", "NextBatch", "Step", "Checkpoint"}
        n_float = 0
        for method, msg in sent:
            wire = msg.SerializeToString()
            assert not any(w in wire for w in windows if len(set(w)) > 8), f"real bytes in {method}"
            for t in tensors(msg):
                x = codec.decode(t).numpy()
                if t.dtype == tensor_pb2.DTYPE_UINT8:
                    assert x.ndim == 3 and int(x.max()) < data.num_classes  # label maps only
                    continue
                n_float += 1
                for sample in x.reshape(-1, *x.shape[-2:]):
                    # Not a copy, not close, not even a rescaled copy of any real sample.
                    assert np.abs(reals - sample).mean(axis=(1, 2)).min() > 0.1
                    assert affine_residual(sample, reals) > 0.2, method
        assert n_float >= 6, "every Step reply carries a gradient that was checked"
    for record in caplog.records:
        assert len(record.getMessage()) < 2000, "no tensor dumps in logs"
