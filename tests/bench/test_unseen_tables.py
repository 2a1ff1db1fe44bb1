"""bench.unseen_tables: the peers beside the default job on sets outside the suite."""

from __future__ import annotations

import numpy as np
import pytest

from bench.unseen_tables import SETS, _load, parse_args, peers


def test_the_peers_score_the_split_they_are_given() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] > 0).astype(np.int64)  # one column decides the class
    scores = peers(x[:80], y[:80], x[80:], y[80:], regression=False)
    assert scores["logistic"] >= 0.95 and 0.8 <= scores["hgb"] <= 1.0
    shuffled = peers(x[:80], rng.permutation(y[:80]), x[80:], y[80:], regression=False)
    assert shuffled["logistic"] < scores["logistic"]


def test_regression_peers_are_rmse_over_every_target() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 3))
    y = np.stack([2.0 * x[:, 0], -x[:, 1]], axis=1)
    exact = peers(x[:70], y[:70], x[70:], y[70:], regression=True)
    assert exact["ridge_rmse"] == pytest.approx(0.0, abs=0.05)
    noisy = peers(x[:70], y[:70] + rng.normal(size=(70, 2)), x[70:], y[70:], regression=True)
    assert noisy["ridge_rmse"] > exact["ridge_rmse"] and noisy["hgb_rmse"] > 0


def test_the_sets_load_as_documented() -> None:
    shapes = {name: tuple(part.shape for part in _load(name)) for name in SETS}
    assert shapes == {
        "wine": ((178, 13), (178,)),
        "iris": ((150, 4), (150,)),
        "linnerud": ((20, 3), (20, 3)),
    }


def test_no_set_named_means_every_set() -> None:
    assert parse_args([]).sets == list(SETS)
    assert parse_args(["iris", "--seed", "2"]).sets == ["iris"]
    with pytest.raises(SystemExit):
        parse_args(["mnist"])
