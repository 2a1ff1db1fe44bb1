"""Serving a fine-tuned bundle: validate inputs, batched forward, answers in the upload's label space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orca_engine.checkpoint import load_bundle
from orca_engine.data import LabelMap, Normaliser, TargetScaler, nan_before_value
from orca_engine.device import EVAL_CHUNK_SIZE, outputs_in_chunks, resolve_device
from orca_engine.errors import DataError


@dataclass
class Prediction:
    """Always batched: one entry per input sample.

    ``predictions`` are original label values (classification), lists of 0/1 (multilabel),
    floats in the target's units (regression) or nested lists (dense tasks). ``probabilities``
    are softmax / sigmoid scores for classification and multilabel, None otherwise.
    """

    predictions: list[Any]
    probabilities: list[list[float]] | None

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": self.predictions, "probabilities": self.probabilities}


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=axis, keepdims=True))


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-logits)))


def _as_json_list(values: Any) -> list[Any]:
    # LabelMap.decode may give a numpy array or a list of numpy scalars; JSON wants plain values.
    if isinstance(values, np.ndarray):
        return list(values.tolist())
    return [value.item() if isinstance(value, np.generic) else value for value in values]


class Predictor:
    """A loaded bundle ready to predict; build it once and reuse it (no per-request reload)."""

    def __init__(
        self, model: torch.nn.Module, config: dict[str, Any], *, device: torch.device
    ) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
        self.task_type: str = config["task_type"]
        self.sample_shape: tuple[int, ...] = tuple(config["sample_shape"])
        self.label_shape: tuple[int, ...] = tuple(config.get("label_shape") or ())
        self.normaliser = Normaliser.from_dict(config["normaliser"])
        scaler = config.get("target_scaler")
        self.target_scaler = TargetScaler.from_dict(scaler) if scaler else None
        label_map = config.get("label_map")
        self.label_map = LabelMap.from_dict(label_map) if label_map else None

    def validate(self, x: Any) -> np.ndarray:
        """One sample or a batch of samples as a float32 batch, or :class:`DataError` saying why not."""
        expected = self.sample_shape
        batch_text = f"(N, {', '.join(str(d) for d in expected)})" if expected else "(N,)"
        try:
            array = np.asarray(x)
        except (ValueError, TypeError) as error:
            raise DataError(
                f"inputs are not a rectangular numeric array: {error}", param="inputs"
            ) from None
        if array.dtype == object:
            array = _nulls_as_nan(array)
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise DataError(
                f"inputs must be numeric (int or float); got dtype {array.dtype}"
                + (" (ragged nested lists?)" if array.dtype == object else ""),
                param="inputs",
            )
        if array.shape == expected:
            array = array[np.newaxis]
        elif array.ndim != len(expected) + 1 or array.shape[1:] != expected:
            raise DataError(
                f"expected one sample of shape {expected} or a batch of shape {batch_text}; "
                f"got shape {array.shape}",
                param="inputs",
            )
        if len(array) == 0:
            raise DataError("the batch is empty: send at least one sample", param="inputs")
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            if self._trailing_padding(array):
                # unequal-length series, read as the upload read them: the padding becomes zeros
                return np.nan_to_num(array, copy=False, nan=0.0)
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise DataError(
                f"inputs contain {bad} NaN or infinite values"
                + (
                    "; NaN (JSON null) is read only as trailing padding of a series (after its "
                    "last value)"
                    if len(expected) == 2
                    else ""
                ),
                param="inputs",
            )
        return array

    def _trailing_padding(self, array: np.ndarray) -> bool:
        """Whether every non-finite value is NaN padding at the end of a series with values."""
        if len(self.sample_shape) != 2 or np.isinf(array).any():
            return False  # only (C, L) sequences are padded, and never with infinities
        nan = np.isnan(array)
        if nan_before_value(nan):
            return False
        return not np.any(nan.all(axis=(1, 2)))  # every sample keeps some values

    def outputs(self, x: Any) -> np.ndarray:
        """Raw model outputs (logits / standardised values) for validated inputs, in chunks."""
        batch = self.validate(x)
        return outputs_in_chunks(
            self.model,
            batch,
            device=self.device,
            transform=self.normaliser.transform,
            chunk_size=EVAL_CHUNK_SIZE,
        )

    def predict(self, x: Any) -> Prediction:
        """Predictions (and probabilities where they exist) for one sample or a batch."""
        outputs = self.outputs(x)
        task = self.task_type
        if task == "classification":
            probabilities = _softmax(outputs.reshape(len(outputs), -1), axis=1)
            return Prediction(self._decode(probabilities.argmax(axis=1)), probabilities.tolist())
        if task == "multilabel":
            probabilities = _sigmoid(outputs.reshape(len(outputs), -1))
            return Prediction((probabilities >= 0.5).astype(int).tolist(), probabilities.tolist())
        if task == "dense_classification":
            # Per-position probabilities would dwarf the answer; only the class maps are returned.
            class_ids = outputs.argmax(axis=1)
            decoded = np.asarray(self._decode(class_ids.reshape(-1)), dtype=object)
            return Prediction(decoded.reshape(class_ids.shape).tolist(), None)
        values = outputs.reshape((len(outputs), *self.label_shape))
        if self.target_scaler is not None:
            values = self.target_scaler.inverse_transform(values)
        return Prediction(np.asarray(values, dtype=np.float64).tolist(), None)

    def _decode(self, class_ids: np.ndarray) -> list[Any]:
        if self.label_map is None:
            return [int(i) for i in class_ids]
        return _as_json_list(self.label_map.decode(class_ids))


def load_model(bundle_dir: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
    """Load a bundle written by :func:`orca_engine.checkpoint.save_bundle` for prediction."""
    # Prediction only reads the weights: members' identical backbone weights are held once.
    model, config = load_bundle(bundle_dir, share_identical=True)
    return Predictor(model, config, device=resolve_device(device))


def _nulls_as_nan(array: np.ndarray) -> np.ndarray:
    """JSON has no NaN: a rectangular array of numbers and nulls reads each null as NaN.

    Anything else in an object array (strings, booleans beside nulls, ragged lists) is left
    for the dtype check to refuse.
    """
    flat = array.ravel()
    if not all(
        value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        for value in flat
    ):
        return array
    numbers = [np.nan if value is None else float(value) for value in flat]
    return np.asarray(numbers, dtype=np.float64).reshape(array.shape)
