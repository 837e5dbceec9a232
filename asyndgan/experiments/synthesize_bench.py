"""Synthesize throughput: images/s through the generator service's Synthesize stream (real gRPC on loopback) vs
the same generator's forward pass called directly. The client runs in its own process, as a downstream job
does, and also in the server's process (where its decoding competes with the server for the GIL)."""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.experiments.datasets import label_pool
from asyndgan.experiments.emulated import EmulatedSite, serve_emulated
from asyndgan.experiments.timing import best_of
from asyndgan.nets import NetConfig, resolve_generator
from asyndgan.services.generator.service import GeneratorConfig, GeneratorService

__all__ = ["bench_synthesize"]


def _race(variants: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Per variant its best seconds: one warm-up each, then ``repeat`` interleaved rounds (so a load spike hits
    every variant alike)."""
    for fn in variants.values():
        fn()
    best = dict.fromkeys(variants, math.inf)
    for _ in range(repeat):
        for name, fn in variants.items():
            best[name] = min(best[name], best_of(fn, 1))
    return best


def _client_process(address: str, codec: str, batches: list[np.ndarray], conn: Connection) -> None:
    """A Synthesize client in its own process: on each ``True`` from ``conn``, stream ``batches`` and send back
    the seconds it took; ``False`` ends it."""
    client = GeneratorClient(address, image_codec=codec)
    try:
        while conn.recv():
            start = time.perf_counter()
            for images, _ in client.stream(batches):
                assert images.shape[0] == len(batches[0])
            conn.send(time.perf_counter() - start)
    finally:
        client.close()


def _remote(conn: Connection) -> None:
    conn.send(True)
    conn.recv()


def _time_paths(
    svc: GeneratorService, batches: list[np.ndarray], codecs: Sequence[str], repeat: int
) -> dict[str, float]:
    batch = len(batches[0])
    address = f"127.0.0.1:{svc.server.port}"
    clients = {c: GeneratorClient(address, image_codec=c) for c in codecs}
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for c in codecs:
        pipes[c], child = ctx.Pipe()
        procs.append(ctx.Process(target=_client_process, args=(address, c, batches, child), daemon=True))
        procs[-1].start()
    tensors = [torch.from_numpy(b) for b in batches]

    def forward() -> None:
        for t in tensors:
            svc.gen.synthesize(t)

    def stream(client: GeneratorClient) -> None:
        for images, _ in client.stream(batches):
            assert images.shape[0] == batch

    # The service runs G in a gRPC worker thread; the forward pass is timed both on this (main) thread and on
    # a worker thread, and the faster of the two is the reference (they differ by some percent here).
    worker = ThreadPoolExecutor(1, thread_name_prefix="bench-forward")
    variants: dict[str, Callable[[], object]] = {
        "forward (main thread)": forward,
        "forward (worker thread)": lambda: worker.submit(forward).result(),
        **{f"{c} images, client process": functools.partial(_remote, pipe) for c, pipe in pipes.items()},
        **{f"{c} images, client in the server's process": functools.partial(stream, cl) for c, cl in clients.items()},
    }
    try:
        return _race(variants, repeat)
    finally:
        worker.shutdown()
        for c in clients.values():
            c.close()
        for pipe in pipes.values():
            pipe.send(False)
        for p in procs:
            p.join(10)


def bench_synthesize(size: int, batch: int, requests: int, repeat: int, codecs: Sequence[str]) -> dict[str, Any]:
    """Images/s through the generator service's Synthesize stream (client and server in this process, real
    gRPC on loopback) vs the same generator's forward pass called directly, same batch and threads."""
    pool, num_classes = label_pool(size)
    site_server = serve_emulated(EmulatedSite("emulated", pool, num_classes, batch, 0.0))
    rng = np.random.default_rng(0)
    batches = [np.ascontiguousarray(pool[rng.integers(0, len(pool), batch)]) for _ in range(requests)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GeneratorConfig(
            sites=(("emulated", f"127.0.0.1:{site_server.port}"),),
            iterations=0,
            checkpoint_dir=Path(tmp),
            net=NetConfig(),
        )
        svc = GeneratorService.start(cfg)
        try:
            best = _time_paths(svc, batches, codecs, repeat)
        finally:
            svc.stop(0)
            site_server.stop(0)
    images = batch * requests
    reference = min(best["forward (main thread)"], best["forward (worker thread)"])
    rows = [
        {
            "path": f"G {name} in-process" if name.startswith("forward") else f"Synthesize stream ({name})",
            "images_per_s": images / seconds,
            "vs_forward": reference / seconds,
        }
        for name, seconds in best.items()
    ]
    return {
        "size": size,
        "batch": batch,
        "requests": requests,
        "threads": torch.get_num_threads(),
        "generator": resolve_generator(NetConfig().generator, size),
        "rows": rows,
    }
