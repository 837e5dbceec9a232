"""The segmenter's stop rule (validation split, plateau, converged or not) and its random contrast."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from asyndgan.data import SiteData
from asyndgan.experiments.datasets import LoadedSetting
from asyndgan.experiments.evaluate import add_eval_flags, settings_from_args
from asyndgan.experiments.evaluation import _sized
from asyndgan.experiments.segmenter import SegConfig, random_contrast, split_validation, train_segmenter
from asyndgan.experiments.settings import default_settings
from tests.conftest import make_site

CFG = SegConfig(base=4, depth=2, steps=400, batch_size=4, val_every=10, patience=2, tol=0.01)


def test_validation_split_is_disjoint_and_covers_the_set() -> None:
    data = make_site("s", n=20, size=16)
    train, val = split_validation(data, 0.1)
    assert val is not None and len(train) + len(val) == 20 and len(val) == 2
    rows = {r.tobytes() for r in data.images}
    assert {r.tobytes() for r in train.images} | {r.tobytes() for r in val.images} == rows
    assert not {r.tobytes() for r in train.images} & {r.tobytes() for r in val.images}
    assert split_validation(make_site("t", n=3, size=16), 0.1)[1] is None  # too few to hold any back


def test_stops_once_validation_dice_is_flat(one_thread: None) -> None:
    data = make_site("s", n=24, size=16)
    _, fit = train_segmenter(data, [0], CFG, seed=0)
    assert fit.converged and fit.stopped_early and fit.steps < CFG.steps
    scores = [d for _, d in fit.curve]
    assert fit.best_val == max(scores)
    # the last `patience` checks gained less than tol over the level reached before them
    assert max(scores[-CFG.patience :]) <= max(scores[: -CFG.patience]) + CFG.tol
    assert [s for s, _ in fit.curve] == list(range(10, fit.steps + 1, 10))


def test_budget_out_before_the_plateau_is_not_converged(one_thread: None) -> None:
    data = make_site("s", n=24, size=16)
    _, fit = train_segmenter(data, [0], dataclasses.replace(CFG, steps=30, patience=50), seed=0)
    assert not fit.converged and not fit.stopped_early and fit.steps == 30 and len(fit.curve) == 3
    _, fixed = train_segmenter(data, [0], dataclasses.replace(CFG, steps=30, val_every=0), seed=0)
    assert fixed.steps == 30 and fixed.curve == [] and not fixed.converged and np.isnan(fixed.best_val)


@pytest.mark.parametrize(
    ("classes", "size", "images", "expected"),
    [(4, 64, 225, (8, 3, 1125)), (7, 96, 120, (16, 4, 600)), (4, 128, 2000, (8, 4, 3000))],
)
def test_segmenter_sized_from_the_task(classes: int, size: int, images: int, expected: tuple[int, int, int]) -> None:
    cfg = SegConfig.for_task(classes, size, images)
    assert (cfg.base, cfg.depth, cfg.steps) == expected
    cfg.validate()


def test_random_contrast_and_dropout_touch_only_their_channels() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (16, 2, 8, 8)).astype(np.float32))
    x[:, :, 0, 0] = -1.0  # background stays background
    out = random_contrast(x, [1], np.random.default_rng(1))
    assert torch.equal(out[:, 0], x[:, 0]) and not torch.equal(out[:, 1], x[:, 1])
    assert out.min() >= -1 and out.max() <= 1 and torch.all(out[:, 1, 0, 0] == -1)
    # drawn per sample: the mapping of the same pixel values differs between samples
    assert len({round(float(out[i, 1].mean() - x[i, 1].mean()), 4) for i in range(16)}) > 8
    assert torch.equal(random_contrast(x, [1], np.random.default_rng(1)), out)  # seeded
    assert random_contrast(x, [], np.random.default_rng(1)) is x
    dropped = random_contrast(x, [1], np.random.default_rng(2), dropout=0.5)
    zero = [bool(torch.all(dropped[i, 1] == 0)) for i in range(16)]
    assert 2 <= sum(zero) <= 14 and torch.equal(dropped[:, 0], x[:, 0])  # whole samples' channel 1 zeroed
    with pytest.raises(ValueError, match="intensity"):
        SegConfig(intensity=(-1,)).validate()
    with pytest.raises(ValueError, match="dropout"):
        SegConfig(intensity=(1,), dropout=1.0).validate()


def test_seg_contrast_flag_keeps_the_task_sizing_and_reaches_every_channel(one_thread: None) -> None:
    p = argparse.ArgumentParser()
    add_eval_flags(p)
    (easy,) = settings_from_args(p.parse_args(["--setting", "easy", "--seg-contrast"]))
    assert easy.seg.contrast and easy.seg.steps == default_settings()["easy"].seg.steps
    (custom,) = settings_from_args(p.parse_args(["--site", "embedded:icbm152?site=0&of=3", "--seg-contrast"]))
    assert custom.seg.contrast and custom.seg_from_task  # still sized from the task, contrast kept
    data = make_site("s", n=12, size=16)
    sized = _sized(custom, LoadedSetting([data], data, data.modalities, data.num_classes))
    assert sized.seg.contrast and sized.seg.steps == SegConfig.for_task(data.num_classes, 16, 12).steps
    two = SiteData("two", data.labels, np.concatenate([data.images, data.images], 1), ("a", "b"), data.num_classes)
    cfg = dataclasses.replace(CFG, steps=3, val_every=0)

    def weights(c: SegConfig) -> list[torch.Tensor]:
        return list(train_segmenter(two, [0, 1], c, seed=0)[0].state_dict().values())

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    plain = weights(cfg)
    assert same(plain, weights(cfg))  # seeded: only the contrast can make the difference below
    assert not same(plain, weights(dataclasses.replace(cfg, contrast=True)))
