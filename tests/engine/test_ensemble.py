"""Cross-fitted ensembles (orca_engine/ensemble.py): folds, output combination, resolution."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from orca_engine.ensemble import combine_outputs, member_datasets, pooled_validation
from orca_engine.specs import ENSEMBLE_MAX_MEMBERS, JobSpec, resolve_spec, table_tokens
from tests.engine.test_refine_checkpoint import make_dataset
from tests.engine.test_specs import REGRESSION, _info


def test_classification_members_are_averaged_as_probabilities() -> None:
    a = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 0.0], [1.0, 2.0, 3.0]])
    combined = combine_outputs("classification", [a, b])
    expected = (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2
    torch.testing.assert_close(torch.softmax(combined, 1), expected)
    torch.testing.assert_close(combined.exp().sum(1), torch.ones(2))  # log-probabilities


def test_dense_multilabel_and_regression_outputs_combine_in_their_own_space() -> None:
    maps = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    dense = combine_outputs("dense_classification", maps)
    torch.testing.assert_close(
        torch.softmax(dense, 1), (torch.softmax(maps[0], 1) + torch.softmax(maps[1], 1)) / 2
    )
    logits = [torch.tensor([[2.0, -1.0]]), torch.tensor([[0.0, -3.0]])]
    multilabel = combine_outputs("multilabel", logits)
    torch.testing.assert_close(
        torch.sigmoid(multilabel), (torch.sigmoid(logits[0]) + torch.sigmoid(logits[1])) / 2
    )
    values = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [6.0]])]
    torch.testing.assert_close(combine_outputs("regression", values), torch.tensor([[2.0], [4.0]]))


def test_pooled_members_validate_on_disjoint_folds_covering_every_row() -> None:
    dataset = make_dataset(n_train=40, n_val=10)
    members = member_datasets(dataset, 5, seed=0, pooled=True)
    x_val, y_val = pooled_validation(members)
    assert len(y_val) == 50
    assert len(x_val) == 50  # every pooled row is validated once, by one member
    everything = np.concatenate([dataset.x_train, dataset.x_val]).reshape(50, -1)
    rows = {tuple(row) for row in everything}
    assert {tuple(row) for row in x_val.reshape(50, -1)} == rows
    for member in members:
        assert len(member.x_val) == 10 and len(member.x_train) == 40
        train_rows = {tuple(row) for row in member.x_train.reshape(40, -1)}
        assert not train_rows & {tuple(row) for row in member.x_val.reshape(10, -1)}
        # stratified: both classes in every fold
        assert set(np.unique(member.y_val)) == {0, 1}


def test_fewer_members_still_hold_out_a_fifth_and_the_user_split_is_kept() -> None:
    dataset = make_dataset(n_train=40, n_val=10)
    two = member_datasets(dataset, 2, seed=0, pooled=True)
    assert [len(m.x_val) for m in two] == [10, 10]
    kept = member_datasets(dataset, 3, seed=0, pooled=False)
    assert all(m is dataset for m in kept)


@pytest.mark.parametrize(
    ("n_train", "members"),
    [(50, ENSEMBLE_MAX_MEMBERS), (200, 2), (270, 1), (5000, 1), (8, 1)],
)
def test_auto_members_shrink_as_a_single_run_gets_dearer(n_train: int, members: int) -> None:
    info = _info(splits={"train": n_train, "val": 0, "test": 0})
    resolved = resolve_spec(JobSpec(dataset_id="d"), info)
    assert resolved.ensemble_members == members
    assert "ensemble_members" in resolved.reasons


def test_tables_count_columns_in_the_cost_of_a_run() -> None:
    # diabetes-sized (10 columns) gets the ensemble; the same rows with 30 columns cost three
    # times as much per run, and breast_cancer-sized (30 columns, more rows) gets one model
    def table(columns: int, rows: int) -> Any:
        splits = {"train": rows, "val": 0, "test": 100}
        info = _info(input_kind="tabular", sample_shape=(columns,), splits=splits, **REGRESSION)
        return resolve_spec(JobSpec(dataset_id="d"), info)

    assert table(10, 309).ensemble_members == ENSEMBLE_MAX_MEMBERS
    assert table(30, 309).ensemble_members == 2
    one = table(30, 398)
    assert one.ensemble_members == 1
    assert "samples x columns" in one.reasons["ensemble_members"]
    # past the token budget columns share tokens, so the cost stops growing with them
    assert table_tokens(10, 64) == 10 and table_tokens(64, 64) == 64
    assert table_tokens(65, 64) == 33 and table_tokens(1000, 64) == 63
    # series are counted in passes alone, as before: 150 steps read as 8 tokens
    assert resolve_spec(JobSpec(dataset_id="d"), _info()).ensemble_members == ENSEMBLE_MAX_MEMBERS


@pytest.mark.parametrize(
    ("uploaded", "members"),
    [(60, ENSEMBLE_MAX_MEMBERS), (280, 3), (400, 2), (500, 1), (5000, 1)],
)
def test_dense_tasks_buy_members_from_a_budget_of_their_own(uploaded: int, members: int) -> None:
    # 64-point fields with no validation split (a fifth is held out); the 280-row fields of the
    # quality suite get three members, where the point tasks' budget would give them one
    splits = {"train": uploaded, "val": 0, "test": 0}
    labels = {**REGRESSION, "task_type": "dense_regression"}
    field = _info(sample_shape=(1, 64), label_shape=(64,), splits=splits, **labels)
    resolved = resolve_spec(JobSpec(dataset_id="d"), field)
    assert resolved.ensemble_members == members
    point = _info(sample_shape=(1, 64), splits=splits, **REGRESSION)
    if uploaded == 280:
        assert resolve_spec(JobSpec(dataset_id="d"), point).ensemble_members == 1
    if members == 1:
        assert "dense task" in resolved.reasons["ensemble_members"]
    # a 2D map at 64 tokens costs eight times a 1D field at 8 per pass: one model from 60 rows
    image = _info(
        input_kind="image2d",
        sample_shape=(1, 16, 16),
        label_shape=(16, 16),
        splits=splits,
        **labels,
    )
    resolved_image = resolve_spec(JobSpec(dataset_id="d"), image)
    assert resolved_image.token_budget == 64 and resolved_image.ensemble_members == 1


def test_members_can_be_set_in_the_spec_and_impossible_folds_are_refused() -> None:
    from orca_engine.errors import SpecError

    one = resolve_spec({"dataset_id": "d", "finetune": {"ensemble_members": 1}}, _info())
    assert one.ensemble_members == 1 and "ensemble_members" not in one.reasons
    three = resolve_spec({"dataset_id": "d", "finetune": {"ensemble_members": 3}}, _info())
    assert three.ensemble_members == 3
    tiny = _info(splits={"train": 8, "val": 0, "test": 0})
    with pytest.raises(SpecError) as refused:
        resolve_spec({"dataset_id": "d", "finetune": {"ensemble_members": 2}}, tiny)
    assert refused.value.param == "finetune.ensemble_members"
    with pytest.raises(SpecError, match="ensemble_members"):
        resolve_spec({"dataset_id": "d", "finetune": {"ensemble_members": 11}}, _info())
