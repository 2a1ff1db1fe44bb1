"""Task spec validation and `auto` resolution (orca_engine.specs)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from orca_engine.data import DatasetInfo
from orca_engine.errors import SpecError
from orca_engine.specs import (
    JobSpec,
    ResolvedSpec,
    backbone_family,
    parse_spec,
    resolve_spec,
    validation_issues,
)


def _info(**overrides: Any) -> DatasetInfo:
    """GunPoint-like: 50 train sequences of (1, 150), two integer classes, a test split, no val."""
    values: dict[str, Any] = {
        "format": "npz",
        "input_kind": "seq1d",
        "sample_shape": (1, 150),
        "label_shape": (),
        "task_type": "classification",
        "n_classes": 2,
        "classes": [1, 2],
        "splits": {"train": 50, "val": 0, "test": 150},
        "has_test": True,
        "label_kind": "integer",
    }
    values.update(overrides)
    return DatasetInfo(**values)


REGRESSION = {"task_type": "regression", "n_classes": None, "classes": None, "label_kind": "float"}


def test_auto_resolves_to_concrete_values_with_reasons() -> None:
    resolved = resolve_spec(JobSpec(dataset_id="ds_1"), _info())
    data = resolved.to_dict()
    assert "auto" not in data.values()
    assert data["task_type"] == "classification" and data["metric"] == "accuracy"
    assert (data["backbone"], data["source"], data["distance"]) == (
        "minilm-l6",
        "english-text",
        "otdd",
    )
    assert data["align_auto"] is True and 0 < data["align_epochs"] <= 60
    # the job says which embedder alignment hands on, where that helped, and how to skip it
    assert "keeps the classes apart" in resolved.reasons["align_epochs"]
    assert "alignment.distance 'none'" in resolved.reasons["align_epochs"]
    assert data["token_budget"] == 8  # series: few long tokens through a conv stem
    # 50 train rows, 10 held out for val -> 40; batch clip(40 // 8, 8, 64) = 8
    assert data["batch_size"] == 8
    assert 3 <= data["finetune_epochs"] <= 100
    # 40 training rows: only the backbone's LayerNorms train, at the rate for that mode
    assert data["finetune_mode"] == "layernorm"
    assert data["lr"] == pytest.approx(1e-3) and data["embedder_lr"] > 0
    auto_fields = {"task_type", "metric", "backbone", "source", "align_epochs", "batch_size"}
    auto_fields |= {"finetune_mode", "finetune_epochs", "lr", "token_budget"}
    assert auto_fields <= set(resolved.reasons)
    assert all(isinstance(reason, str) and reason for reason in resolved.reasons.values())
    # stored as JSON with the job, rebuilt by the worker and the checkpoint
    assert ResolvedSpec.from_dict(json.loads(json.dumps(data))) == resolved


def test_explicit_values_are_kept_and_not_explained() -> None:
    spec = JobSpec.model_validate(
        {
            "dataset_id": "ds_1",
            "task": {"type": "classification", "metric": "macro_f1"},
            "backbone": "tiny-bert",
            "alignment": {
                "distance": "mmd",
                "source": "english-text",
                "epochs": 3,
                "max_samples": 100,
            },
            "finetune": {
                "mode": "layernorm",
                "epochs": 2,
                "lr": 0.05,
                "batch_size": 16,
                "optimizer": "sgd",
            },
            "seed": 7,
        }
    )
    resolved = resolve_spec(spec, _info())
    assert (resolved.metric, resolved.backbone, resolved.distance) == (
        "macro_f1",
        "tiny-bert",
        "mmd",
    )
    assert (resolved.align_epochs, resolved.align_auto, resolved.max_samples) == (3, False, 100)
    assert (resolved.finetune_epochs, resolved.lr, resolved.batch_size) == (2, 0.05, 16)
    assert (resolved.optimizer, resolved.finetune_mode, resolved.seed) == ("sgd", "layernorm", 7)
    for name in (
        "metric",
        "backbone",
        "source",
        "align_epochs",
        "finetune_epochs",
        "lr",
        "batch_size",
    ):
        assert name not in resolved.reasons


def test_resolution_depends_on_data_and_device() -> None:
    tiny = resolve_spec(JobSpec(dataset_id="d"), _info())
    large_info = _info(splits={"train": 20_000, "val": 2_000, "test": 0}, has_val=True)
    large = resolve_spec(JobSpec(dataset_id="d"), large_info)
    assert large.batch_size == 64
    assert tiny.finetune_epochs > large.finetune_epochs >= 3
    wide = _info(input_kind="tabular", sample_shape=(300,))
    assert resolve_spec(JobSpec(dataset_id="d"), wide, device="cuda:0").token_budget == 128
    assert resolve_spec(JobSpec(dataset_id="d"), wide).token_budget == 64
    few = resolve_spec(JobSpec(dataset_id="d"), _info(splits={"train": 6, "val": 0, "test": 0}))
    assert few.batch_size <= 5  # never more than the training rows left after the val split

    full = resolve_spec({"dataset_id": "d", "finetune": {"mode": "full"}}, _info())
    frozen = resolve_spec({"dataset_id": "d", "finetune": {"mode": "frozen"}}, _info())
    sgd = resolve_spec(
        {"dataset_id": "d", "finetune": {"mode": "full", "optimizer": "sgd"}}, _info()
    )
    assert frozen.lr > full.lr and sgd.lr > full.lr


def test_backbone_and_source_follow_the_modality() -> None:
    image = _info(input_kind="image2d", sample_shape=(3, 32, 32))
    with_vision = resolve_spec(JobSpec(dataset_id="d"), image, vision_backbone="timm:vit_tiny")
    assert (with_vision.backbone, with_vision.source) == ("timm:vit_tiny", "natural-images")
    assert "vision" in with_vision.reasons["backbone"]
    without = resolve_spec(JobSpec(dataset_id="d"), image)
    assert (without.backbone, without.source) == ("minilm-l6", "english-text")
    # sequences stay on the text backbone even when a vision one exists
    sequence = resolve_spec(JobSpec(dataset_id="d"), _info(), vision_backbone="tiny-vit")
    assert sequence.backbone == "minilm-l6"
    assert (
        resolve_spec({"dataset_id": "d", "backbone": "tiny-swin"}, _info()).source
        == "natural-images"
    )
    assert [backbone_family(n) for n in ("tiny-vit", "timm:resnet18", "hf:/m", "tiny-roberta")] == [
        "vision",
        "vision",
        "text",
        "text",
    ]


def test_distance_none_skips_alignment() -> None:
    resolved = resolve_spec({"dataset_id": "d", "alignment": {"distance": "none"}}, _info())
    assert (resolved.align_epochs, resolved.align_auto) == (0, False)
    with pytest.raises(SpecError) as raised:
        resolve_spec({"dataset_id": "d", "alignment": {"distance": "none", "epochs": 5}}, _info())
    assert raised.value.param == "alignment.epochs"
    assert resolved.align_keep_separation is False
    assert "align_keep_separation" not in resolved.reasons
    for field, value in (("scope", "output"), ("keep_separation", True)):
        with pytest.raises(SpecError) as raised:
            resolve_spec(
                {"dataset_id": "d", "alignment": {"distance": "none", field: value}}, _info()
            )
        assert raised.value.param == f"alignment.{field}"


def test_alignment_keeps_classes_apart_by_default_and_moves_every_embedder_weight() -> None:
    for info in (_info(), _info(**REGRESSION), _info(input_kind="tabular", sample_shape=(30,))):
        resolved = resolve_spec(JobSpec(dataset_id="d"), info)
        assert (resolved.align_keep_separation, resolved.align_scope) == (True, "embedder")
        assert "apart" in resolved.reasons["align_keep_separation"]
    # explicit values are kept and not explained
    explicit = resolve_spec(
        {"dataset_id": "d", "alignment": {"keep_separation": False, "scope": "output"}}, _info()
    )
    assert (explicit.align_keep_separation, explicit.align_scope) == (False, "output")
    assert "align_keep_separation" not in explicit.reasons
    for field, value in (("scope", "stem"), ("keep_separation", "yes")):
        with pytest.raises(SpecError) as raised:
            resolve_spec({"dataset_id": "d", "alignment": {field: value}}, _info())
        assert raised.value.param == f"alignment.{field}"
    # a stored spec from before the fields resolves to what those jobs did: every embedder
    # weight moved and the last embedder handed on
    stored = resolve_spec(JobSpec(dataset_id="d"), _info()).to_dict()
    del stored["align_scope"], stored["align_keep_separation"]
    old = ResolvedSpec.from_dict(stored)
    assert (old.align_scope, old.align_keep_separation) == ("embedder", False)


def test_task_and_metric_follow_the_labels() -> None:
    regression = resolve_spec(JobSpec(dataset_id="d"), _info(**REGRESSION))
    assert (regression.task_type, regression.metric) == ("regression", "rmse")
    # integer class ids may be treated as a regression target
    as_regression = resolve_spec({"dataset_id": "d", "task": {"type": "regression"}}, _info())
    assert (as_regression.task_type, as_regression.metric) == ("regression", "rmse")
    multilabel = _info(
        task_type="multilabel", label_shape=(5,), n_classes=None, classes=None, label_kind="binary"
    )
    assert resolve_spec(JobSpec(dataset_id="d"), multilabel).metric == "map"


@pytest.mark.parametrize(
    ("spec", "info", "param"),
    [
        ({"task": {"metric": "accuracy"}}, _info(**REGRESSION), "task.metric"),
        ({"task": {"metric": "mse"}}, _info(), "task.metric"),
        ({"task": {"metric": "map"}}, _info(), "task.metric"),
        ({"task": {"type": "classification"}}, _info(**REGRESSION), "task.type"),
        ({"task": {"type": "multilabel"}}, _info(), "task.type"),
        ({"task": {"type": "dense_regression"}}, _info(), "task.type"),
        (
            {"task": {"type": "regression"}},
            _info(label_kind="text", classes=["a", "b"]),
            "task.type",
        ),
        (
            {"task": {"type": "classification"}},
            _info(task_type="dense_classification", label_shape=(150,)),
            "task.type",
        ),
    ],
)
def test_impossible_combinations_name_the_field(
    spec: dict[str, Any], info: DatasetInfo, param: str
) -> None:
    with pytest.raises(SpecError) as raised:
        resolve_spec({"dataset_id": "d", **spec}, info)
    assert raised.value.param == param
    assert raised.value.code == "bad_hyperparameter"


def test_unknown_fields_are_rejected_by_path() -> None:
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate(
            {"dataset_id": "d", "finetune": {"learning_rate": 0.1}, "colour": "red"}
        )
    issues = validation_issues(raised.value)
    assert {issue["field"] for issue in issues} == {"finetune.learning_rate", "colour"}
    assert "unknown field 'finetune.learning_rate'" in [issue["message"] for issue in issues]

    with pytest.raises(SpecError) as spec_error:
        parse_spec({"dataset_id": "d", "alignment": {"epoch": 3}})
    assert spec_error.value.param == "alignment.epoch"


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("finetune", {"lr": 0}, "finetune.lr"),
        ("finetune", {"lr": 1.5}, "finetune.lr"),
        ("finetune", {"lr": -1e-3}, "finetune.lr"),
        ("finetune", {"lr": "fast"}, "finetune.lr"),
        ("finetune", {"lr": float("nan")}, "finetune.lr"),
        ("finetune", {"epochs": 0}, "finetune.epochs"),
        ("finetune", {"epochs": 10_001}, "finetune.epochs"),
        ("finetune", {"epochs": 2.5}, "finetune.epochs"),
        ("finetune", {"batch_size": 0}, "finetune.batch_size"),
        ("finetune", {"batch_size": 4097}, "finetune.batch_size"),
        ("finetune", {"batch_size": True}, "finetune.batch_size"),
        ("finetune", {"early_stopping_patience": -1}, "finetune.early_stopping_patience"),
        ("finetune", {"early_stopping_patience": 1001}, "finetune.early_stopping_patience"),
        ("finetune", {"mode": "lora"}, "finetune.mode"),
        ("finetune", {"optimizer": "adam"}, "finetune.optimizer"),
        ("alignment", {"epochs": -1}, "alignment.epochs"),
        ("alignment", {"epochs": 10_001}, "alignment.epochs"),
        ("alignment", {"max_samples": 9}, "alignment.max_samples"),
        ("alignment", {"max_samples": 100_001}, "alignment.max_samples"),
        ("alignment", {"distance": "kl"}, "alignment.distance"),
        ("task", {"metric": "f1"}, "task.metric"),
        (None, {"seed": -1}, "seed"),
        (None, {"seed": 2**31}, "seed"),
        (None, {"seed": True}, "seed"),
        (None, {"queue": "tpu"}, "queue"),
        (None, {"dataset_id": ""}, "dataset_id"),
    ],
)
def test_out_of_range_values_are_rejected(
    section: str | None, value: dict[str, Any], field: str
) -> None:
    body: dict[str, Any] = {"dataset_id": "d"}
    if section is None:
        body.update(value)
    else:
        body[section] = value
    with pytest.raises(ValidationError) as raised:
        JobSpec.model_validate(body)
    issues = validation_issues(raised.value)
    assert [issue["field"] for issue in issues] == [field]
    assert issues[0]["message"].startswith(field)


def test_boundary_values_are_accepted() -> None:
    spec = JobSpec.model_validate(
        {
            "dataset_id": "d",
            "alignment": {"epochs": 0, "max_samples": 10},
            "finetune": {
                "lr": 1,
                "epochs": 10_000,
                "batch_size": 4096,
                "early_stopping_patience": 0,
            },
            "seed": 2**31 - 1,
        }
    )
    assert spec.finetune.lr == 1.0 and isinstance(spec.finetune.lr, float)
    assert spec.alignment.epochs == 0
    assert JobSpec.model_validate({"dataset_id": "d"}).finetune.lr == "auto"


def test_specs_and_data_import_without_torch() -> None:
    # The API validates uploads and specs in a process that must not load torch.
    code = (
        "import sys, orca_engine.specs, orca_engine.data; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
