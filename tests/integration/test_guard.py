"""The privacy guard at a real site over real gRPC: budget enforced, write-ahead ledger that outlives the
checkpoint, the generator going on without a finished site, and nothing computed on real images in a reply."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from asyndgan import codec, wire
from asyndgan.guard import LEDGER_FILE, PrivacyConfig
from asyndgan.messages import StepWork
from asyndgan.privacy.accountant import max_steps
from asyndgan.rpc import make_channel
from asyndgan.services.generator.service import GeneratorService
from asyndgan.v1 import discriminator_pb2 as pb
from asyndgan.v1 import discriminator_pb2_grpc as pb_grpc
from tests.integration.cluster import BATCH, PAPER, generator_config, start_sites, stop_sites

# A budget that lasts a few steps after the class-mean release (sigma 2 at q = 4/n).
TIGHT = PrivacyConfig(mode="dp", epsilon=0.46, delta=1e-5, noise_multiplier=2.0)


def test_budget_exhaustion_finishes_the_site_and_training_goes_on(tmp_path: Path) -> None:
    sites = start_sites(2, tmp_path, privacy=[TIGHT, PAPER])
    guarded = sites[:1]
    guard = guarded[0][0].guard
    assert guard is not None and guard.q == BATCH / guarded[0][0].description.num_samples
    release = (1.0, TIGHT.stats_noise, 1)  # the class means, charged when the site started
    assert guard.ledger.segments == [release]
    allowed = max_steps(guard.q, TIGHT.noise_multiplier, TIGHT.epsilon, TIGHT.delta, [release])
    assert 1 <= allowed <= 20
    svc = GeneratorService.start(generator_config(sites, tmp_path, allowed + 4, "bf16+zstd"))
    try:
        svc.train()
        state = {s.site_id: s for s in svc.status().sites}
        g, p = state["site-0"], state["site-1"]
        assert g.finished and g.privacy == "dp" and g.steps_contributed == allowed
        assert 0 < g.epsilon_spent <= TIGHT.epsilon
        assert g.last_error.startswith("finished: privacy budget exhausted")
        assert not p.finished and p.privacy == "none" and p.steps_contributed == allowed + 4
        assert svc.gen.steps == allowed + 4
        # The site itself refuses further Steps with FAILED_PRECONDITION and a one-line reason.
        site, server = guarded[0]
        assert site.privacy().exhausted and site.privacy().epsilon_spent == pytest.approx(g.epsilon_spent)
        with make_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.DiscriminatorServiceStub(ch)
            b = stub.NextBatch(pb.NextBatchRequest(), timeout=10)
            work = StepWork(b.batch_id, torch.zeros(BATCH, 1, 32, 32), ("t1",), 0, codec.IMAGE_CODEC, codec.LABEL_CODEC)
            with pytest.raises(grpc.RpcError) as err:
                stub.Step(wire.step_request_to_proto(work, codec.LOSSLESS), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "privacy budget exhausted" in (err.value.details() or "")
            status = wire.site_status_from_proto(stub.Status(pb.StatusRequest(), timeout=10))
            assert status.privacy.mode == "dp" and status.privacy.exhausted
    finally:
        svc.stop(grace=0)
        stop_sites(sites)


def test_ledger_outlives_the_checkpoint(tmp_path: Path) -> None:
    cfg = PrivacyConfig(mode="dp", epsilon=8.0, noise_multiplier=2.0)
    sites = start_sites(1, tmp_path, privacy=cfg)
    svc = GeneratorService.start(generator_config(sites, tmp_path, 3, "bf16+zstd"))
    try:
        svc.train()
        spent = sites[0][0].privacy().epsilon_spent
    finally:
        svc.stop(grace=0)
        stop_sites(sites)
    site_dir = tmp_path / "site-0"
    assert (site_dir / LEDGER_FILE).exists() and spent > 0
    (site_dir / "discriminator.pt").unlink()  # a hospital deletes the model checkpoint...
    again = start_sites(1, tmp_path, privacy=cfg)
    try:
        # ...the site starts from scratch, but the budget it already spent is still spent.
        assert again[0][0].steps == 0
        assert again[0][0].privacy().epsilon_spent == pytest.approx(spent)
    finally:
        stop_sites(again)


def test_guarded_reply_carries_nothing_computed_on_real_images(tmp_path: Path) -> None:
    sites = start_sites(1, tmp_path, privacy=PrivacyConfig(mode="dp", noise_multiplier=1.0))
    svc = GeneratorService.start(generator_config(sites, tmp_path, 2, "bf16+zstd"))
    try:
        svc.train()
        link = svc.orch.links[0]
        terms = {(t.network, t.term) for t in link.last_losses}
        assert terms == {("D", "fake"), ("G", "gan"), ("G", "anchor"), ("G", "total")}
        assert link.info is not None and link.info.privacy.mode == "dp"
    finally:
        svc.stop(grace=0)
        stop_sites(sites)
