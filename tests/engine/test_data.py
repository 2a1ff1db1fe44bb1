"""Upload validation, loading, splits, label maps and normalisers (orca_engine.data)."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from orca_engine.data import (
    DatasetInfo,
    LabelMap,
    Limits,
    Normaliser,
    Report,
    TargetScaler,
    inspect_file,
    load_dataset,
)
from orca_engine.errors import DataError

RNG = np.random.default_rng(0)


def _npz(tmp_path: Path, name: str = "data.npz", **arrays: Any) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _fields(issues: list[Any]) -> list[str]:
    return [issue.field for issue in issues]


def _messages(report: Report) -> str:
    return " | ".join(f"{i.field}: {i.message}" for i in report.errors + report.warnings)


def _classification_arrays(n: int = 40, d: int = 5) -> dict[str, np.ndarray]:
    return {
        "x_train": RNG.normal(size=(n, d)).astype(np.float32),
        "y_train": np.arange(n) % 2,
    }


# --- real data --------------------------------------------------------------------------------


def test_gunpoint_is_a_two_class_sequence_dataset(gunpoint_npz: Path) -> None:
    info, report = inspect_file(gunpoint_npz, filename="gunpoint.npz")
    assert report.ok, report.to_dict()
    assert info is not None
    assert info.input_kind == "seq1d"
    assert info.sample_shape == (1, 150)
    assert info.task_type == "classification"
    assert info.classes == [1, 2]
    assert info.splits == {"train": 50, "val": 0, "test": 150}
    assert (info.has_val, info.has_test) == (False, True)
    # JSON round trip, as the API stores it
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_gunpoint_load_makes_seeded_stratified_val_split(gunpoint_npz: Path) -> None:
    first = load_dataset(gunpoint_npz, seed=3)
    again = load_dataset(gunpoint_npz, seed=3)
    other = load_dataset(gunpoint_npz, seed=4)
    assert first.info.splits == {"train": 40, "val": 10, "test": 150}
    assert first.x_train.dtype == np.float32 and first.x_train.shape == (40, 1, 150)
    assert first.y_train.dtype == np.int64
    np.testing.assert_array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.x_val, other.x_val)
    # stratified: each class keeps its share in val (GunPoint train is 24 / 26 -> 5 / 5)
    assert sorted(np.bincount(first.y_val).tolist()) == [5, 5]
    # labels come back in the upload's space
    assert first.label_map is not None
    assert first.label_map.decode(first.y_test).tolist()[:5] == [1, 2, 2, 1, 1]


def test_breast_cancer_csv_with_named_label_column(tmp_path: Path) -> None:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    path = tmp_path / "cancer.csv"
    frame.to_csv(path, index=False)

    info, report = inspect_file(path, filename="cancer.csv")
    assert info is None
    assert _fields(report.errors) == ["label"]
    assert "'label' not found" in report.errors[0].message

    info, report = inspect_file(path, filename="cancer.csv", label_column="target")
    assert report.ok, report.to_dict()
    assert info is not None
    assert (info.format, info.input_kind, info.sample_shape) == ("csv", "tabular", (30,))
    assert info.task_type == "classification" and info.classes == [0, 1]
    assert info.label_column == "target"
    assert info.feature_names is not None and info.feature_names[0] == "mean radius"


def test_diabetes_csv_is_regression_and_missing_values_are_imputed(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "label"})
    frame.loc[[0, 5], "bmi"] = np.nan
    path = tmp_path / "diabetes.csv"
    frame.to_csv(path, index=False)

    dataset = load_dataset(path, seed=0)
    assert dataset.info.task_type == "regression"
    assert dataset.label_map is None and dataset.y_train.dtype == np.float32
    assert any(
        w.field == "bmi" and "2 missing values" in w.message for w in dataset.report.warnings
    )
    x_all = np.concatenate([dataset.x_train, dataset.x_val])
    assert not np.isnan(x_all).any()
    assert len(x_all) == len(frame)


# --- refused content: every SPEC §2 problem yields a report entry ----------------------------------


class _PlantsAFile:
    """Unpickling this would create ``marker``: proof that an upload was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_object_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    labels = np.empty(4, dtype=object)
    labels[:] = [_PlantsAFile(marker) for _ in range(4)]
    pickle.dumps(labels)  # sanity: the payload really would run on load
    path = _npz(tmp_path, x_train=np.zeros((4, 3)), y_train=labels)

    info, report = inspect_file(path, filename="evil.npz")
    with pytest.raises(DataError):
        load_dataset(path)

    assert info is None
    assert _fields(report.errors) == ["y_train"]
    assert "pickl" in report.errors[0].message
    assert not marker.exists()


def test_nan_and_inf_are_errors_with_counts(tmp_path: Path) -> None:
    x = RNG.normal(size=(20, 4))
    x[3, 1] = np.nan
    x[4, 2] = np.nan
    x[7, 0] = np.inf
    y = np.linspace(0, 1, 20)
    y[2] = np.nan
    path = _npz(tmp_path, x_train=x, y_train=y)

    info, report = inspect_file(path, filename="bad.npz")
    assert info is None
    text = _messages(report)
    assert "2 NaN" in text and "1 infinite" in text
    assert sorted(_fields(report.errors)) == ["x_train", "x_train", "y_train"]


def test_trailing_nan_padding_is_a_warning_and_filled_with_zeros(tmp_path: Path) -> None:
    x = RNG.normal(size=(12, 2, 30))
    x[0, :, 25:] = np.nan  # a shorter series
    x[5, 1, 20:] = np.nan
    y = np.arange(12) % 3
    path = _npz(tmp_path, x_train=x, y_train=y)

    info, report = inspect_file(path, filename="padded.npz")
    assert report.ok, report.to_dict()
    assert info is not None
    assert _fields(report.warnings) == ["x_train"]
    assert "padding" in report.warnings[0].message

    dataset = load_dataset(path)
    x_all = np.concatenate([dataset.x_train, dataset.x_val])
    assert not np.isnan(x_all).any()
    assert np.count_nonzero(x_all == 0) == 2 * 5 + 10

    # NaN in the middle of a series is not padding
    x[8, 0, 3] = np.nan
    path = _npz(tmp_path, name="holes.npz", x_train=x, y_train=y)
    info, report = inspect_file(path, filename="holes.npz")
    assert info is None and "trailing" in report.errors[0].message


def test_shape_and_count_mismatches_and_missing_members(tmp_path: Path) -> None:
    path = _npz(
        tmp_path,
        x_train=np.zeros((10, 3, 8)),
        y_train=np.arange(10) % 2,
        x_val=np.zeros((4, 3, 9)),  # sample shape differs from train
        y_val=np.arange(4) % 2,
        x_test=np.zeros((5, 3, 8)),  # no y_test
    )
    info, report = inspect_file(path, filename="d.npz")
    assert info is None
    messages = {issue.field: issue.message for issue in report.errors}
    assert "x_train samples have shape (3, 8)" in messages["x_val"]
    assert "without y_test" in messages["y_test"]

    path = _npz(tmp_path, name="n.npz", x_train=np.zeros((10, 3)), y_train=np.arange(9) % 2)
    _, report = inspect_file(path, filename="n.npz")
    assert [(i.field, i.message) for i in report.errors] == [
        ("y_train", "has 9 samples but x_train has 10")
    ]

    path = _npz(tmp_path, name="nox.npz", y_train=np.arange(9) % 2)
    _, report = inspect_file(path, filename="nox.npz")
    assert _fields(report.errors) == ["x_train"]


def test_label_problems(tmp_path: Path) -> None:
    x = np.zeros((6, 2))
    single = _npz(tmp_path, name="single.npz", x_train=x, y_train=np.full(6, 7))
    _, report = inspect_file(single, filename="single.npz")
    assert _fields(report.errors) == ["y_train"] and "single class (7)" in report.errors[0].message

    unseen = _npz(
        tmp_path,
        name="unseen.npz",
        x_train=x,
        y_train=np.array(["a", "a", "b", "b", "c", "b"]),
        x_val=np.zeros((2, 2)),
        y_val=np.array(["a", "z"]),
    )
    info, report = inspect_file(unseen, filename="unseen.npz")
    assert info is None
    assert [(i.field, i.message) for i in report.errors] == [
        ("y_val", "labels ['z'] never occur in y_train")
    ]
    assert [(i.field, i.message) for i in report.warnings] == [
        ("y_train", "classes ['c'] have fewer than 2 training samples")
    ]

    mixed = _npz(
        tmp_path,
        name="mixed.npz",
        x_train=x,
        y_train=np.arange(6) % 2,
        x_test=np.zeros((2, 2)),
        y_test=np.array(["0", "1"]),
    )
    _, report = inspect_file(mixed, filename="mixed.npz")
    assert [(i.field, i.message) for i in report.errors] == [
        ("y_test", "labels are text but y_train labels are numbers")
    ]

    many = _npz(tmp_path, name="many.npz", x_train=np.zeros((30, 2)), y_train=np.arange(30))
    _, report = inspect_file(many, filename="many.npz", limits=Limits(max_classes=20))
    assert "over the limit of 20 classes" in report.errors[0].message


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    path = _npz(
        tmp_path,
        x_train=np.zeros((6, 2)),
        y_train=np.arange(6) % 2,
        x_test=np.zeros((0, 2)),
        y_test=np.zeros(0, dtype=np.int64),
    )
    info, report = inspect_file(path, filename="e.npz")
    assert info is None
    assert ("x_test", "is empty (0 samples)") in [(i.field, i.message) for i in report.errors]


def test_member_count_and_decompressed_size_limits(tmp_path: Path) -> None:
    arrays = {f"extra_{i}": np.zeros(1) for i in range(5)}
    path = _npz(tmp_path, name="members.npz", **_classification_arrays(), **arrays)
    info, report = inspect_file(path, filename="members.npz", limits=Limits(max_members=4))
    assert info is None and not report.too_large
    assert "7 members; at most 4" in report.errors[0].message

    # 8 MB of zeros compresses to a few KB: a (small) zip bomb.
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x_train=np.zeros((1000, 1000)), y_train=np.arange(1000) % 2)
    assert bomb.stat().st_size < 100_000
    info, report = inspect_file(
        bomb, filename="bomb.npz", limits=Limits(max_decompressed_bytes=10**6)
    )
    assert info is None and report.too_large
    assert _fields(report.errors) == ["file"] and "decompressed" in report.errors[0].message
    # under a generous limit the same archive is fine (compressed members are streamed, then mapped)
    info, report = inspect_file(bomb, filename="bomb.npz")
    assert report.ok and info is not None and info.sample_shape == (1000,)


def test_unknown_members_warn_and_garbage_files_fail_cleanly(tmp_path: Path) -> None:
    path = _npz(tmp_path, notes=np.zeros(2), **_classification_arrays())
    info, report = inspect_file(path, filename="x.npz")
    assert info is not None and _fields(report.warnings) == ["notes"]

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not a zip file")
    info, report = inspect_file(garbage, filename="garbage.npz")
    assert info is None and _fields(report.errors) == ["file"]

    info, report = inspect_file(path, filename="data.h5")
    assert info is None and "unsupported file type '.h5'" in report.errors[0].message

    # a member whose header lies about its size
    truncated = tmp_path / "truncated.npz"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(truncated, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item.filename, data[:-8] if item.filename == "x_train.npy" else data)
    info, report = inspect_file(truncated, filename="t.npz")
    assert info is None and _fields(report.errors) == ["x_train"]


def test_several_problems_are_all_listed(tmp_path: Path) -> None:
    x_train = RNG.normal(size=(10, 4))
    x_train[0, 0] = np.inf
    objects = np.empty(3, dtype=object)
    path = _npz(
        tmp_path,
        x_train=x_train,
        y_train=np.arange(10) % 2,
        x_val=np.zeros((3, 4)),
        y_val=objects,
        x_test=np.zeros((4, 5)),
        y_test=np.arange(3) % 2,
    )
    info, report = inspect_file(path, filename="many.npz")
    assert info is None
    fields = _fields(report.errors)
    assert {"x_train", "y_val", "x_test", "y_test"} <= set(fields)
    assert len(report.to_dict()["errors"]) == len(fields) >= 4


def test_bad_csv_columns_are_named(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "age": [30, 40, 50, 60],
            "city": ["Oslo", "Rome", "Oslo", "Lima"],
            "income": ["1", "2", "three", "4"],
            "label": [0, 1, 0, 1],
        }
    )
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    info, report = inspect_file(path, filename="rows.csv")
    assert info is None
    assert _fields(report.errors) == ["city", "income"]
    assert "'three'" in report.errors[1].message

    path = tmp_path / "wide.csv"
    frame.drop(columns=["city", "income"]).to_csv(path, index=False)
    _, report = inspect_file(path, filename="wide.csv", limits=Limits(max_columns=1))
    assert "2 columns; at most 1" in report.errors[0].message
    _, report = inspect_file(path, filename="wide.csv", limits=Limits(max_rows=3))
    assert "more than 3 rows" in report.errors[0].message


def test_parquet_with_split_column_and_string_labels(tmp_path: Path) -> None:
    n = 24
    frame = pd.DataFrame(
        {
            "f1": RNG.normal(size=n),
            "f2": RNG.normal(size=n),
            "species": ["cat", "dog", "owl"] * 8,
            "split": ["train"] * 12 + ["val"] * 6 + ["test"] * 6,
        }
    )
    path = tmp_path / "animals.parquet"
    frame.to_parquet(path)
    dataset = load_dataset(path, label_column="species")
    assert dataset.info.splits == {"train": 12, "val": 6, "test": 6}
    assert dataset.info.classes == ["cat", "dog", "owl"]
    assert dataset.info.feature_names == ["f1", "f2"]
    assert dataset.label_map is not None
    assert dataset.label_map.decode(dataset.y_val).tolist() == ["cat", "dog", "owl"] * 2


# --- task inference ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_shape", "y", "task_type", "label_shape"),
    [
        ((20, 3), np.array(["no", "yes"] * 10), "classification", ()),
        ((20, 3), np.array([1.0, 2.0] * 10), "classification", ()),
        ((20, 3), (np.arange(60).reshape(20, 3) % 2), "multilabel", (3,)),
        ((20, 3), np.linspace(0, 1, 20), "regression", ()),
        ((20, 3), np.linspace(0, 1, 40).reshape(20, 2), "regression", (2,)),
        ((20, 2, 16), np.linspace(0, 1, 20 * 16).reshape(20, 16), "dense_regression", (1, 16)),
        ((20, 2, 16), np.linspace(0, 1, 20 * 48).reshape(20, 3, 16), "dense_regression", (3, 16)),
        ((20, 2, 16), np.arange(20 * 16).reshape(20, 16) % 4, "dense_classification", (16,)),
        ((20, 1, 6, 6), np.arange(720).reshape(20, 6, 6) % 3, "dense_classification", (6, 6)),
        ((20, 1, 6, 6), np.arange(720).reshape(20, 1, 6, 6) % 3, "dense_classification", (6, 6)),
    ],
)
def test_task_inference(
    tmp_path: Path,
    x_shape: tuple[int, ...],
    y: np.ndarray,
    task_type: str,
    label_shape: tuple[int, ...],
) -> None:
    path = _npz(tmp_path, x_train=RNG.normal(size=x_shape).astype(np.float32), y_train=y)
    info, report = inspect_file(path, filename="t.npz")
    assert report.ok, report.to_dict()
    assert info is not None
    assert (info.task_type, info.label_shape) == (task_type, label_shape)
    dataset = load_dataset(path)
    assert dataset.y_train.shape[1:] == label_shape
    if task_type.endswith("classification"):
        assert dataset.y_train.dtype == np.int64 and info.n_classes == info.out_dim
    else:
        assert dataset.y_train.dtype == np.float32


def test_task_type_override(tmp_path: Path) -> None:
    path = _npz(tmp_path, x_train=np.zeros((20, 2)), y_train=np.arange(20) % 4)
    dataset = load_dataset(path, task_type="regression")
    assert dataset.info.task_type == "regression" and dataset.label_map is None
    assert dataset.y_train.dtype == np.float32
    with pytest.raises(DataError) as raised:
        load_dataset(path, task_type="multilabel")
    assert raised.value.param == "task.type"


# --- label maps, normalisers -----------------------------------------------------------------


@pytest.mark.parametrize("classes", [["cat", "dog", "émeu"], [-3, 7, 12], [1.5, 2.5, 4.0]])
def test_label_map_round_trip(classes: list[Any]) -> None:
    label_map = LabelMap(np.asarray(classes))
    restored = LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict())))
    labels = np.asarray([classes[2], classes[0], classes[2], classes[1]])
    ids = restored.encode(labels)
    assert ids.tolist() == [2, 0, 2, 1] and ids.dtype == np.int64
    assert restored.decode(ids).tolist() == labels.tolist()
    assert type(restored.decode(ids).tolist()[0]) is type(classes[0])
    with pytest.raises(ValueError, match="not seen in training"):
        label_map.encode(np.asarray([classes[0], "unknown" if isinstance(classes[0], str) else 99]))


def test_normaliser_is_fitted_on_train_only_and_round_trips() -> None:
    x_train = RNG.normal(loc=[[[5.0], [-2.0]]], scale=[[[3.0], [0.5]]], size=(64, 2, 10))
    x_val = RNG.normal(loc=100.0, size=(8, 2, 10))
    normaliser = Normaliser.fit(x_train)
    restored = Normaliser.from_dict(json.loads(json.dumps(normaliser.to_dict())))
    scaled = restored.transform(x_train)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(scaled.std(axis=(0, 2)), 1, atol=1e-4)
    # val keeps its own offset: nothing was fitted on it
    assert restored.transform(x_val).mean() > 10
    # constant channels do not blow up
    assert np.isfinite(Normaliser.fit(np.ones((4, 3))).transform(np.ones((2, 3)))).all()


def test_target_scaler_inverts() -> None:
    y = RNG.normal(loc=50, scale=10, size=(30, 2))
    scaler = TargetScaler.fit(y)
    restored = TargetScaler.from_dict(scaler.to_dict())
    np.testing.assert_allclose(restored.inverse_transform(restored.transform(y)), y, rtol=1e-5)
    scalar = TargetScaler.fit(y[:, 0])
    np.testing.assert_allclose(
        scalar.inverse_transform(scalar.transform(y[:, 0])), y[:, 0], rtol=1e-5
    )
