"""Task metrics, computed on a whole split at once (never averaged over batches).

``compute_metrics`` takes raw model outputs: logits for classification / multilabel / dense
classification, values for regression. It returns every metric that applies and is defined for
the data given; a metric that is undefined (AUROC when ``y_true`` has a single class) is left out
rather than reported as NaN, so the result is always JSON-able.

numpy + scikit-learn only (no torch): the API imports the metric tables to validate task specs.
"""

from __future__ import annotations

import numpy as np

TASK_TYPES = (
    "classification",
    "multilabel",
    "regression",
    "dense_regression",
    "dense_classification",
)

#: metrics a user may select for each task type (the first is the default)
METRICS_FOR_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "auroc"),
    "multilabel": ("map", "auroc", "accuracy", "macro_f1"),
    "regression": ("rmse", "mse", "mae", "relative_l2"),
    "dense_regression": ("relative_l2", "mse", "rmse", "mae"),
    "dense_classification": ("accuracy", "macro_f1"),
}

_HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "auroc": True, "map": True}
_LOWER_IS_BETTER = {"mse", "rmse", "mae", "relative_l2"}

# Guards divisions by a zero target norm in relative_l2.
_EPS = 1e-12


def default_metric(task_type: str) -> str:
    """The metric a job selects checkpoints on when the spec says ``auto``."""
    try:
        return METRICS_FOR_TASK[task_type][0]
    except KeyError:
        raise ValueError(f"unknown task type {task_type!r}") from None


def higher_is_better(metric: str) -> bool:
    """True for scores (accuracy, F1, AUROC, mAP), False for errors (MSE, RMSE, MAE, relative L2)."""
    if metric in _HIGHER_IS_BETTER:
        return True
    if metric in _LOWER_IS_BETTER:
        return False
    raise ValueError(f"unknown metric {metric!r}")


def compute_metrics(task_type: str, y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """Every metric that applies to ``task_type``, as plain floats.

    Shapes: classification ``y_true (N,)`` class ids, ``outputs (N, C)`` logits (or ``(N,)``
    predicted ids, then no AUROC); multilabel ``(N, K)`` 0/1 and ``(N, K)`` logits; regression
    ``(N,)`` or ``(N, K)`` targets and outputs of the same size; dense regression ``(N, K, *S)``;
    dense classification ``(N, *S)`` ids (or ``(N, 1, *S)``) and ``(N, C, *S)`` logits.
    """
    y_true = np.asarray(y_true)
    outputs = np.asarray(outputs)
    if len(y_true) != len(outputs):
        raise ValueError(f"y_true has {len(y_true)} samples but outputs has {len(outputs)}")
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    if task_type == "classification":
        return _classification(y_true, outputs)
    if task_type == "multilabel":
        return _multilabel(y_true, outputs)
    if task_type in ("regression", "dense_regression"):
        return _regression(y_true, outputs)
    if task_type == "dense_classification":
        return _dense_classification(y_true, outputs)
    raise ValueError(f"unknown task type {task_type!r}")


def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=axis, keepdims=True))


def _accuracy_and_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def _mean_binary_score(y_true: np.ndarray, scores: np.ndarray, kind: str) -> float | None:
    """Macro average of a binary ranking score over the columns that have both classes."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    score_fn = roc_auc_score if kind == "auroc" else average_precision_score
    values = [
        float(score_fn(y_true[:, k], scores[:, k]))
        for k in range(y_true.shape[1])
        if 0 < y_true[:, k].sum() < len(y_true)
    ]
    return float(np.mean(values)) if values else None


def _classification(y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    y_true = y_true.reshape(-1).astype(np.int64)
    if outputs.ndim == 1:
        return _accuracy_and_f1(y_true, outputs.astype(np.int64))
    logits = outputs.reshape(len(outputs), -1).astype(np.float64)
    result = _accuracy_and_f1(y_true, logits.argmax(axis=1))
    n_classes = logits.shape[1]
    if n_classes >= 2 and np.all((y_true >= 0) & (y_true < n_classes)):
        probabilities = _softmax(logits)
        one_hot = np.eye(n_classes, dtype=np.int64)[y_true]
        if n_classes == 2:
            # Binary AUROC is the positive class's; one-vs-rest would count it twice.
            one_hot, probabilities = one_hot[:, 1:], probabilities[:, 1:]
        auroc = _mean_binary_score(one_hot, probabilities, "auroc")
        if auroc is not None:
            result["auroc"] = auroc
    return result


def _multilabel(y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    y_true = y_true.reshape(len(y_true), -1).astype(np.int64)
    logits = outputs.reshape(len(outputs), -1).astype(np.float64)
    if y_true.shape != logits.shape:
        raise ValueError(f"multilabel y_true {y_true.shape} and outputs {logits.shape} differ")
    from sklearn.metrics import f1_score

    predicted = (logits > 0).astype(np.int64)  # sigmoid(logit) > 0.5
    result = {
        "accuracy": float(np.mean(predicted == y_true)),
        "macro_f1": float(f1_score(y_true, predicted, average="macro", zero_division=0)),
    }
    for name in ("map", "auroc"):
        value = _mean_binary_score(y_true, logits, name)
        if value is not None:
            result[name] = value
    return result


def _regression(y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    target = y_true.astype(np.float64).reshape(len(y_true), -1)
    predicted = outputs.astype(np.float64).reshape(len(outputs), -1)
    if target.shape != predicted.shape:
        raise ValueError(f"targets {y_true.shape} and outputs {outputs.shape} differ in size")
    error = predicted - target
    mse = float(np.mean(error**2))
    if target.shape[1] == 1:
        # One scalar per sample: a per-sample ratio would be |error|/|y| (explodes near y=0), so
        # use the ratio of norms over the whole split instead.
        relative = float(np.linalg.norm(error) / max(float(np.linalg.norm(target)), _EPS))
    else:
        # NAS-Bench-360 / Darcy-flow convention: mean over samples of ||pred - y|| / ||y||.
        per_sample = np.linalg.norm(error, axis=1) / np.maximum(
            np.linalg.norm(target, axis=1), _EPS
        )
        relative = float(np.mean(per_sample))
    return {
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "mae": float(np.mean(np.abs(error))),
        "relative_l2": relative,
    }


def _dense_classification(y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    if outputs.ndim < 2:
        raise ValueError("dense classification outputs must be (N, C, *spatial) logits")
    predicted = outputs.argmax(axis=1)
    target = y_true
    if target.ndim == predicted.ndim + 1 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != predicted.shape:
        raise ValueError(f"label map {y_true.shape} does not match outputs {outputs.shape}")
    return _accuracy_and_f1(target.reshape(-1).astype(np.int64), predicted.reshape(-1))
