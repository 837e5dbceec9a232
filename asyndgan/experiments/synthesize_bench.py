"""Synthesize throughput: images/s through the generator service's Synthesize stream (real gRPC on loopback) vs
the same generator's forward pass called directly. The client runs in its own process, as a downstream job
does, and also in the server's process (where its decoding competes with the server for the GIL). Each stream is
compared with forward passes timed just before and after it (the median over rounds is reported), not best
against best."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.demo import set_omp_wait_policy
from asyndgan.experiments.datasets import label_pool
from asyndgan.experiments.emulated import EmulatedSite, serve_emulated
from asyndgan.experiments.timing import best_of
from asyndgan.nets import NetConfig, resolve_generator
from asyndgan.services.generator.service import GeneratorConfig, GeneratorService

__all__ = ["REFERENCE", "bench_synthesize", "bench_synthesize_with_policy"]

REFERENCE = "forward (worker thread)"  # G's forward pass on a worker thread, as the service runs it


def _paired(
    reference: Callable[[], object], variants: Mapping[str, Callable[[], object]], repeat: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """After one warm-up of each, ``repeat`` rounds of: reference, v1, reference, v2, ..., reference. Returns
    (per name, the reference's included, its seconds in every run; per variant, per round, the mean of the two
    reference runs beside it over its own). A ratio to the runs just before and after cancels the machine's
    speed drift, which here reaches 15 % within seconds and moves a best-of-each comparison by as much."""
    reference()
    for fn in variants.values():
        fn()
    seconds: dict[str, list[float]] = {REFERENCE: [], **{name: [] for name in variants}}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        before = best_of(reference, 1)
        seconds[REFERENCE].append(before)
        for name, fn in variants.items():
            took, after = best_of(fn, 1), best_of(reference, 1)
            seconds[name].append(took)
            seconds[REFERENCE].append(after)
            ratios[name].append((before + after) / 2 / took)
            before = after
    return seconds, ratios


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
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    batch = len(batches[0])
    address = f"127.0.0.1:{svc.server.port}"
    clients = {c: GeneratorClient(address, image_codec=c) for c in codecs}
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for c in codecs:
        pipes[c], child = ctx.Pipe()
        procs.append(ctx.Process(target=_client_process, args=(address, c, batches, child), daemon=True))
        procs[-1].start()
        child.close()  # the client's end lives in the client only: its exit is EOFError here, not a hang
    tensors = [torch.from_numpy(b) for b in batches]

    def forward() -> None:
        for t in tensors:
            svc.gen.synthesize(t)

    def stream(client: GeneratorClient) -> None:
        for images, _ in client.stream(batches):
            assert images.shape[0] == batch

    # The service runs G on a worker thread: that is the reference. The same forward pass on the main thread
    # is timed against it like the streams, as a control: its ratio shows what the method reads for no change.
    worker = ThreadPoolExecutor(1, thread_name_prefix="bench-forward")
    variants: dict[str, Callable[[], object]] = {
        "forward (main thread)": forward,
        **{f"{c} images, client process": functools.partial(_remote, pipe) for c, pipe in pipes.items()},
        **{f"{c} images, client in the server's process": functools.partial(stream, cl) for c, cl in clients.items()},
    }
    try:
        return _paired(lambda: worker.submit(forward).result(), variants, repeat)
    finally:
        worker.shutdown()
        for c in clients.values():
            c.close()
        for pipe in pipes.values():
            with contextlib.suppress(OSError):  # a client process that has already ended
                pipe.send(False)
        for p in procs:
            p.join(10)


def bench_synthesize(size: int, batch: int, requests: int, repeat: int, codecs: Sequence[str]) -> dict[str, Any]:
    """Per path its best images/s and, over ``repeat`` rounds, its throughput relative to the forward passes
    timed beside it (median, min, max): the Synthesize stream (real gRPC on loopback, client in its own process
    and in the server's) vs the same generator's forward pass called directly, same batch and threads."""
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
            seconds, ratios = _time_paths(svc, batches, codecs, repeat)
        finally:
            svc.stop(0)
            site_server.stop(0)
    images = batch * requests
    rows = []
    for name, runs in seconds.items():
        paired = sorted(ratios.get(name, [1.0]))
        rows.append(
            {
                "path": f"G {name} in-process" if name.startswith("forward") else f"Synthesize stream ({name})",
                "images_per_s": images / min(runs),
                "vs_forward": statistics.median(paired),
                "vs_forward_min": paired[0],
                "vs_forward_max": paired[-1],
            }
        )
    return {
        "size": size,
        "batch": batch,
        "requests": requests,
        "threads": torch.get_num_threads(),
        "generator": resolve_generator(NetConfig().generator, size),
        "rows": rows,
    }


def _child(conn: Connection, threads: int, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(threads)
    conn.send({"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), **bench_synthesize(*args)})


def bench_synthesize_with_policy(
    omp_wait_policy: str, threads: int, size: int, batch: int, requests: int, repeat: int, codecs: Sequence[str]
) -> dict[str, Any]:
    """:func:`bench_synthesize` in a fresh process (its client processes too) whose OpenMP runtime starts with
    ``OMP_WAIT_POLICY=omp_wait_policy`` ("default": unset), as the service image sets it, with ``threads`` torch
    threads. The policy is read once, when the runtime loads, so it cannot change inside this process."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    saved = os.environ.get("OMP_WAIT_POLICY", "default")
    set_omp_wait_policy(os.environ, omp_wait_policy)
    try:  # a spawned process inherits this process's environment at start()
        proc = ctx.Process(target=_child, args=(send, threads, (size, batch, requests, repeat, codecs)))
        proc.start()
    finally:
        set_omp_wait_policy(os.environ, saved)
    send.close()
    try:
        result: dict[str, Any] | None = receive.recv()
    except EOFError:  # the process ended without sending
        result = None
    finally:
        proc.join()
    if result is None:
        raise RuntimeError(f"the Synthesize benchmark process ended with exit code {proc.exitcode}")
    return result
