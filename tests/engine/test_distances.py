"""Dataset distances: values behave like distances, gradients reach the features, fast == reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orca_engine.distances import (
    SourceData,
    create_distance,
    kmeans_labels,
    otdd_reference,
    pool_tokens,
)
from orca_engine.errors import SpecError

DISTANCES = ("otdd", "otdd_gaussian", "ot", "mmd", "l2", "cosine")


def clustered(n: int, *, shift: float = 0.0, classes: int = 3, dim: int = 8, seed: int = 0):
    """Gaussian clusters with fixed centres; ``shift`` moves every point."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3.0
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % classes
    return centres[labels] + noise + shift, labels


@pytest.fixture(scope="module")
def source() -> SourceData:
    features, labels = clustered(150, seed=1)
    return SourceData(features, labels, "synthetic")


@pytest.mark.parametrize("name", DISTANCES)
def test_gradient_reaches_features_and_self_distance_is_zero(name: str, source: SourceData) -> None:
    distance = create_distance(name, source)
    self_distance = float(distance(source.features, source.labels))
    features, labels = clustered(90, shift=0.7, seed=2)
    features.requires_grad_(True)
    value = distance(features, labels)
    value.backward()
    assert value.item() > 1e-4
    # ~0 relative to the distance of a shifted dataset (Sinkhorn stops at a tolerance).
    assert abs(self_distance) < 1e-3 * value.item()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert float(features.grad.abs().sum()) > 0


def test_otdd_grows_when_labels_are_permuted(source: SourceData) -> None:
    distance = create_distance("otdd", source)
    permuted = source.labels[
        torch.randperm(len(source.labels), generator=torch.Generator().manual_seed(0))
    ]
    assert float(distance(source.features, permuted)) > 10 * (
        1e-3 + float(distance(source.features, source.labels))
    )


def test_gaussian_otdd_ranks_shifts_like_exact_otdd(source: SourceData) -> None:
    exact = create_distance("otdd", source)
    gaussian = create_distance("otdd_gaussian", source, warm_start=False)
    shifts = [0.0, 0.5, 1.5, 3.0]
    exact_values = [float(exact(*clustered(90, shift=s, seed=3))) for s in shifts]
    gaussian_values = [float(gaussian(*clustered(90, shift=s, seed=3))) for s in shifts]
    assert exact_values == sorted(exact_values)
    assert gaussian_values == sorted(gaussian_values)


def test_fast_otdd_matches_reference_value_and_gradient(source: SourceData) -> None:
    features, labels = clustered(80, shift=0.4, seed=4)
    fast_input = features.clone().requires_grad_(True)
    ref_input = features.clone().requires_grad_(True)
    fast = create_distance("otdd", source, tol=1e-5)(fast_input, labels)
    ref = otdd_reference(ref_input, labels, source.features, source.labels, tol=1e-5)
    fast.backward()
    ref.backward()
    assert fast.item() == pytest.approx(ref.item(), rel=0.01)
    assert fast_input.grad is not None and ref_input.grad is not None
    cosine = torch.nn.functional.cosine_similarity(
        fast_input.grad.flatten(), ref_input.grad.flatten(), dim=0
    )
    assert float(cosine) > 0.99


def test_warm_start_gives_the_cold_start_value(source: SourceData) -> None:
    warm = create_distance("otdd", source, tol=1e-5)
    cold = create_distance("otdd", source, tol=1e-5, warm_start=False)
    first, labels = clustered(80, shift=0.4, seed=5)
    warm(first, labels)
    moved = first * 1.02 + 0.05
    assert float(warm(moved, labels)) == pytest.approx(float(cold(moved, labels)), rel=1e-3)
    assert warm.warm_state()


def test_mmd_bandwidth_is_fixed_at_construction(source: SourceData) -> None:
    distance = create_distance("mmd", source)
    bandwidth = distance.bandwidth  # type: ignore[attr-defined]
    distance(*clustered(50, shift=5.0))
    assert distance.bandwidth == bandwidth  # type: ignore[attr-defined]


def test_kmeans_labels_are_seeded() -> None:
    data = np.random.default_rng(0).normal(size=(120, 5))
    first = kmeans_labels(data, 4, seed=7)
    assert first.dtype == np.int64 and set(first) == {0, 1, 2, 3}
    assert np.array_equal(first, kmeans_labels(data, 4, seed=7))


def test_pool_tokens_and_unknown_distance(source: SourceData) -> None:
    assert pool_tokens(torch.ones(2, 5, 3)).shape == (2, 3)
    with pytest.raises(SpecError):
        create_distance("wasserstein-9", source)
