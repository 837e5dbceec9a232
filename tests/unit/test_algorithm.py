from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asyndgan.algorithm import (
    Dropped,
    LossTerm,
    SiteStepError,
    SiteTrainer,
    TrainConfig,
)
from asyndgan.codec import LOSSLESS, Codec, roundtrip
from asyndgan.generator import GeneratorTrainer
from asyndgan.io import load_checkpoint, save_checkpoint
from asyndgan.messages import StepAnswer
from asyndgan.nets import NetConfig, gan_loss, one_hot
from asyndgan.sampling import Batch, BatchSampler
from tests.conftest import make_site

NET = NetConfig(generator="unet_32", ngf=8, ndf=8)
CFG = TrainConfig()


def site_trainer(modalities: tuple[str, ...] = ("t1",), seed: int = 1) -> SiteTrainer:
    return SiteTrainer(make_site(modalities=modalities), NET, CFG, batch_size=4, seed=seed)


def generator(modalities: tuple[str, ...] = ("t1",), **kw: float | bool) -> GeneratorTrainer:
    return GeneratorTrainer(NET, CFG, num_classes=4, modalities=modalities, seed=0, image_size=32, **kw)


def params(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


# -- sampler ------------------------------------------------------------------------------------------


def test_sampler_is_seeded_and_resumable() -> None:
    site = make_site(n=10)
    a, b = BatchSampler(site, 4, seed=5), BatchSampler(site, 4, seed=5)
    for _ in range(3):
        x, y = a.next(), b.next()
        assert x.id == y.id and torch.equal(x.labels, y.labels) and torch.equal(x.real, y.real)
    state = a.state_dict()
    expected = [a.next() for _ in range(4)]
    c = BatchSampler(site, 4, seed=99)
    c.load_state_dict(state)
    for e in expected:
        got = c.next()
        assert got.id == e.id and torch.equal(got.labels, e.labels) and torch.equal(got.real, e.real)


def test_augmentation_keeps_label_and_image_aligned() -> None:
    site = make_site(n=8, size=32)
    sampler = BatchSampler(site, 8, seed=0, flip=True, max_shift=3)
    levels = torch.tensor([-1.0, -0.2, 0.3, 0.8])
    for _ in range(5):
        batch = sampler.next()
        # Every pixel's intensity is nearest to its own class level (noise sigma 0.05 << level gaps).
        nearest = (batch.real[:, 0, :, :, None] - levels).abs().argmin(-1)
        assert float((nearest == batch.labels.long()).float().mean()) > 0.98


def test_sampler_covers_an_epoch_without_repeats() -> None:
    site = make_site(n=8)
    sampler = BatchSampler(site, 4, seed=0, flip=False, max_shift=0)
    seen = torch.cat([sampler.next().labels for _ in range(2)])
    assert len({bytes(x.numpy()) for x in seen}) == 8


# -- site step ----------------------------------------------------------------------------------------


def test_site_step_updates_d_then_returns_gradient_of_g_loss() -> None:
    st = site_trainer()
    batch = st.next_batch()
    fakes = torch.rand(4, 1, 32, 32) * 2 - 1
    before = params(st.discriminators["t1"]).clone()
    grad = st.step(batch, fakes, ["t1"])
    d = st.discriminators["t1"]
    assert not torch.equal(before, params(d)), "D must have stepped"
    # Reference: the same G loss with the *updated* D, differentiated by hand.
    fake = fakes.clone().requires_grad_(True)
    cond = one_hot(batch.labels, 4)
    loss = gan_loss(d(torch.cat([cond, fake], 1)), True, "vanilla") + 100 * (fake - batch.real).abs().mean()
    (expected,) = torch.autograd.grad(loss, fake)
    torch.testing.assert_close(grad, expected)
    terms = {(t.network, t.term) for t in st.last_losses}
    assert {("D", "real"), ("D", "fake"), ("G", "gan"), ("G", "l1"), ("G", "total")} <= terms


def test_missing_modality_gets_zero_gradient() -> None:
    st = site_trainer(modalities=("t1",))
    batch = st.next_batch()
    grad = st.step(batch, torch.zeros(4, 2, 32, 32), ["t2", "t1"])
    assert float(grad[:, 0].abs().sum()) == 0.0
    assert float(grad[:, 1].abs().sum()) > 0.0


def test_multimodal_site_trains_one_d_per_modality() -> None:
    st = site_trainer(modalities=("t1", "t2"))
    assert set(st.discriminators) == {"t1", "t2"}
    grad = st.step(st.next_batch(), torch.zeros(4, 2, 32, 32), ["t1", "t2"])
    assert float(grad[:, 0].abs().sum()) > 0 and float(grad[:, 1].abs().sum()) > 0


@pytest.mark.parametrize(
    ("fakes", "channels", "match"),
    [
        (torch.zeros(3, 1, 32, 32), ["t1"], "shape"),
        (torch.zeros(4, 1, 16, 16), ["t1"], "shape"),
        (torch.zeros(4, 32, 32), ["t1"], "shape"),
        (torch.zeros(4, 2, 32, 32), ["t1"], "channels"),
        (torch.zeros(4, 1, 32, 32), ["t2"], "modalities"),
        (torch.zeros(4, 2, 32, 32), ["t1", "t1"], "duplicate"),
        (torch.full((4, 1, 32, 32), math.nan), ["t1"], "NaN"),
        (torch.full((4, 1, 32, 32), math.inf), ["t1"], "NaN"),
    ],
)
def test_site_rejects_bad_fakes(fakes: torch.Tensor, channels: list[str], match: str) -> None:
    st = site_trainer()
    batch = st.next_batch()
    before = params(st.discriminators["t1"]).clone()
    with pytest.raises(SiteStepError, match=match):
        st.step(batch, fakes, channels)
    assert torch.equal(before, params(st.discriminators["t1"])), "a rejected step must not train D"


def test_site_state_round_trip(tmp_path: Path) -> None:
    a = site_trainer()
    a.step(a.next_batch(), torch.zeros(4, 1, 32, 32), ["t1"])
    save_checkpoint(tmp_path / "d.pt", a.state_dict())
    b = site_trainer(seed=77)
    b.load_state_dict(load_checkpoint(tmp_path / "d.pt"))
    ba, bb = a.next_batch(), b.next_batch()
    assert torch.equal(ba.labels, bb.labels)
    fakes = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(a.step(ba, fakes, ["t1"]), b.step(bb, fakes, ["t1"]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="modalities"):
        site_trainer(modalities=("t1", "t2")).load_state_dict(a.state_dict())


def test_error_feedback_sends_the_sum_of_the_gradients() -> None:
    q8 = Codec.parse("q8+zstd")
    t = site_trainer()
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 1, 32, 32, generator=g) * (1 + k) for k in range(20)]
    sent = [t.feed_back(x, q8) for x in grads]
    assert all(torch.equal(s, roundtrip(s, q8)) for s in sent)  # each is exactly what the wire carries
    assert t.residual is not None
    torch.testing.assert_close(sum(sent) + t.residual, sum(grads), rtol=0, atol=1e-4)
    # With feedback the error of the sum stays one step's rounding; without, it adds up.
    plain = sum(roundtrip(x, q8) for x in grads)
    assert float((sum(sent) - sum(grads)).abs().max()) <= float(grads[-1].abs().max()) / 127
    assert float((sum(sent) - sum(grads)).norm()) < 0.5 * float((plain - sum(grads)).norm())


def test_error_feedback_keeps_its_sum_when_the_batch_size_changes() -> None:
    q8 = Codec.parse("q8")
    t = site_trainer()
    t.feed_back(torch.randn(5, 1, 32, 32), q8)
    assert t.residual is not None
    before = t.residual.sum(0)
    zero = torch.zeros(3, 1, 32, 32)
    sent = t.feed_back(zero, q8)
    torch.testing.assert_close((sent + t.residual).sum(0), before, rtol=0, atol=1e-5)
    t.feed_back(torch.zeros(3, 2, 32, 32), q8)  # another image shape: the residual starts over
    assert t.residual is not None and not t.residual.any()
    x = torch.randn(3, 1, 32, 32)
    assert t.feed_back(x, LOSSLESS) is x and t.residual is None


def test_error_feedback_residual_is_checkpointed(tmp_path: Path) -> None:
    q8 = Codec.parse("q8+zstd")
    a = site_trainer()
    a.step(a.next_batch(), torch.rand(4, 1, 32, 32), ["t1"], q8)
    assert a.residual is not None and a.residual.any()
    save_checkpoint(tmp_path / "d.pt", a.state_dict())
    b = site_trainer(seed=77)
    b.load_state_dict(load_checkpoint(tmp_path / "d.pt"))
    assert b.residual is not None and torch.equal(a.residual, b.residual)
    fakes = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(
        a.step(a.next_batch(), fakes, ["t1"], q8), b.step(b.next_batch(), fakes, ["t1"], q8), rtol=0, atol=0
    )


# -- generator step -----------------------------------------------------------------------------------


def answer(grad: torch.Tensor, losses: list[LossTerm]) -> StepAnswer:
    return StepAnswer(1, grad, losses, 2, torch.zeros(0, 32, 32, dtype=torch.uint8))


class FixedExchange:
    """Site j answers ``grads[j]`` (None: no answer); records the calls in order and, per answer, whether G had
    already backpropagated something when it asked."""

    def __init__(self, grads: list[torch.Tensor | None], gen: GeneratorTrainer | None = None) -> None:
        self.grads, self.gen = grads, gen
        self.calls: list[tuple[str, int]] = []
        self.had_grad: list[bool] = []

    def send(self, j: int, fakes: torch.Tensor) -> None:
        self.calls.append(("send", j))

    def answer(self, j: int) -> StepAnswer | Dropped:
        self.calls.append(("answer", j))
        if self.gen is not None:
            self.had_grad.append(any(p.grad is not None for p in self.gen.G.parameters()))
        g = self.grads[j]
        return Dropped("deadline") if g is None else answer(g, [LossTerm("G", "", "total", 1.0)])


class SiteExchange:
    """One in-process site trainer on a fixed batch."""

    def __init__(self, st: SiteTrainer, batch: Batch) -> None:
        self.st, self.batch = st, batch

    def send(self, j: int, fakes: torch.Tensor) -> None:
        self.fakes = fakes

    def answer(self, j: int) -> StepAnswer | Dropped:
        return answer(self.st.step(self.batch, self.fakes, ["t1"]), self.st.last_losses)


def labels(n: int) -> torch.Tensor:
    return torch.randint(0, 4, (n, 32, 32), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)


def test_generator_aggregates_weighted_by_site_size() -> None:
    g1, g2 = torch.randn(2, 1, 32, 32), torch.randn(3, 1, 32, 32)
    gen = generator()
    ref = generator()
    outcome = gen.step([labels(2), labels(3)], [10, 30], FixedExchange([g1, g2]))
    assert outcome.weights == [0.25, 0.75] and outcome.answered == [True, True]
    # Reference: backprop the hand-weighted gradient.
    fakes = ref.forward(torch.cat([labels(2), labels(3)]))
    ref.opt.zero_grad()
    fakes.backward(torch.cat([0.25 * g1, 0.75 * g2]))
    ref.opt.step()
    assert torch.equal(params(gen.G), params(ref.G))
    assert gen.steps == 1


@pytest.mark.parametrize("answers", [[True, True, True], [True, False, True]])
def test_pipelined_step_is_the_batched_step(answers: list[bool]) -> None:
    """Per-site forward and backward give G the same gradient as one batched pass, up to float32 summation
    order (biases before a norm layer have zero gradient up to rounding), and the same weights."""
    grads = [torch.randn(n, 1, 32, 32) if ok else None for n, ok in zip([2, 3, 2], answers, strict=True)]
    batched, pipelined = generator(), generator(pipeline=True)
    a = batched.step([labels(2), labels(3), labels(2)], [10, 30, 20], FixedExchange(grads))
    b = pipelined.step([labels(2), labels(3), labels(2)], [10, 30, 20], FixedExchange(grads))
    assert a.weights == b.weights and a.answered == b.answered == answers
    flat = [torch.cat([p.grad.flatten() for p in g.G.parameters() if p.grad is not None]) for g in (batched, pipelined)]
    assert float(torch.linalg.vector_norm(flat[1] - flat[0])) <= 1e-5 * float(torch.linalg.vector_norm(flat[0]))


@pytest.mark.parametrize("pipeline", [False, True])
def test_generator_step_overlaps_the_sites(pipeline: bool) -> None:
    """Every site gets its images before G asks for the first answer; pipelined, G has backpropagated site 0's
    gradient before it waits for site 1 (the backward pass overlaps the later sites' round trips)."""
    gen = generator(pipeline=pipeline)
    ex = FixedExchange([torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), None], gen)
    gen.step([labels(2), labels(2), labels(2)], [1, 1, 1], ex)
    assert ex.calls == [("send", 0), ("send", 1), ("send", 2), ("answer", 0), ("answer", 1), ("answer", 2)]
    assert ex.had_grad == ([False, True, True] if pipeline else [False, False, False])


def fixed_grads(call: int, dropped: int | None = None) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(call)
    return [None if j == dropped else torch.randn(n, 1, 32, 32, generator=gen) for j, n in enumerate([2, 3])]


def test_stale_step_is_the_batched_step_one_call_late() -> None:
    """With answers that do not depend on the images, the stale step's call k + 1 applies exactly what the batched
    step's call k does (the held batch goes through the weights that the batched step would have used)."""
    batched, stale = generator(), generator(stale=True)
    stale.step([labels(2), labels(3)], [10, 30], FixedExchange(fixed_grads(0)))
    assert stale.steps == 1 and torch.equal(params(stale.G), params(batched.G))  # nothing applied yet
    for call in range(3):
        batched.step(
            [labels(2), labels(3)], [10, 30], FixedExchange(fixed_grads(call, dropped=1 if call == 1 else None))
        )
        nxt = stale.step(
            [labels(2), labels(3)], [10, 30], FixedExchange(fixed_grads(call + 1, dropped=1 if call == 0 else None))
        )
        assert torch.allclose(params(stale.G), params(batched.G), atol=1e-6)
    assert nxt.weights == [0.25, 0.75] and stale.steps == 4


def test_stale_step_backpropagates_the_held_batch_while_the_sites_work() -> None:
    gen = generator(stale=True)
    gen.step([labels(2), labels(2)], [1, 1], FixedExchange([torch.ones(2, 1, 32, 32)] * 2))
    ex = FixedExchange([torch.ones(2, 1, 32, 32)] * 2, gen)
    gen.step([labels(2), labels(2)], [1, 1], ex)
    assert ex.calls == [("send", 0), ("send", 1), ("answer", 0), ("answer", 1)]
    assert ex.had_grad == [True, True]  # the held batch was backpropagated before G waited for an answer
    with pytest.raises(ValueError, match="not both"):
        generator(stale=True, pipeline=True)


def test_stale_held_batch_is_checkpointed(tmp_path: Path) -> None:
    a = generator(stale=True)
    a.step([labels(2)], [1], FixedExchange([torch.randn(2, 1, 32, 32)]))
    save_checkpoint(tmp_path / "g.pt", a.state_dict())
    b = generator(stale=True)
    b.load_state_dict(load_checkpoint(tmp_path / "g.pt"))
    for g in (a, b):
        g.step([labels(2)], [1], FixedExchange([torch.ones(2, 1, 32, 32)]))
    assert torch.equal(params(a.G), params(b.G)) and not torch.equal(params(a.G), params(generator().G))
    with pytest.raises(ValueError, match="--stale"):
        generator().load_state_dict(load_checkpoint(tmp_path / "g.pt"))


def test_dropped_site_renormalises_weights() -> None:
    gen = generator()
    outcome = gen.step(
        [labels(2), labels(2), labels(2)],
        [10, 30, 60],
        FixedExchange([torch.ones(2, 1, 32, 32), None, torch.ones(2, 1, 32, 32)]),
    )
    assert outcome.answered == [True, False, True]
    assert outcome.weights == pytest.approx([10 / 70, 0.0, 60 / 70])


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e12])
def test_poisoned_gradient_is_left_out(bad: float) -> None:
    gen = generator(max_grad_norm=1e6)
    ok = torch.ones(2, 1, 32, 32)
    outcome = gen.step([labels(2), labels(2)], [1, 1], FixedExchange([ok, torch.full((2, 1, 32, 32), bad)]))
    assert outcome.answered == [True, False]
    assert outcome.weights == [1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in gen.G.parameters())


def test_wrong_shape_gradient_is_left_out() -> None:
    gen = generator()
    outcome = gen.step([labels(2)], [1], FixedExchange([torch.ones(3, 1, 32, 32)]))
    assert outcome.answered == [False]


def test_no_answer_means_no_step() -> None:
    gen = generator()
    before = params(gen.G).clone()
    outcome = gen.step([labels(2)], [1], FixedExchange([None]))
    assert outcome.answered == [False] and gen.steps == 0 and math.isnan(outcome.generator_loss)
    assert torch.equal(before, params(gen.G))


def test_training_is_deterministic_under_a_seed(one_thread: None) -> None:
    def run() -> torch.Tensor:
        st = site_trainer()
        gen = generator()
        for _ in range(3):
            b = st.next_batch()
            gen.step([b.labels], [12], SiteExchange(st, b))
        return params(gen.G)

    assert torch.equal(run(), run())


def test_generator_state_round_trip(tmp_path: Path) -> None:
    a = generator()
    a.step([labels(2)], [1], FixedExchange([torch.ones(2, 1, 32, 32)]))
    save_checkpoint(tmp_path / "g.pt", a.state_dict())
    b = generator()
    b.load_state_dict(load_checkpoint(tmp_path / "g.pt"))
    assert b.steps == 1 and torch.equal(params(a.G), params(b.G))
    with pytest.raises(ValueError):
        generator(modalities=("t1", "t2")).load_state_dict(a.state_dict())


def ema_generator(decay: float) -> GeneratorTrainer:
    return GeneratorTrainer(NET, TrainConfig(ema=decay), num_classes=4, modalities=("t1",), seed=0, image_size=32)


def test_ema_follows_g_by_its_ramped_decay_and_is_what_synthesize_serves() -> None:
    gen, plain = ema_generator(0.9), generator()
    assert gen.G_ema is not None and plain.G_ema is None
    avg = params(gen.G).clone()
    for t in range(1, 6):
        grads: list[torch.Tensor | None] = [torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(t))]
        gen.step([labels(2)], [1], FixedExchange(grads))
        plain.step([labels(2)], [1], FixedExchange(grads))
        d = min(0.9, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * params(gen.G)
    assert torch.equal(params(gen.G), params(plain.G))  # the average never feeds back into training
    assert torch.allclose(params(gen.G_ema), avg, atol=1e-6)
    assert not torch.allclose(params(gen.G_ema), params(gen.G))
    x = labels(2)
    with torch.no_grad():
        from_avg = gen.G_ema(one_hot(x, 4))
    assert torch.equal(gen.synthesize(x), from_avg)
    assert torch.equal(plain.synthesize(x), plain.forward(x).detach())


def test_ema_is_checkpointed_and_an_old_checkpoint_starts_it_from_g(tmp_path: Path) -> None:
    a = ema_generator(0.9)
    for _ in range(3):
        a.step([labels(2)], [1], FixedExchange([torch.randn(2, 1, 32, 32)]))
    save_checkpoint(tmp_path / "g.pt", a.state_dict())
    b = ema_generator(0.9)
    b.load_state_dict(load_checkpoint(tmp_path / "g.pt"))
    assert a.G_ema is not None and b.G_ema is not None
    assert torch.equal(params(a.G_ema), params(b.G_ema))
    old = {k: v for k, v in a.state_dict().items() if k != "G_ema"}
    c = ema_generator(0.9)
    c.load_state_dict(old)
    assert c.G_ema is not None and torch.equal(params(c.G_ema), params(a.G))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TrainConfig(lr_g=0).validate()
    with pytest.raises(ValueError):
        TrainConfig(lambda_l1=-1).validate()
    for decay in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema"):
            TrainConfig(ema=decay).validate()
    with pytest.raises(ValueError):
        BatchSampler(make_site(), 0, seed=0)
    assert np.isfinite(CFG.lambda_l1)
