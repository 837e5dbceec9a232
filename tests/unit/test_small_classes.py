from __future__ import annotations

import numpy as np
import pytest

from asyndgan.experiments.segmentation import SMALL_CLASS_SHARE, class_shares, condition_entry, main_classes


def test_a_tiny_class_is_reported_apart_and_left_out_of_the_mean() -> None:
    labels = np.zeros((1, 100, 100), np.uint8)
    labels[0, :50] = 1  # 5000 px
    labels[0, 50:, :49] = 2  # 2450 px
    labels[0, 50:, 49:] = 3  # 2550 px
    labels[0, 99, 99] = 4  # 1 px: far under the small share
    shares = class_shares(labels, 5)
    assert shares[3] < SMALL_CLASS_SHARE <= min(shares[:3]) and sum(shares) == pytest.approx(1.0)
    main = main_classes(shares)
    assert main == [0, 1, 2]
    per_seed = [[0.9, 0.8, 0.7, 0.0], [0.8, 0.8, 0.8, 0.0]]
    entry = condition_entry("x", 10, per_seed, [0, 1], None, main)
    assert entry["mean"] == pytest.approx(0.8)  # the tiny class's 0.0 does not drag the mean down
    assert entry["small_classes"] == {"4": 0.0}
    assert entry["per_class_mean"][3] == 0.0  # still in the per-class table
    assert condition_entry("x", 10, per_seed, [0, 1], None)["mean"] == pytest.approx(0.6)  # default: every class


def test_all_small_counts_all() -> None:
    assert main_classes([0.001, 0.001]) == [0, 1]
