"""The quality harness: per-row test marks, the row-by-row tie rule, and the tables peer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench import datasets as ds
from bench import peers
from bench.quality import (
    Cell,
    _nn_child,
    _pairwise,
    _peer_claims,
    claims,
    collect,
    paired_error,
)


def _cell(marks: dict[int, str]) -> Cell:
    values = [m.count("1") / len(m) for m in marks.values()]
    return Cell(values=values, wall=[], after=[], before=[], marks=marks)


def test_marks_read_class_ids_or_scores_and_refuse_a_length_mismatch() -> None:
    truth = np.array([0, 1, 2, 1])
    assert peers.correct_marks(truth, np.array([0, 1, 1, 1])) == "1101"
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    assert peers.correct_marks(truth, scores) == "1110"
    with pytest.raises(ValueError, match="3 predictions for 4 test rows"):
        peers.correct_marks(truth, np.array([0, 1, 2]))


def test_two_models_that_disagree_on_few_rows_are_told_apart_only_when_paired() -> None:
    # ArrowHead's 175 test rows: both models right on 150 and wrong on 17 of the same rows;
    # they disagree on 8, of which the first model gets 6 right. A 2.3-point gap.
    rows = 175
    base = ["1"] * 150 + ["0"] * 17
    first = "".join(base + ["1"] * 6 + ["0"] * 2)
    second = "".join(base + ["0"] * 6 + ["1"] * 2)
    paired = {
        ("ArrowHead", "a"): _cell({0: first}),
        ("ArrowHead", "b"): _cell({0: second}),
    }
    error = paired_error(paired["ArrowHead", "a"], paired["ArrowHead", "b"])
    assert error is not None and 0.015 < error < 0.017  # sqrt((8/175 - (4/175)^2) / 175)
    wins, ties, losses, notes = _pairwise(paired, ["ArrowHead"], "a", "b", {"ArrowHead": rows})
    assert (wins, ties, losses) == (1, 0, 0)
    assert notes == ["ArrowHead +0.023 (paired)"]

    # The same accuracies without per-row marks: the independent binomial error (~3.7 points)
    # swallows the gap.
    unpaired = {
        key: Cell(values=cell.values, wall=[], after=[], before=[]) for key, cell in paired.items()
    }
    assert _pairwise(unpaired, ["ArrowHead"], "a", "b", {"ArrowHead": rows})[:3] == (0, 1, 0)


def test_only_seeds_both_methods_marked_on_the_same_rows_are_paired() -> None:
    a = _cell({0: "1100", 1: "1111"})
    b = _cell({0: "1000", 2: "0000"})
    # seed 0 alone: d = [0, 1, 0, 0] -> mean 1/4, variance 1/4 - 1/16
    assert paired_error(a, b) == pytest.approx(np.sqrt((0.25 - 0.0625) / 4))
    assert paired_error(a, _cell({1: "11"})) is None  # another test split's length


def test_collect_keeps_each_seeds_marks() -> None:
    results = [
        {"dataset": "GunPoint", "method": "orca", "seed": s, "metric": "accuracy",
         "test": {"accuracy": 0.5}, "wall_s": 1.0, "test_correct": m}
        for s, m in ((0, "10"), (1, "01"))
    ] + [
        {"dataset": "GunPoint", "method": "1nn", "seed": 0, "metric": "accuracy",
         "test": {"accuracy": 1.0}, "wall_s": 0.0}
    ]  # fmt: skip
    cells = collect(results)
    assert cells["GunPoint", "orca"].marks == {0: "10", 1: "01"}
    assert cells["GunPoint", "1nn"].marks == {}


def test_a_peer_run_keeps_marks_that_reproduce_its_accuracy(tmp_path: Path) -> None:
    arrays = ds.load_arrays("GunPoint", tmp_path)
    body = peers.run_peer("1nn", arrays, ds.DATASETS["GunPoint"], seed=0, epochs=1)
    marks = body["test_correct"]
    assert len(marks) == len(arrays[3]) == 150
    assert marks.count("1") / len(marks) == pytest.approx(body["test"]["accuracy"])
    assert "0" in marks  # 1-NN is not perfect on GunPoint, so a wrong mark would show


def test_a_neural_run_keeps_the_bundles_marks_on_test(tmp_path: Path) -> None:
    request = {
        "spec": {
            "dataset_id": "GunPoint",
            "backbone": "tiny-bert",
            "alignment": {"distance": "none"},
            "finetune": {"epochs": 2, "lr": 1e-3},
            "seed": 3,
        },
        "dataset_path": str(ds.dataset_path("GunPoint", tmp_path)),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "proxy_cache_dir": str(tmp_path / "proxies"),
        "resolved_overrides": {"token_budget": 16, "ensemble_members": 1},
    }
    body = _nn_child(request)
    marks = body["test_correct"]
    assert len(marks) == 150 and set(marks) <= {"0", "1"}
    assert marks.count("1") / 150 == pytest.approx(body["test"]["accuracy"])


def test_gradient_boosting_splits_a_twenty_row_table() -> None:
    assert peers.hgb_min_leaf(398) == 20 and peers.hgb_min_leaf(20) == 2
    arrays = ds.build_arrays("breast_cancer-10shot")
    body = peers.run_peer("hgb", arrays, ds.DATASETS["breast_cancer-10shot"], seed=0, epochs=1)
    marks = body["test_correct"]
    # At scikit-learn's default leaf size it predicted one class for every row (0.374).
    assert 0 < marks.count("1") < len(marks)
    assert body["test"]["accuracy"] > 0.6


def test_the_default_is_checked_against_its_simple_baseline_and_its_strong_peer() -> None:
    def cell(value: float) -> Cell:
        return Cell(values=[value], wall=[], after=[], before=[])

    cells = {
        ("GunPoint", "orca"): cell(0.95),
        ("GunPoint", "minirocket"): cell(0.99),  # 4 points ahead: more than 3 behind
        ("GunPoint", "1nn"): cell(0.91),
        ("breast_cancer", "orca"): cell(0.96),
        ("breast_cancer", "hgb"): cell(0.94),
        ("breast_cancer", "linear"): cell(0.96),
        ("diabetes", "orca"): cell(56.0),
        ("diabetes", "hgb"): cell(58.6),
        ("diabetes", "linear"): cell(57.1),
    }
    sizes = {"GunPoint": 150, "breast_cancer": 171, "diabetes": 133}
    simple, strong = _peer_claims(cells, ["GunPoint", "breast_cancer", "diabetes"], sizes)
    # GunPoint +4 over 1-NN is past one binomial error (~2.8 points); diabetes is ahead.
    assert "wins 2, ties 1, loses 0 of 3" in simple
    assert "GunPoint: 1nn 0.910 vs orca 0.950" in simple
    assert "wins 1, ties 1, loses 1 of 3" in strong  # GunPoint 4 points is two errors
    assert (
        "within 3 points of it on 1 of 2 accuracy datasets (more than 3 behind: GunPoint -0.040)"
        in strong
    )


def test_a_claim_made_from_one_seed_says_so() -> None:
    def cell(*values: float) -> Cell:
        return Cell(values=list(values), wall=[], after=[], before=[])

    one = {("diabetes", "orca"): cell(56.0), ("diabetes", "naive-ft"): cell(56.4)}
    line = claims(one, ["diabetes"], [], {"diabetes": 133}).splitlines()[1]
    assert "holds here at one seed" in line and "no noise estimate" in line
    three = {
        ("diabetes", "orca"): cell(56.0, 56.1, 55.9),
        ("diabetes", "naive-ft"): cell(57, 57.2, 56.9),
    }
    line = claims(three, ["diabetes"], [], {"diabetes": 133}).splitlines()[1]
    assert "holds here:" in line and "one seed" not in line


def test_marks_that_cannot_be_made_cost_only_the_marks(tmp_path: Path) -> None:
    from bench.quality import _bundle_marks

    data = str(ds.dataset_path("GunPoint", tmp_path))
    assert _bundle_marks(tmp_path / "no-such-bundle", data, 0.9) is None
