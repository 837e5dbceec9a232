"""Emulated sites: discriminator services whose compute is a fixed sleep, for measuring the generator's
orchestration (fan-out, codecs, aggregation) without D's compute."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import torch

from asyndgan import codec, wire
from asyndgan.algorithm import TrainConfig, training_settings
from asyndgan.experiments.datasets import label_pool
from asyndgan.messages import LossTerm, SiteDescription, SiteStatus, StepAnswer
from asyndgan.nets import NetConfig
from asyndgan.rpc import Server, make_server
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc

__all__ = ["DISCRIMINATOR_SERVICE", "EmulatedSite", "emulated_sites", "serve_emulated"]

DISCRIMINATOR_SERVICE = pb.DESCRIPTOR.services_by_name["DiscriminatorService"].full_name
_LABEL_BATCHES = 8


class EmulatedSite(pb_grpc.DiscriminatorServiceServicer):
    """A site whose compute is a fixed sleep: Step returns a zero gradient of the right shape and the next
    batch of label maps (drawn from ``pool``). Measures the generator's orchestration, not D's compute.

    Its own Python work is kept small: batch ids cycle through the few label batches it holds, so each reply
    is built (by :mod:`asyndgan.wire`) once and reused; all emulated sites share one process and its GIL
    (:func:`emulated_sites`), whereas real sites each run their own."""

    def __init__(
        self, site_id: str, pool: np.ndarray, num_classes: int, batch: int, delay: float, seed: int = 0
    ) -> None:
        self.site_id = site_id
        self.pool = pool
        self.batch = batch
        self.delay = delay
        self.batch_id = 0
        self.steps = 0
        self.lock = threading.Lock()
        h, w = pool.shape[1:]
        # It reports the default training settings, as a real site with default flags does.
        settings = training_settings(NetConfig(), TrainConfig())
        self.description = SiteDescription(site_id, len(pool), ("t1",), h, w, num_classes, batch, settings=settings)
        rng = np.random.default_rng(seed)
        self.label_batches = [
            torch.from_numpy(np.ascontiguousarray(pool[rng.integers(0, len(pool), batch)]))
            for _ in range(_LABEL_BATCHES)
        ]
        self._built: dict[tuple[Any, ...], Any] = {}

    def _cached(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._built:
            self._built[key] = make()
        return self._built[key]

    def _advance(self) -> int:
        """Draw the next batch: ids cycle through 1..8, batch id k holds label batch k % 8."""
        self.batch_id = self.batch_id % _LABEL_BATCHES + 1
        return self.batch_id

    def _labels(self, batch_id: int) -> torch.Tensor:
        return self.label_batches[batch_id % _LABEL_BATCHES]

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        return wire.site_info_to_proto(self.description)

    def NextBatch(self, request: pb.NextBatchRequest, context: grpc.ServicerContext) -> pb.NextBatchResponse:
        with self.lock:
            spec = wire.codec_from_proto(request.label_codec, codec.LABEL_CODEC)
            k = self._advance()
            return self._cached(("batch", k, str(spec)), lambda: wire.batch_to_proto(k, self._labels(k), spec))

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        with self.lock:
            try:
                work = wire.step_request_from_proto(request, self.description)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            shape = tuple(work.fakes.shape)
            h, w = self.pool.shape[1:]
            if work.batch_id != self.batch_id or len(shape) != 4 or shape[0] != self.batch or shape[2:] != (h, w):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not the outstanding batch, or a wrong shape")
            time.sleep(self.delay)
            self.steps += 1
            prev, nxt = work.batch_id, self._advance()

            def reply() -> pb.StepResponse:
                zeros = torch.zeros(shape)
                answer = StepAnswer(prev, zeros, [LossTerm("G", "", "total", 0.0)], nxt, self._labels(nxt))
                return wire.step_reply_to_proto(answer, work.grad_codec, work.label_codec)

            return self._cached(("step", prev, shape, str(work.grad_codec), str(work.label_codec)), reply)

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        return wire.checkpoint_reply_to_proto(self.steps, "")

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return wire.site_status_to_proto(SiteStatus(self.site_id, self.steps, [], serving=True))


def serve_emulated(site: EmulatedSite) -> Server:
    server = make_server(
        "127.0.0.1:0", lambda s: pb_grpc.add_DiscriminatorServiceServicer_to_server(site, s), [DISCRIMINATOR_SERVICE]
    )
    server.set_serving(True)
    return server


def _host_emulated(n: int, size: int, batch: int, delay: float, ports: Any, stop: Any) -> None:
    """Child process: serve ``n`` emulated sites on 127.0.0.1 until ``stop`` is set."""
    torch.set_num_threads(1)
    pool, num_classes = label_pool(size)
    servers = [serve_emulated(EmulatedSite(f"site-{j}", pool, num_classes, batch, delay, seed=j)) for j in range(n)]
    ports.put([srv.port for srv in servers])
    stop.wait()
    for srv in servers:
        srv.stop(0)


@contextlib.contextmanager
def emulated_sites(n: int, size: int, batch: int, delay: float) -> Iterator[list[str]]:
    """``n`` emulated sites in one child process (off the generator's GIL, as real sites are); their addresses."""
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_host_emulated, args=(n, size, batch, delay, ports, stop), daemon=True)
    proc.start()
    try:
        yield [f"127.0.0.1:{port}" for port in ports.get(timeout=120)]
    finally:
        stop.set()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
