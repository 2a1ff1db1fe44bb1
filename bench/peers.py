"""Classical peers and simple baselines a user would try instead of ORCA, run in-process.

* ``minirocket``: aeon's MiniRocket features (multivariate capable; NaN padding read as zeros)
  + a standardiser + ``RidgeClassifierCV`` — the usual strong time-series classifier;
* ``1nn``: 1-nearest neighbour under Euclidean distance on the (zero-padded) series;
* ``hgb``: scikit-learn ``HistGradientBoosting{Classifier,Regressor}`` for tables (defaults but
  for the leaf size on tiny tables, :func:`hgb_min_leaf`);
* ``linear``: standardised logistic regression (classification) or ``RidgeCV`` (regression,
  dense fields) on the flattened input — the simplest baseline;
* ``cnn``: a small CNN trained from scratch in torch (2D for images; for fields, 1D dilated
  convolutions plus a learned pointwise map of the input, trained once with zero and once with
  circular padding, the better on validation kept), with the same epoch budget as the ORCA
  methods and checkpoint selection on a 20% validation split of train (as the engine does).

Every peer is seeded, trains on train only and reports the engine's metrics on test.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bench.datasets import Arrays, DatasetMeta

#: which peers apply to which dataset kind
PEERS_FOR_KIND: dict[str, tuple[str, ...]] = {
    "series": ("minirocket", "1nn"),
    "image": ("cnn", "linear"),
    "tabular": ("hgb", "linear"),
    "field": ("cnn", "linear"),
}
#: the strong peer a user would pick instead of ORCA for each kind of data
STRONG_PEER = {"series": "minirocket", "tabular": "hgb", "image": "cnn", "field": "cnn"}
#: the simple baseline the default must never fall below (issue 8: 1-NN for series, a linear
#: model for everything else)
SIMPLE_PEER = {"series": "1nn", "tabular": "linear", "image": "linear", "field": "linear"}
PEER_METHODS = ("minirocket", "1nn", "hgb", "linear", "cnn")
#: bump when a peer's recipe changes so its cached results rerun (3: hgb's leaf size on tiny
#: tables; its accuracy runs keep per-row marks)
PEER_VERSION = 3
CNN_LR = 1e-3
CNN_BATCH = 32
CNN_VAL_FRACTION = 0.2
FIELD_DILATIONS = (1, 2, 4, 8)
Padding = Literal["zeros", "circular"]
#: fields: each padding is trained and the one with the lower validation error kept (periodic
#: fields want circular, bounded ones zeros; a user would try both)
FIELD_PADDINGS: tuple[Padding, ...] = ("zeros", "circular")


def applies(method: str, meta: DatasetMeta) -> bool:
    """Whether ``method`` (a peer) is run on this dataset."""
    return method in PEERS_FOR_KIND.get(meta.kind, ())


def _flat(x: np.ndarray) -> np.ndarray:
    return np.nan_to_num(x.reshape(len(x), -1).astype(np.float64), nan=0.0)


def _minirocket(arrays: Arrays, meta: DatasetMeta, seed: int, epochs: int) -> np.ndarray:
    from aeon.transformations.collection.convolution_based import MiniRocket
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, _ = arrays
    model = make_pipeline(
        MiniRocket(random_state=seed, n_jobs=1),
        StandardScaler(),
        RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)),
    )
    model.fit(np.nan_to_num(x_train.astype(np.float64)), y_train)
    return np.asarray(model.predict(np.nan_to_num(x_test.astype(np.float64))))


def _one_nn(arrays: Arrays, meta: DatasetMeta, seed: int, epochs: int) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    x_train, y_train, x_test, _ = arrays
    model = KNeighborsClassifier(n_neighbors=1).fit(_flat(x_train), y_train)
    return np.asarray(model.predict(_flat(x_test)))


def hgb_min_leaf(n_train: int) -> int:
    """scikit-learn's 20 rows per leaf, fewer where that would leave under ten leaves' worth.

    At the default a 20-row table (breast_cancer-10shot) cannot split at all and the model
    predicts one class for every row (0.374 there); a user would lower it.
    """
    return min(20, max(1, n_train // 10))


def _hgb(arrays: Arrays, meta: DatasetMeta, seed: int, epochs: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    x_train, y_train, x_test, _ = arrays
    model: Any
    leaf = hgb_min_leaf(len(x_train))
    if meta.task_type == "classification":
        model = HistGradientBoostingClassifier(random_state=seed, min_samples_leaf=leaf)
    else:
        model = HistGradientBoostingRegressor(random_state=seed, min_samples_leaf=leaf)
    return np.asarray(model.fit(_flat(x_train), y_train).predict(_flat(x_test)))


def _linear(arrays: Arrays, meta: DatasetMeta, seed: int, epochs: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, y_test = arrays
    target = y_train.reshape(len(y_train), -1) if meta.task_type == "dense_regression" else y_train
    estimator: Any
    if meta.task_type == "classification":
        estimator = LogisticRegression(max_iter=5000, random_state=seed)
    else:
        estimator = RidgeCV(alphas=np.logspace(-3, 3, 13))
    model = make_pipeline(StandardScaler(), estimator).fit(_flat(x_train), target)
    predicted = np.asarray(model.predict(_flat(x_test)))
    return predicted.reshape((len(x_test), *y_test.shape[1:]))


# --- small CNN -----------------------------------------------------------------------------------


def _cnn_model(
    meta: DatasetMeta, in_channels: int, n_classes: int, padding: Padding = "zeros"
) -> nn.Module:
    if meta.kind == "image":
        return nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, n_classes),
        )
    width = 64
    layers: list[nn.Module] = []
    channels = in_channels
    for dilation in FIELD_DILATIONS:  # receptive field 61 points: most fields' whole width
        layers += [
            nn.Conv1d(
                channels, width, 5, padding=2 * dilation, dilation=dilation, padding_mode=padding
            ),
            nn.GELU(),
        ]
        channels = width
    layers.append(nn.Conv1d(width, in_channels, 1))
    return LinearSkip(nn.Sequential(*layers), in_channels)


class LinearSkip(nn.Module):
    """The conv body plus a learned pointwise linear map of the input (the change from the
    input where output and input are alike, as in Burgers; nothing where they are not)."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.skip = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _cnn(arrays: Arrays, meta: DatasetMeta, seed: int, epochs: int) -> np.ndarray:
    x_train, y_train, x_test, _ = arrays
    classify = meta.task_type == "classification"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    n_val = max(1, round(len(x_train) * CNN_VAL_FRACTION))
    val_rows, fit_rows = order[:n_val], order[n_val:]
    mean, std = float(x_train[fit_rows].mean()), float(x_train[fit_rows].std()) or 1.0
    # fields: predict the target in its own standardised units
    y_mean = 0.0 if classify else float(y_train[fit_rows].mean())
    scale = 1.0 if classify else float(y_train[fit_rows].std()) or 1.0

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((np.nan_to_num(x) - mean) / std, dtype=torch.float32)

    def target(y: np.ndarray) -> torch.Tensor:
        if classify:
            return torch.as_tensor(y, dtype=torch.long)
        return torch.as_tensor((y - y_mean) / scale, dtype=torch.float32)

    n_classes = int(y_train.max()) + 1 if classify else 0
    loss_fn: Callable[..., Any] = (
        torch.nn.functional.cross_entropy if classify else torch.nn.functional.mse_loss
    )
    x_fit, y_fit = tensor(x_train[fit_rows]), target(y_train[fit_rows])
    x_val, y_val = tensor(x_train[val_rows]), target(y_train[val_rows])

    def fit(model: nn.Module) -> tuple[nn.Module, float]:
        """Train ``model``; return it at its best validation epoch, and that score."""
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=CNN_LR)
        best_state, best_score = None, -math.inf
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(x_fit), generator=generator).split(CNN_BATCH):
                optimizer.zero_grad()
                loss_fn(model(x_fit[batch]), y_fit[batch]).backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                out = model(x_val)
                score = (
                    float((out.argmax(1) == y_val).float().mean())
                    if classify
                    else -float(loss_fn(out, y_val))
                )
            if score > best_score:
                best_score = score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if best_state is not None:
            model.load_state_dict(best_state)
        return model, best_score

    candidates = []
    paddings: tuple[Padding, ...] = ("zeros",) if meta.kind == "image" else FIELD_PADDINGS
    for padding in paddings:
        torch.manual_seed(seed)
        candidates.append(fit(_cnn_model(meta, x_train.shape[1], n_classes, padding)))
    model = max(candidates, key=lambda pair: pair[1])[0]
    model.eval()
    with torch.no_grad():
        out = model(tensor(x_test))
    if classify:
        return np.asarray(out.argmax(1).numpy())
    return np.asarray(out.numpy() * scale + y_mean)


PEERS: dict[str, Callable[[Arrays, DatasetMeta, int, int], np.ndarray]] = {
    "minirocket": _minirocket,
    "1nn": _one_nn,
    "hgb": _hgb,
    "linear": _linear,
    "cnn": _cnn,
}


def correct_marks(y_true: Any, predicted: Any) -> str:
    """One character per test row, ``1`` where the predicted class is the true one, else ``0``.

    Kept with each accuracy result so two methods can be compared row by row on the same test
    split (``bench.quality.paired_error``). ``predicted`` is class ids or one row of scores per sample.
    """
    truth = np.asarray(y_true).reshape(-1)
    guess = np.asarray(predicted)
    if guess.ndim == 2:
        guess = guess.argmax(axis=1)
    guess = guess.reshape(-1)
    if len(guess) != len(truth):
        raise ValueError(f"{len(guess)} predictions for {len(truth)} test rows")
    return "".join("1" if hit else "0" for hit in guess == truth)


def run_peer(method: str, arrays: Arrays, meta: DatasetMeta, *, seed: int, epochs: int) -> dict:
    """Train one peer and score it on test: ``{"test": {...}, "wall_s": ...}``."""
    from orca_engine.metrics import compute_metrics

    started = time.monotonic()
    predicted = PEERS[method](arrays, meta, seed, epochs)
    wall = time.monotonic() - started
    test = compute_metrics(meta.task_type, arrays[3], predicted)
    body: dict[str, Any] = {"test": test, "wall_s": wall}
    if meta.task_type == "classification":
        body["test_correct"] = correct_marks(arrays[3], predicted)
    return body
