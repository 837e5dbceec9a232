"""Distributed training over real gRPC on loopback equals the in-process reference trainer."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from asyndgan import codec
from asyndgan.clients.generator_client import GeneratorClient
from asyndgan.data import load_site
from asyndgan.errors import IncompatibleSites
from asyndgan.local import LocalRun, train_local
from asyndgan.services.generator.admission import compatible_versions
from asyndgan.services.generator.service import GeneratorService
from tests.integration.cluster import BATCH, NET, SIZE, TRAIN, generator_config, site_spec, start_sites, stop_sites

K = 4


def params(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def local_reference(n_sites: int, iterations: int, stale: bool = False, site_styles: bool = False) -> torch.nn.Module:
    sites = [load_site(site_spec(j, n_sites)) for j in range(n_sites)]
    run = LocalRun(iterations=iterations, batch_size=BATCH, seed=0, stale=stale, site_styles=site_styles)
    return train_local(sites, None, NET, TRAIN, run, None).generator.G


def run_distributed(
    tmp_path: Path, iterations: int, codec: str = "f32", n_sites: int = 2, **kw: Any
) -> torch.nn.Module:
    sites = start_sites(n_sites, tmp_path)
    svc = GeneratorService.start(generator_config(sites, tmp_path, iterations, codec, **kw))
    try:
        svc.train()
        return svc.gen.G
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_lossless_distributed_equals_in_process_bit_for_bit(tmp_path: Path, one_thread: None) -> None:
    reference = local_reference(2, K)
    distributed = run_distributed(tmp_path, K, "f32")
    assert torch.equal(params(reference), params(distributed))


def test_site_styles_over_grpc_equal_in_process_and_synthesize_renders_a_named_site(
    tmp_path: Path, one_thread: None
) -> None:
    """Each site's batch reaches G with its own style plane (bit for bit the in-process run); Synthesize renders
    the style a client names, every style in turn without one, and refuses a name G does not render."""
    reference = local_reference(2, K, site_styles=True)
    sites = start_sites(2, tmp_path)
    svc = GeneratorService.start(generator_config(sites, tmp_path, K, "f32", site_styles=True))
    try:
        svc.train()
        assert torch.equal(params(reference), params(svc.gen.G))
        lab = load_site(site_spec(1, 2)).labels[:3]
        with GeneratorClient(f"127.0.0.1:{svc.server.port}") as client:
            assert list(client.status().styles) == ["site-0", "site-1"]
            for style, index in (("site-1", 1), ("", None)):
                images, _ = client.synthesize(lab, style=style)
                want = svc.gen.synthesize(torch.from_numpy(lab), index).numpy()
                np.testing.assert_allclose(images, want, rtol=0, atol=1e-6)
            assert not np.allclose(client.synthesize(lab, style="site-0")[0], images)
            with pytest.raises(grpc.RpcError) as err:
                client.synthesize(lab, style="site-9")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown style 'site-9': this generator renders site-0, site-1" in (err.value.details() or "")
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_bf16_stays_within_tolerance(tmp_path: Path, one_thread: None) -> None:
    """bf16 carries ~8 mantissa bits (rel. error ~2e-3 per gradient). Adam normalises each update to
    ~lr per parameter, so the runs drift apart slowly; we bound what matters, G's output: after K steps the
    mean absolute difference of G(labels) between the bf16 and the lossless run stays below 1 % of the
    [-1, 1] range, i.e. 0.02, while training itself moved G's output by far more than that."""
    reference = local_reference(2, K)
    bf16 = run_distributed(tmp_path, K, "bf16+zstd")
    untrained = local_reference(2, 0)
    labels = torch.from_numpy(load_site("embedded:icbm152?split=heldout&of=2&size=32").labels[:16])
    from asyndgan.nets import one_hot

    with torch.no_grad():
        x = one_hot(labels, 4)
        ref, low, start = reference(x), bf16(x), untrained(x)
    drift = float((ref - low).abs().mean())
    moved = float((ref - start).abs().mean())
    assert drift < 0.02, drift
    assert moved > 10 * drift, (moved, drift)


def test_resume_equals_uninterrupted(tmp_path: Path, one_thread: None) -> None:
    reference = local_reference(2, K)
    # First half, then everything stops (generator and sites), then all resume from their checkpoints.
    sites = start_sites(2, tmp_path)
    svc = GeneratorService.start(generator_config(sites, tmp_path, K // 2, "f32"))
    svc.train()
    svc.stop(grace=0)
    stop_sites(sites)
    sites = start_sites(2, tmp_path)
    svc = GeneratorService.start(generator_config(sites, tmp_path, K, "f32", resume=True))
    try:
        assert svc.gen.steps == K // 2
        svc.train()
        assert torch.equal(params(reference), params(svc.gen.G))
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_stale_step_over_grpc_with_a_resume_equals_in_process(tmp_path: Path, one_thread: None) -> None:
    """--stale through the services, stopped halfway (the held batch is in the checkpoint) and resumed, is the
    in-process stale run bit for bit, and is not the default step."""
    reference = local_reference(2, K, stale=True)
    sites = start_sites(2, tmp_path)
    svc = GeneratorService.start(generator_config(sites, tmp_path, K // 2, "f32", stale=True))
    svc.train()
    svc.stop(grace=0)
    stop_sites(sites)
    sites = start_sites(2, tmp_path)
    svc = GeneratorService.start(generator_config(sites, tmp_path, K, "f32", stale=True, resume=True))
    try:
        svc.train()
        assert svc.gen.steps == K and torch.equal(params(reference), params(svc.gen.G))
        assert not torch.equal(params(reference), params(local_reference(2, K)))
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_generator_restart_alone_equals_uninterrupted(tmp_path: Path, one_thread: None) -> None:
    """Sites keep running; the generator stops after a step and resumes: NextBatch hands back the
    outstanding batch, so nothing is skipped."""
    reference = local_reference(2, K)
    sites = start_sites(2, tmp_path)
    try:
        svc = GeneratorService.start(generator_config(sites, tmp_path, K // 2, "f32"))
        svc.train()
        svc.stop(grace=0)
        svc = GeneratorService.start(generator_config(sites, tmp_path, K, "f32", resume=True))
        svc.train()
        svc.stop(grace=0)
        assert torch.equal(params(reference), params(svc.gen.G))
    finally:
        stop_sites(sites)


class SlowStep(grpc.ServerInterceptor):
    """Delays a site's Step while ``slow`` is set (emulates a straggling hospital)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.slow = threading.Event()
        self.slow.set()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if not details.method.endswith("/Step") or handler is None:
            return handler
        inner = handler.unary_unary

        def slow(request: Any, context: grpc.ServicerContext) -> Any:
            if self.slow.is_set():
                time.sleep(self.delay)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(slow, handler.request_deserializer, handler.response_serializer)


def test_straggler_is_dropped_then_taken_back(tmp_path: Path) -> None:
    straggler = SlowStep(delay=3.0)
    sites = start_sites(3, tmp_path, interceptors={2: (straggler,)})
    svc = GeneratorService.start(
        generator_config(sites, tmp_path, 6, "bf16+zstd", orchestrator={"step_deadline_s": 1.5})
    )
    try:
        svc.train(until=3)
        status = svc.status()
        slow = next(s for s in status.sites if s.site_id == "site-2")
        assert status.step == 3, "training went on without the straggler"
        assert slow.steps_dropped >= 1 and "deadline" in slow.last_error
        assert all(s.steps_contributed == 3 for s in status.sites if s.site_id != "site-2")
        straggler.slow.clear()  # the hospital recovers
        time.sleep(straggler.delay)  # let its late step finish
        svc.train(until=6)
        slow = next(s for s in svc.status().sites if s.site_id == "site-2")
        assert slow.steps_contributed >= 2 and slow.active
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_incompatible_sites_are_refused(tmp_path: Path) -> None:
    sites = start_sites(2, tmp_path)
    other = start_sites(1, tmp_path / "other", size=16)
    try:
        cfg = generator_config(sites + other, tmp_path, 1)
        cfg = replace(cfg, sites=(*cfg.sites[:2], ("odd", cfg.sites[2][1])))
        with pytest.raises(ValueError, match="16x16"):
            GeneratorService.start(cfg)
    finally:
        stop_sites(sites + other)


def test_multimodality_site_lacking_t2(tmp_path: Path) -> None:
    """Site 0 has only T1; G still outputs T2 (learned from sites 1, 2) and synthesizes it for site 0."""
    sites = start_sites(3, tmp_path, modalities=["t1", "t1,t2", "t1,t2"])
    svc = GeneratorService.start(generator_config(sites, tmp_path, 3, "bf16+zstd"))
    try:
        assert svc.modalities == ("t1", "t2")
        svc.train()
        assert all(s.steps_contributed == 3 for s in svc.status().sites)
        from asyndgan.clients.generator_client import GeneratorClient

        labels = load_site(site_spec(0, 3)).labels[:5]
        with GeneratorClient(f"127.0.0.1:{svc.server.port}") as client:
            images, names = client.synthesize(labels, batch_size=2)
        assert names == ["t1", "t2"] and images.shape == (5, 2, SIZE, SIZE)
        assert float(abs(images[:, 1] - images[:, 0]).mean()) > 0  # a distinct T2 channel
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


class PoisonGradient(grpc.ServerInterceptor):
    """A compromised or broken site: replaces its gradient with ``value`` everywhere."""

    def __init__(self, value: float) -> None:
        self.value = value

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if not details.method.endswith("/Step") or handler is None:
            return handler
        inner = handler.unary_unary

        def poison(request: Any, context: grpc.ServicerContext) -> Any:
            reply = inner(request, context)
            shape = tuple(reply.grad.shape)
            reply.grad.CopyFrom(codec.encode(torch.full(shape, self.value), "f32"))
            return reply

        return grpc.unary_unary_rpc_method_handler(poison, handler.request_deserializer, handler.response_serializer)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e6])
def test_one_bad_site_cannot_poison_g(tmp_path: Path, value: float) -> None:
    sites = start_sites(2, tmp_path, interceptors={1: (PoisonGradient(value),)})
    svc = GeneratorService.start(generator_config(sites, tmp_path, 3, "bf16+zstd", max_grad_norm=1e3))
    try:
        svc.train()
        bad = next(s for s in svc.status().sites if s.site_id == "site-1")
        good = next(s for s in svc.status().sites if s.site_id == "site-0")
        # Each of its answers is refused; it is probed back in the background between refusals.
        assert bad.steps_dropped >= 1 and bad.steps_contributed == 0 and bad.last_error.startswith("bad_gradient")
        assert good.steps_contributed == 3 and svc.gen.steps == 3
        assert all(bool(torch.isfinite(p).all()) for p in svc.gen.G.parameters())
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_sites_with_other_training_settings_are_refused(tmp_path: Path) -> None:
    """A site whose settings shape its gradient differently (here lambda_L1) is named with the setting."""
    sites = start_sites(2, tmp_path)
    other = start_sites(1, tmp_path / "other", train=replace(TRAIN, lambda_l1=10.0))
    try:
        cfg = generator_config(sites + other, tmp_path, 1)
        cfg = replace(cfg, sites=(*cfg.sites[:2], ("odd", cfg.sites[2][1])))
        with pytest.raises(
            IncompatibleSites, match=r"site site-0 trains with lambda_l1 = 10.0, the generator with 100.0"
        ):
            GeneratorService.start(cfg)
    finally:
        stop_sites(sites + other)


@pytest.mark.parametrize(
    ("theirs", "ok"),
    [("0.1.0", True), ("0.1.7", True), ("0.2.0", False), ("1.1.0", False), ("", False), ("emulated", False)],
)
def test_version_rule(theirs: str, ok: bool) -> None:
    assert compatible_versions("0.1.3", theirs) is ok
    assert compatible_versions("1.2.0", "1.9.1") and not compatible_versions("1.2.0", "2.0.0")
