"""The quality suite's dataset builders, its Burgers solver and its run plan (no training here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import datasets as ds
from bench.quality import Cell, Planner, performance_profile


def test_ucr_sets_keep_their_own_splits_with_class_ids() -> None:
    x_train, y_train, x_test, y_test = ds.build_arrays("GunPoint")
    assert x_train.shape == (50, 1, 150) and x_test.shape == (150, 1, 150)
    assert x_train.dtype == np.float32
    assert set(np.unique(y_train)) == set(np.unique(y_test)) == {0, 1}


def test_basic_motions_is_multivariate() -> None:
    x_train, y_train, x_test, _ = ds.build_arrays("BasicMotions")
    assert x_train.shape == (40, 6, 100) and x_test.shape == (40, 6, 100)
    assert len(np.unique(y_train)) == 4


def test_japanese_vowels_is_nan_padded_at_the_end_and_the_engine_reads_it(tmp_path: Path) -> None:
    from orca_engine.data import load_dataset

    x_train, _, x_test, _ = ds.build_arrays("JapaneseVowels")
    assert x_train.shape[1:] == x_test.shape[1:] == (12, 29)
    missing = np.isnan(np.concatenate([x_train, x_test]))
    assert missing.any(), "unequal lengths must show as padding"
    # Padding only at the end: once a series is NaN it stays NaN, and every series has data.
    assert not np.any(missing[..., :-1] & ~missing[..., 1:])
    assert not missing[..., 0].any()
    loaded = load_dataset(ds.dataset_path("JapaneseVowels", tmp_path))
    assert loaded.info.task_type == "classification"
    assert np.isfinite(loaded.x_train).all()


def test_sklearn_sets_are_stratified_70_30_splits() -> None:
    x_train, y_train, x_test, y_test = ds.build_arrays("digits")
    assert x_train.shape[1:] == (1, 8, 8)
    total = len(x_train) + len(x_test)
    assert total == 1797 and abs(len(x_test) / total - 0.3) < 0.01
    # Stratified: each class's share of test is within a sample of its share of train.
    for label in range(10):
        share = np.mean(y_test == label) - np.mean(y_train == label)
        assert abs(share) < 2 / len(y_test)
    xc_train, yc_train, xc_test, _ = ds.build_arrays("breast_cancer")
    assert len(xc_train) + len(xc_test) == 569
    assert xc_train.shape[1:] == (30,) and yc_train.dtype == np.int64
    xr_train, yr_train, _, yr_test = ds.build_arrays("diabetes")
    assert xr_train.shape[1:] == (10,) and yr_train.dtype == np.float32
    assert ds.DATASETS["diabetes"].task_type == "regression"
    assert len(yr_train) + len(yr_test) == 442


@pytest.mark.parametrize("name", ["digits", "ArrowHead-10shot"])
def test_builders_are_deterministic(name: str) -> None:
    first, second = ds.build_arrays(name), ds.build_arrays(name)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_burgers_initial_conditions_are_seeded() -> None:
    first = ds.burgers_initial_conditions(4, 64, seed=0)
    np.testing.assert_array_equal(first, ds.burgers_initial_conditions(4, 64, seed=0))
    assert not np.allclose(first, ds.burgers_initial_conditions(4, 64, seed=1))
    np.testing.assert_allclose(np.abs(first).max(axis=1), 1.0)


def test_every_classification_set_has_a_few_shot_variant_with_at_most_ten_per_class() -> None:
    base = [m.name for m in ds.DATASETS.values() if m.task_type == "classification"]
    few = [n for n in base if n.endswith(ds.FEW_SHOT_SUFFIX)]
    assert len(few) == 7
    for name in ("GunPoint-10shot", "digits-10shot", "breast_cancer-10shot"):
        x_train, y_train, x_test, y_test = ds.build_arrays(name)
        full = ds.build_arrays(name.removesuffix(ds.FEW_SHOT_SUFFIX))
        counts = np.bincount(y_train)
        assert counts.max() <= 10 and (counts > 0).all(), "every class kept, at most 10 each"
        assert len(x_train) == len(y_train) == counts.sum()
        np.testing.assert_array_equal(x_test, full[2])  # the test split is the full one
        np.testing.assert_array_equal(y_test, full[3])


def test_few_shot_indices_depend_on_the_seed() -> None:
    labels = np.repeat(np.arange(3), 50)
    a = ds.few_shot_indices(labels, 10, seed=0)
    assert len(a) == 30
    np.testing.assert_array_equal(a, ds.few_shot_indices(labels, 10, seed=0))
    assert not np.array_equal(a, ds.few_shot_indices(labels, 10, seed=1))


def test_burgers_solver_matches_the_cole_hopf_solution() -> None:
    # u = -2 nu phi_x / phi with phi = a + b exp(-nu t) cos x solving the heat equation.
    nu, a, b, points = 0.1, 2.0, 1.0, 128
    x = np.linspace(0, 2 * np.pi, points, endpoint=False)

    def exact(t: float) -> np.ndarray:
        decay = b * np.exp(-nu * t)
        return np.asarray(2 * nu * decay * np.sin(x) / (a + decay * np.cos(x)))

    solved = ds.burgers_solve(exact(0.0), viscosity=nu, t_end=1.0)[0]
    assert np.max(np.abs(solved - exact(1.0))) < 1e-7 * np.max(np.abs(exact(1.0)))


def test_burgers_conserves_the_mean_and_dissipates_energy() -> None:
    u0 = ds.burgers_initial_conditions(8, 256, seed=3)
    u0 = u0 + 0.3  # a non-zero mean must be carried along unchanged
    u_end = ds.burgers_solve(u0)
    np.testing.assert_allclose(u_end.mean(axis=1), u0.mean(axis=1), atol=1e-10)
    energy_0 = np.sum((u0 - u0.mean(axis=1, keepdims=True)) ** 2, axis=1)
    energy_t = np.sum((u_end - u_end.mean(axis=1, keepdims=True)) ** 2, axis=1)
    assert np.all(energy_t < energy_0)
    assert np.isfinite(u_end).all()


def test_burgers_dataset_maps_fields_to_fields() -> None:
    x_train, y_train, x_test, y_test = ds.build_arrays("burgers")
    assert x_train.shape == y_train.shape == (280, 1, ds.BURGERS_GRID)
    assert x_test.shape == y_test.shape == (120, 1, ds.BURGERS_GRID)
    # The map is far from the identity: predicting u0 for u(T) would be a poor model.
    change = np.linalg.norm(y_test - x_test, axis=-1) / np.linalg.norm(y_test, axis=-1)
    assert change.mean() > 0.2


def test_allen_cahn_solver_matches_the_uniform_solution() -> None:
    # A uniform field solves u' = u - u^3: u(t) = u0 e^t / sqrt(1 + u0^2 (e^{2t} - 1)).
    u0, t_end = 0.2, 1.5
    solved = ds.allen_cahn_solve(np.full((1, 32), u0), t_end=t_end)[0]
    grow = np.exp(t_end)
    exact = u0 * grow / np.sqrt(1 + u0**2 * (grow**2 - 1))
    np.testing.assert_allclose(solved, exact, rtol=1e-9)


def test_allen_cahn_solver_grows_small_modes_at_the_linear_rate() -> None:
    # A tiny mode cos(kx) follows the linearised equation: amplitude e^{(1 - D k^2) t}.
    points, eps, t_end = 128, 1e-7, 1.0
    x = np.linspace(0, 2 * np.pi, points, endpoint=False)
    for k in (1, 3, 6):  # 1 - 0.05 k^2: grows, shrinks slowly, shrinks fast
        solved = ds.allen_cahn_solve(eps * np.cos(k * x), diffusivity=0.05, t_end=t_end)[0]
        rate = 1 - 0.05 * k**2
        np.testing.assert_allclose(
            solved, eps * np.exp(rate * t_end) * np.cos(k * x), atol=1e-12 * eps
        )


def test_allen_cahn_dataset_separates_phases() -> None:
    x_train, y_train, x_test, y_test = ds.build_arrays("allen_cahn")
    assert x_train.shape == y_train.shape == (280, 1, ds.BURGERS_GRID)
    assert x_test.shape == y_test.shape == (120, 1, ds.BURGERS_GRID)
    assert np.abs(x_train).max() == pytest.approx(ds.ALLEN_CAHN_AMPLITUDE)
    # The field grows towards the stable phases +-1 but never past them (maximum principle),
    # and the map is far from the identity.
    assert np.abs(y_train).max() < 1.0
    assert np.abs(y_train).mean() > 1.5 * np.abs(x_train).mean()
    change = np.linalg.norm(y_test - x_test, axis=-1) / np.linalg.norm(y_test, axis=-1)
    assert change.mean() > 0.2


def test_darcy_solver_matches_the_exact_solution_for_one_jump() -> None:
    # a = a1 on [0, 1/2), a2 on [1/2, 1]: u' = (c - x) / a, continuous flux, u(0) = u(1) = 0.
    points, a1, a2 = 1024, 3.0, 12.0
    x = (np.arange(points) + 0.5) / points
    a = np.where(x < 0.5, a1, a2)
    c = (0.125 / a1 + 0.375 / a2) / (0.5 / a1 + 0.5 / a2)
    exact = np.where(
        x < 0.5,
        (c * x - x**2 / 2) / a1,
        (c * 0.5 - 0.125) / a1 + (c * (x - 0.5) - (x**2 - 0.25) / 2) / a2,
    )
    solved = ds.darcy_solve(a)[0]
    assert np.max(np.abs(solved - exact)) < 1e-9 * np.max(np.abs(exact))


def test_darcy_dataset_maps_two_valued_permeability_to_pressure() -> None:
    x_train, y_train, x_test, y_test = ds.build_arrays("darcy1d")
    assert x_train.shape == y_train.shape == (280, 1, ds.DARCY_GRID)
    assert x_test.shape == y_test.shape == (120, 1, ds.DARCY_GRID)
    assert set(np.unique(x_train)) == {ds.DARCY_LOW, ds.DARCY_HIGH}
    assert (y_train > 0).all()  # -(a u')' = 1 > 0 with zero ends: the pressure is positive
    np.testing.assert_array_equal(
        ds.darcy_coefficients(4, 64, seed=0), ds.darcy_coefficients(4, 64, seed=0)
    )


def test_dataset_files_are_cached(tmp_path: Path) -> None:
    path = ds.dataset_path("ItalyPowerDemand", tmp_path)
    stamp = path.stat().st_mtime_ns
    assert ds.dataset_path("ItalyPowerDemand", tmp_path).stat().st_mtime_ns == stamp
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"x_train", "y_train", "x_test", "y_test"}


def test_every_neural_method_gets_the_epochs_auto_resolves_for_orca(tmp_path: Path) -> None:
    planner = Planner(tmp_path, "cpu")
    epochs = planner.budget_epochs("GunPoint")
    orca = planner.task("GunPoint", "orca", 0)
    naive = planner.task("GunPoint", "naive-ft", 0)
    scratch = planner.task("GunPoint", "scratch", 0)
    assert orca is not None and naive is not None and scratch is not None
    assert orca.spec is not None and "epochs" not in orca.spec.get("finetune", {})
    assert naive.identity["resolved"]["finetune_epochs"] == epochs
    assert scratch.identity["resolved"]["finetune_epochs"] == epochs
    assert scratch.identity["resolved"]["backbone"] == "minilm-l6-scratch"
    assert len({orca.key, naive.key, scratch.key}) == 3
    assert planner.task("GunPoint", "hgb", 0) is None  # tabular peer, series dataset
    # Same seed, same everything: the same cache key (this is what makes reruns resume).
    again = Planner(tmp_path, "cpu").task("GunPoint", "naive-ft", 0)
    assert again is not None and again.key == naive.key


def test_performance_profile_counts_tasks_within_tau_of_the_best() -> None:
    cells = {
        ("GunPoint", "a"): Cell([0.9], [1.0], [], []),  # error 0.1: best
        ("GunPoint", "b"): Cell([0.8], [1.0], [], []),  # error 0.2: 2x the best
        ("ArrowHead", "a"): Cell([0.7], [1.0], [], []),  # error 0.3: 1.5x the best
        ("ArrowHead", "b"): Cell([0.8], [1.0], [], []),
    }
    taus, profile = performance_profile(
        cells, ["GunPoint", "ArrowHead"], ["a", "b"], {"GunPoint": 150, "ArrowHead": 175}
    )
    at = {tau: i for i, tau in enumerate(np.round(taus, 3))}
    assert profile["a"][at[1.0]] == 0.5 and profile["b"][at[1.0]] == 0.5
    assert profile["a"][at[1.49]] == 0.5 and profile["a"][at[1.51]] == 1.0
    assert profile["b"][at[1.99]] == 0.5 and profile["b"][at[2.01]] == 1.0


def test_long_gunpoint_is_the_same_curves_twenty_times_as_finely_sampled() -> None:
    long_train, y_long, long_test, y_long_test = ds.build_arrays("GunPoint-long")
    x_train, y_train, _, y_test = ds.build_arrays("GunPoint")
    assert long_train.shape == (len(x_train), 1, 150 * ds.LONG_FACTOR)
    assert long_test.shape[-1] == 150 * ds.LONG_FACTOR
    np.testing.assert_array_equal(y_long, y_train)
    np.testing.assert_array_equal(y_long_test, y_test)
    # the ends and every point in between lie on the original curve's straight segments
    np.testing.assert_allclose(long_train[..., 0], x_train[..., 0])
    np.testing.assert_allclose(long_train[..., -1], x_train[..., -1])
    assert long_train.min() >= x_train.min() - 1e-5 and long_train.max() <= x_train.max() + 1e-5


def test_the_alignment_ablation_changes_nothing_but_alignment(tmp_path: Path) -> None:
    planner = Planner(tmp_path, "cpu")
    orca = planner.task("GunPoint", "orca", 0)
    ablation = planner.task("GunPoint", "orca-noalign", 0)
    assert orca is not None and ablation is not None
    with_alignment, without = orca.identity["resolved"], ablation.identity["resolved"]
    changed = {key for key in with_alignment if with_alignment[key] != without.get(key)}
    # (the separation guard is part of alignment: without it there is nothing to guard)
    assert changed == {"distance", "align_epochs", "align_auto", "align_keep_separation"}
    assert without["distance"] == "none" and without["align_epochs"] == 0
