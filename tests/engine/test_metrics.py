"""Task metrics against values computed by hand (orca_engine.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orca_engine.metrics import METRICS_FOR_TASK, compute_metrics, default_metric, higher_is_better


def _logits_for(predicted: list[int], n_classes: int) -> np.ndarray:
    logits = np.zeros((len(predicted), n_classes))
    logits[np.arange(len(predicted)), predicted] = 3.0
    return logits


def test_multiclass_accuracy_and_macro_f1() -> None:
    y_true = np.array([0, 1, 1, 2])
    result = compute_metrics("classification", y_true, _logits_for([0, 1, 2, 2], 3))
    assert result["accuracy"] == pytest.approx(0.75)
    # per-class F1: 1, 2/3 (P=1, R=1/2), 2/3 (P=1/2, R=1)
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert 0 <= result["auroc"] <= 1


def test_binary_auroc_uses_positive_class_scores() -> None:
    y_true = np.array([0, 0, 1, 1])
    positive_score = np.array([0.1, 0.4, 0.35, 0.8])
    logits = np.stack([np.zeros(4), positive_score], axis=1)
    result = compute_metrics("classification", y_true, logits)
    # 3 of the 4 (positive, negative) pairs are ranked correctly
    assert result["auroc"] == pytest.approx(0.75)
    assert result["accuracy"] == pytest.approx(0.5)  # every logit > 0 -> all predicted positive


def test_auroc_is_left_out_when_undefined() -> None:
    result = compute_metrics("classification", np.array([1, 1, 1]), _logits_for([1, 0, 1], 2))
    assert "auroc" not in result
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert set(compute_metrics("classification", np.array([0, 1]), np.array([0, 1]))) == {
        "accuracy",
        "macro_f1",
    }


def test_multilabel_map_auroc_and_thresholded_accuracy() -> None:
    y_true = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    logits = np.array([[2.0, -1.0, 1.0], [-1.0, 0.3, 1.0], [0.5, -0.5, 1.0], [-2.0, 1.0, 1.0]])
    result = compute_metrics("multilabel", y_true, logits)
    # label 0: AP 1, AUROC 1; label 1: positives ranked 2nd and 3rd -> AP (1/2 + 2/3) / 2, AUROC 1/2;
    # label 2 has no negatives and is left out of both means
    assert result["map"] == pytest.approx((1 + 7 / 12) / 2)
    assert result["auroc"] == pytest.approx(0.75)
    # thresholded at logit 0: 4 + 2 + 4 correct of 12
    assert result["accuracy"] == pytest.approx(10 / 12)


def test_regression_metrics() -> None:
    y_true = np.array([1.0, 2.0, 3.0, 4.0])
    outputs = np.array([[1.0], [2.0], [3.0], [6.0]])  # (N, 1) head output against (N,) targets
    result = compute_metrics("regression", y_true, outputs)
    assert result["mse"] == pytest.approx(1.0)
    assert result["rmse"] == pytest.approx(1.0)
    assert result["mae"] == pytest.approx(0.5)
    assert result["relative_l2"] == pytest.approx(2 / math.sqrt(30))


def test_dense_regression_relative_l2_is_a_mean_over_samples() -> None:
    y_true = np.array([[[3.0, 4.0]], [[1.0, 0.0]]])
    outputs = np.array([[[3.0, 4.0]], [[0.0, 0.0]]])
    result = compute_metrics("dense_regression", y_true, outputs)
    assert result["relative_l2"] == pytest.approx((0.0 + 1.0) / 2)
    assert result["mse"] == pytest.approx(0.25)
    # the per-sample convention: the mean of the samples' own relative errors
    halves = [
        compute_metrics("dense_regression", y_true[i : i + 1], outputs[i : i + 1]) for i in range(2)
    ]
    assert result["relative_l2"] == pytest.approx(np.mean([h["relative_l2"] for h in halves]))


def test_dense_classification_per_position() -> None:
    y_true = np.array([[0, 1, 1], [1, 1, 0]])
    predicted = np.array([[0, 1, 0], [1, 1, 0]])
    logits = np.stack([predicted == 0, predicted == 1], axis=1).astype(float)  # (N, C, L)
    result = compute_metrics("dense_classification", y_true, logits)
    assert result["accuracy"] == pytest.approx(5 / 6)
    # class 0: P=1, R=2/3 -> 0.8; class 1: P=3/4, R=1 -> 6/7
    assert result["macro_f1"] == pytest.approx((0.8 + 6 / 7) / 2)
    with_channel = compute_metrics("dense_classification", y_true[:, None], logits)
    assert with_channel == result


def test_metric_tables() -> None:
    assert default_metric("classification") == "accuracy"
    assert default_metric("multilabel") == "map"
    assert default_metric("dense_regression") == "relative_l2"
    for task_type, metrics in METRICS_FOR_TASK.items():
        assert default_metric(task_type) == metrics[0]
    assert higher_is_better("macro_f1") and not higher_is_better("relative_l2")
    with pytest.raises(ValueError):
        higher_is_better("loss")
    with pytest.raises(ValueError):
        compute_metrics("classification", np.array([0, 1]), np.zeros((3, 2)))
