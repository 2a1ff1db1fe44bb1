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


def test_the_guards_scatter_is_differentiable() -> None:
    import torch

    from orca_engine.align import class_scatter, separation_ratio

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    features = torch.randn(60, 5, generator=generator, dtype=torch.float64) + labels[:, None]
    features.requires_grad_(True)
    between, within = class_scatter(features, labels)
    ratio = between / within
    assert float(ratio.detach()) == pytest.approx(separation_ratio(features, labels), rel=1e-12)
    ratio.backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0


def _merging_run(hold: float) -> list[float]:
    """Ratios over 40 Adam steps of a linear embedder pulled by a distance that draws every row
    to one point (it merges the classes), alignment's gradient path with ``--hold-separation``."""
    import torch
    from torch import nn

    import orca_engine.align as align
    from bench.align_probe import _held_apart

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)  # (B, T, d) tokens; alignment mean-pools them

    torch.manual_seed(0)
    model = Linear()
    labels = torch.arange(40) % 2
    x = torch.randn(40, 3, 4) + 2.0 * labels[:, None, None]
    step = _held_apart(hold) if hold > 0 else align._distance_and_gradient
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    ratios = []
    for _ in range(40):
        optimizer.zero_grad()
        _, pooled = step(model, x, labels, lambda f, y: (f**2).sum(1).mean(), 16)
        ratios.append(align.separation_ratio(pooled, labels))
        optimizer.step()
    return ratios


def test_holding_separation_keeps_classes_apart_that_the_distance_alone_merges() -> None:
    free, held = _merging_run(0.0), _merging_run(1.0)
    assert free[0] == pytest.approx(held[0])  # same start
    assert free[-1] < 0.5 * free[0]  # the distance alone draws the classes together
    assert min(held[5:]) > 0.9 * held[0]  # the held objective pushes back near the start
