"""Core of the site's privacy guard: RDP accountant, Poisson subject sampling, DP-SGD gradients, budget ledger."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from asyndgan.errors import BUDGET_EXHAUSTED_PREFIX, BudgetExhausted, FailedPrecondition
from asyndgan.nets import NetConfig, build_discriminator, gan_loss
from asyndgan.privacy import (
    PoissonSubjectSampler,
    PrivacyLedger,
    accumulate_grads,
    calibrate_sigma,
    check_dp_compatible,
    clip_per_sample,
    dp_sgd_gradients,
    epsilon,
    gan_real_loss,
    max_steps,
    per_sample_gradients,
    secure_generator,
    secure_rng,
)

Q = 8 / 2000
DELTA = 1e-5

# ----------------------------------------------------------------------------------------------- accountant


def _opacus_eps(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    for q, sigma, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta))


def test_epsilon_matches_opacus_rdp_accountant() -> None:
    ours = epsilon([(Q, 1.0, 1000)], DELTA)
    assert ours == pytest.approx(_opacus_eps([(Q, 1.0, 1000)], DELTA), rel=1e-12)
    assert ours == pytest.approx(1.06, abs=0.005)  # DESIGN.md §7: n = 2000, batch 8, sigma 1, 1000 steps
    assert epsilon([], DELTA) == 0.0 and epsilon([(Q, 1.0, 0)], DELTA) == 0.0


def test_segments_compose_like_the_library_history() -> None:
    history = [(Q, 1.0, 300), (0.01, 1.5, 200), (Q, 1.0, 100)]
    assert epsilon(history, DELTA) == pytest.approx(_opacus_eps(history, DELTA), rel=1e-12)
    assert epsilon(history, DELTA) > epsilon(history[:2], DELTA) > epsilon(history[:1], DELTA)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrate_sigma_round_trip(target: float) -> None:
    tol = 1e-4
    sigma = calibrate_sigma(Q, 1000, target, DELTA, tol=tol)
    assert epsilon([(Q, sigma, 1000)], DELTA) <= target
    assert epsilon([(Q, sigma - tol, 1000)], DELTA) > target, "not the smallest sigma within tol"


def test_max_steps_is_the_last_step_within_budget() -> None:
    spent = [(0.01, 1.2, 150)]
    t = max_steps(Q, 1.0, 2.0, DELTA, spent)
    assert t > 0
    assert epsilon([*spent, (Q, 1.0, t)], DELTA) <= 2.0 < epsilon([*spent, (Q, 1.0, t + 1)], DELTA)
    assert max_steps(Q, 1.0, 1e-3, DELTA) == 0


@pytest.mark.parametrize("q, sigma", [(0.0, 1.0), (1.5, 1.0), (Q, 0.0), (Q, -1.0)])
def test_accountant_rejects_bad_settings(q: float, sigma: float) -> None:
    with pytest.raises(ValueError):
        epsilon([(q, sigma, 10)], DELTA)


# ----------------------------------------------------------------------------------------------- sampling


def test_poisson_subject_sampling_rate_and_one_example_per_subject() -> None:
    rng = np.random.default_rng(0)
    n_subj, q, draws = 60, 0.1, 4000
    per_subject = rng.integers(1, 6, n_subj)
    subjects = rng.permutation(np.repeat(np.arange(100, 100 + n_subj), per_subject))  # ids need not be 0..n-1
    sampler = PoissonSubjectSampler(subjects, q, rng=secure_rng(seed=1))
    assert sampler.num_subjects == n_subj and sampler.expected_batch == pytest.approx(q * n_subj)
    included = np.zeros(n_subj, np.int64)
    picks = np.zeros(len(subjects), np.int64)
    for _ in range(draws):
        idx = sampler.sample()
        assert idx.dtype == np.int64 and idx.ndim == 1
        subj = subjects[idx]
        assert len(np.unique(subj)) == len(subj), "a subject appeared twice in one draw"
        included[subj - 100] += 1
        picks[idx] += 1
    # Each subject's inclusion count is Binomial(draws, q): mean 400, sd sqrt(draws q (1-q)) = 19. A 5 sd band per
    # subject fails by chance with probability < 60 * 6e-7 (and the seed is fixed).
    sd = math.sqrt(draws * q * (1 - q))
    assert np.all(np.abs(included - draws * q) < 5 * sd), included
    # Within a subject the example is uniform: example count ~ Binomial(included_s, 1 / n_s), same 5 sd band.
    n_of = per_subject[np.searchsorted(np.arange(100, 100 + n_subj), subjects)]
    expect = included[subjects - 100] / n_of
    assert np.all(np.abs(picks - expect) < 5 * np.sqrt(expect * (1 - 1 / n_of)) + 1e-9)


def test_sampler_allows_empty_draws_and_defaults_to_unpredictable_rng() -> None:
    subjects = np.arange(5)
    sampler = PoissonSubjectSampler(subjects, 1e-6, rng=secure_rng(seed=0))
    empty = sampler.sample()
    assert empty.shape == (0,) and empty.dtype == np.int64
    # Two unseeded samplers agree on 200 independent q=0.5 coin flips with probability 2**-200.
    a, b = PoissonSubjectSampler(np.arange(200), 0.5), PoissonSubjectSampler(np.arange(200), 0.5)
    assert not np.array_equal(a.sample(), b.sample())
    with pytest.raises(ValueError):
        PoissonSubjectSampler(subjects, 0.0)


def test_secure_generator_is_random_unless_seeded() -> None:
    draw = lambda g: torch.randn(8, generator=g)  # noqa: E731
    assert torch.equal(draw(secure_generator(3)), draw(secure_generator(3)))
    assert not torch.equal(draw(secure_generator(None)), draw(secure_generator(None)))


# ----------------------------------------------------------------------------------------------- DP-SGD


@pytest.fixture
def small_d() -> torch.nn.Module:
    return build_discriminator(NetConfig(ndf=8), 4, 1, seed=0)


def _batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 5, size, size, generator=torch.Generator().manual_seed(seed))


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))


def test_vmap_per_sample_grads_match_a_loop_over_examples(small_d: torch.nn.Module) -> None:
    """The default PatchGAN (InstanceNorm without running stats, in-place LeakyReLU) works under vmap."""
    x = _batch(4)
    per = per_sample_gradients(small_d, gan_real_loss(), (x,))
    for i in range(len(x)):
        small_d.zero_grad()
        gan_loss(small_d(x[i : i + 1]), True, "vanilla").backward()
        for name, p in small_d.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(per[name][i], p.grad, rtol=1e-4, atol=1e-6)


def test_clip_bound_holds_for_every_sample(small_d: torch.nn.Module) -> None:
    x = _batch(6)
    norms = [_norm(per_sample_gradients(small_d, gan_real_loss(), (x[i : i + 1],))) for i in range(6)]
    clip = float(np.median(norms))  # about half the samples get clipped
    gen = secure_generator(0)
    singles = [dp_sgd_gradients(small_d, gan_real_loss(), (x[i : i + 1],), clip, 0.0, 1.0, gen) for i in range(6)]
    for raw, one in zip(norms, singles, strict=True):
        assert _norm(one) <= clip + 1e-6
        assert _norm(one) == pytest.approx(min(raw, clip), rel=1e-4)
    # The batch result is the sum of the per-sample clipped gradients: clipping is per sample, not per batch.
    batch = dp_sgd_gradients(small_d, gan_real_loss(), (x,), clip, 0.0, 1.0, gen)
    for name, g in batch.items():
        torch.testing.assert_close(g, sum(s[name] for s in singles), rtol=1e-4, atol=1e-7)


def test_no_noise_and_huge_clip_gives_the_ordinary_gradient(small_d: torch.nn.Module) -> None:
    x, expected_batch = _batch(5), 8.0
    dp = dp_sgd_gradients(small_d, gan_real_loss(), (x,), 1e9, 0.0, expected_batch, secure_generator(0))
    small_d.zero_grad()
    # Summed per-sample loss = B * batch mean (InstanceNorm is per sample), divided by the expected batch size.
    (gan_loss(small_d(x), True, "vanilla") * len(x) / expected_batch).backward()
    for name, p in small_d.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(dp[name], p.grad, rtol=1e-4, atol=1e-7)


def _assert_gaussian(values: torch.Tensor, std: float) -> None:
    """``values`` are i.i.d. N(0, std^2). With N coordinates, S = sum (v/std)^2 ~ chi^2(N), mean N, sd sqrt(2N);
    N is ~25,000 here, so the normal approximation is accurate and |S - N| < 5 sqrt(2N) (a relative error of the
    std below ~2.2%) fails by chance with probability ~6e-7. The mean is checked within 5 standard errors."""
    z = (values.double() / std).flatten()
    n = z.numel()
    assert n > 10_000
    assert abs(float(z.pow(2).sum()) - n) < 5 * math.sqrt(2 * n)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)


def test_noise_std_is_sigma_clip_over_expected_batch(small_d: torch.nn.Module) -> None:
    x, clip, sigma, eb = _batch(4), 0.5, 2.0, 4.0
    clean = dp_sgd_gradients(small_d, gan_real_loss(), (x,), clip, 0.0, eb, secure_generator(0))
    noisy = dp_sgd_gradients(small_d, gan_real_loss(), (x,), clip, sigma, eb, secure_generator(7))
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    _assert_gaussian(noise, sigma * clip / eb)
    again = dp_sgd_gradients(small_d, gan_real_loss(), (x,), clip, sigma, eb, secure_generator(7))
    assert all(torch.equal(again[n], noisy[n]) for n in noisy), "same generator seed -> same noise"


def test_empty_batch_gives_pure_noise(small_d: torch.nn.Module) -> None:
    empty = _batch(0)
    zero = dp_sgd_gradients(small_d, gan_real_loss(), (empty,), 1.0, 0.0, 3.0, secure_generator(0))
    assert set(zero) == {n for n, _ in small_d.named_parameters()}
    assert all(not g.any() for g in zero.values())
    noise = dp_sgd_gradients(small_d, gan_real_loss(), (empty,), 1.0, 1.5, 3.0, secure_generator(1))
    assert all(noise[n].shape == p.shape for n, p in small_d.named_parameters())
    _assert_gaussian(torch.cat([g.flatten() for g in noise.values()]), 1.5 / 3.0)


def test_accumulate_adds_to_existing_grads(small_d: torch.nn.Module) -> None:
    x = _batch(2)
    dp = dp_sgd_gradients(small_d, gan_real_loss(), (x,), 1.0, 1.0, 2.0, secure_generator(0))
    small_d.zero_grad(set_to_none=True)
    accumulate_grads(small_d, dp)
    gan_loss(small_d(x), False, "vanilla").backward()  # the unclipped term on fakes accumulates on top
    fake_only = {
        n: torch.autograd.grad(gan_loss(small_d(x), False, "vanilla"), p)[0] for n, p in small_d.named_parameters()
    }
    for name, p in small_d.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, dp[name] + fake_only[name])


def test_clip_per_sample_rows() -> None:
    t = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]).reshape(3, 1, 2)
    out = clip_per_sample(t, 1.0)
    norms = out.reshape(3, -1).norm(dim=1)
    assert torch.all(norms <= 1.0 + 1e-6)
    torch.testing.assert_close(out[0], t[0] / 5.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:], t[1:])


def test_layers_that_keep_input_statistics_are_refused() -> None:
    with pytest.raises(ValueError, match="not allowed under DP-SGD"):
        check_dp_compatible(build_discriminator(NetConfig(ndf=8, norm="batch"), 4, 1, seed=0))
    with pytest.raises(ValueError, match="not allowed under DP-SGD"):
        per_sample_gradients(
            torch.nn.InstanceNorm2d(3, track_running_stats=True), torch.sum, (torch.randn(2, 3, 4, 4),)
        )


# ----------------------------------------------------------------------------------------------- ledger


def test_ledger_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "privacy" / "ledger.json"
    with PrivacyLedger.open(path, "site-a", 3.0, DELTA) as ledger:
        assert ledger.spent() == 0.0 and path.exists()
        for _ in range(3):
            eps = ledger.charge(Q, 1.0)
        ledger.charge(0.01, 1.5)
    assert eps == pytest.approx(epsilon([(Q, 1.0, 3)], DELTA))
    with PrivacyLedger.open(path, "site-a", 3.0, DELTA) as again:
        assert again.segments == [(Q, 1.0, 3), (0.01, 1.5, 1)] and again.steps == 4
        assert again.spent() == pytest.approx(epsilon([(Q, 1.0, 3), (0.01, 1.5, 1)], DELTA))
        assert not again.would_exceed(Q, 1.0)
    doc = json.loads(path.read_text())
    assert doc["site_id"] == "site-a" and doc["segments"] == [[Q, 1.0, 3], [0.01, 1.5, 1]]
    assert sorted(os.listdir(path.parent)) == [".ledger.json.lock", "ledger.json"], "no temp files left"


def test_ledger_refuses_other_site_corrupt_file_and_second_opener(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    with PrivacyLedger.open(path, "site-a", 3.0, DELTA), pytest.raises(FailedPrecondition, match="already open"):
        PrivacyLedger.open(path, "site-a", 3.0, DELTA)
    with pytest.raises(ValueError, match="belongs to site 'site-a', not 'site-b'"):
        PrivacyLedger.open(path, "site-b", 3.0, DELTA)
    path.write_text('{"version": 1, "site_id": "site-a", "segm')
    with pytest.raises(ValueError, match="refusing to start over"):
        PrivacyLedger.open(path, "site-a", 3.0, DELTA)
    path.write_text(json.dumps({"version": 1, "site_id": "site-a", "segments": [[Q, 1.0, -1]]}))
    with pytest.raises(ValueError, match="bad segment"):
        PrivacyLedger.open(path, "site-a", 3.0, DELTA)


def test_budget_exhaustion_raises_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    q, sigma, budget = 0.1, 2.0, 1.0  # 11 steps
    with PrivacyLedger.open(path, "s", budget, DELTA) as ledger:
        allowed = ledger.remaining_steps(q, sigma)
        assert 0 < allowed < 100
        for _ in range(allowed):
            ledger.charge(q, sigma)
        assert ledger.remaining_steps(q, sigma) == 0 and ledger.would_exceed(q, sigma)
        before = path.read_bytes()
        with pytest.raises(BudgetExhausted, match=r"epsilon spent .* of 1 ") as info:
            ledger.charge(q, sigma)
        assert str(info.value).startswith(BUDGET_EXHAUSTED_PREFIX)
        assert path.read_bytes() == before and ledger.steps == allowed and ledger.spent() <= budget


def test_budget_change_on_restart_keeps_spent_steps(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    with PrivacyLedger.open(path, "s", 1.0, DELTA) as ledger:
        for _ in range(5):
            ledger.charge(Q, 1.0)
    with PrivacyLedger.open(path, "s", 4.0, 1e-6) as ledger:
        assert ledger.steps == 5 and ledger.epsilon_budget == 4.0
        assert ledger.spent() == pytest.approx(epsilon([(Q, 1.0, 5)], 1e-6))
    doc = json.loads(path.read_text())
    assert doc["epsilon_budget"] == 4.0 and doc["delta"] == 1e-6


_CHILD = textwrap.dedent(
    """
    import sys, time
    from asyndgan.privacy import PrivacyLedger
    ledger = PrivacyLedger.open(sys.argv[1], "site-k", 100.0, 1e-5)
    loop = sys.argv[2] == "loop"
    while True:
        ledger.charge(8 / 2000, 1.0)
        print(f"charged {ledger.steps}", flush=True)
        if not loop:
            time.sleep(600)
    """
)


def _spawn(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill(proc: subprocess.Popen[str]) -> list[str]:
    proc.send_signal(signal.SIGKILL)
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out.splitlines()


def test_sigkill_after_charge_leaves_the_charge_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    proc = _spawn(path, "once")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "charged 1", proc.stderr.read() if proc.stderr else ""
    finally:
        _kill(proc)
    with PrivacyLedger.open(path, "site-k", 100.0, 1e-5) as ledger:
        assert ledger.steps == 1 and ledger.spent() > 0


def test_sigkill_at_random_moments_never_undercounts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    chooser = random.Random(1234)
    for _ in range(3):
        proc = _spawn(path, "loop")
        assert proc.stdout is not None
        try:
            lines = [proc.stdout.readline() for _ in range(chooser.randint(1, 30))]
            assert all(ln.startswith("charged") for ln in lines), proc.stderr.read() if proc.stderr else ""
            time.sleep(chooser.uniform(0.0, 0.01))  # land anywhere in a charge: mid-write, mid-fsync, ...
        finally:
            lines += _kill(proc)  # lines still in the pipe were reported before the kill too
        reported = max(int(ln.split()[1]) for ln in lines if ln.startswith("charged"))
        with PrivacyLedger.open(path, "site-k", 100.0, 1e-5) as ledger:  # loads fine (removes stale temp files)
            # The child prints after charge() returned: the file holds every reported charge, plus at most the one
            # that was written but not yet reported when the signal landed.
            assert reported <= ledger.steps <= reported + 1
