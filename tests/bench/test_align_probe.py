"""bench.align_probe's class-separation measure and the harness's alignment-scope methods."""

from __future__ import annotations

import numpy as np
import pytest

from bench.align_probe import class_separation
from bench.quality import ALIGNED_METHODS, NN_METHODS


def test_separated_classes_score_high_and_mixed_ones_low() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    apart = centres[labels] + rng.normal(size=(120, 2))
    mixed = rng.normal(size=(120, 2))
    far = class_separation(apart, labels)
    near = class_separation(mixed, labels)
    assert far["nn1"] == 1.0 and far["scatter_ratio"] > 10
    assert near["nn1"] < 0.6 and near["scatter_ratio"] < 0.1
    # scaling every feature changes neither: both measure the classes' layout, not its size
    assert class_separation(apart * 7.0, labels) == pytest.approx(far)


def test_the_papers_orca_and_the_old_default_align_without_the_guard() -> None:
    for method in (*ALIGNED_METHODS, "orca-unguarded"):
        assert NN_METHODS[method]["alignment"]["keep_separation"] is False
    assert NN_METHODS["orca-output"]["alignment"] == {"scope": "output"}
    assert "alignment" not in NN_METHODS["orca"]  # the default: everything auto
