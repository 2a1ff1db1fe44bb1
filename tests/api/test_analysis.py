"""Dataset transferability analysis over HTTP: 202 + enqueue on the real broker, the latest
analysis, 404s (unknown, never analysed, another tenant's) and 422s for bad requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from api.db import session_scope
from api.models import DatasetAnalysis
from tests.api.helpers import assert_envelope, queued_messages, upload


@pytest.fixture()
def dataset_id(client: TestClient, auth: dict[str, str], tmp_path: Path) -> str:
    path = tmp_path / "rows.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.normal(size=(30, 6)).astype("f4"), y_train=np.arange(30) % 2)
    response = upload(client, auth, path)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_analyze_answers_202_queued_and_enqueues_by_task_name(
    client: TestClient, auth: dict[str, str], dataset_id: str, broker: redis.Redis
) -> None:
    response = client.post(
        f"/v1/datasets/{dataset_id}/analyze",
        headers=auth,
        json={"sample_size": 64, "align_epochs": 3, "backbones": ["tiny-bert"]},
    )
    assert response.status_code == 202, response.text
    analysis = response.json()
    assert analysis["object"] == "analysis" and analysis["status"] == "queued"
    assert analysis["dataset_id"] == dataset_id and analysis["id"].startswith("an_")
    assert analysis["params"]["sample_size"] == 64 and analysis["params"]["distance"] == "otdd"
    assert analysis["ranking"] == [] and analysis["best"] is None
    [message] = queued_messages(broker, "cpu")
    assert message["headers"]["task"] == "orca.analyze_dataset"
    assert message["body"][0] == [analysis["id"]]

    latest = client.get(f"/v1/datasets/{dataset_id}/analysis", headers=auth)
    assert latest.status_code == 200 and latest.json()["id"] == analysis["id"]
    # An empty body takes every default; the newest analysis is the one GET answers with.
    again = client.post(f"/v1/datasets/{dataset_id}/analyze", headers=auth)
    assert again.status_code == 202, again.text
    assert again.json()["params"]["sample_size"] == 256
    assert (
        client.get(f"/v1/datasets/{dataset_id}/analysis", headers=auth).json()["id"]
        == (again.json()["id"])
    )


def test_a_finished_analysis_shows_its_ranking_without_curves(
    client: TestClient, auth: dict[str, str], dataset_id: str, database_url: str
) -> None:
    created = client.post(f"/v1/datasets/{dataset_id}/analyze", headers=auth).json()
    result = {
        "distance": "otdd",
        "seconds": 3.5,
        "best": {"backbone": "minilm-l6", "source": "english-text"},
        "candidates": [
            {"backbone": "minilm-l6", "source": "english-text", "status": "ok", "rank": 1,
             "before": 2.0, "after": 1.0, "score": 0.1, "curve": [2.0, 1.0]},
            {"backbone": "tiny-vit", "source": "natural-images", "status": "skipped",
             "rank": None, "reason": "needs allow_random_init"},
        ],
    }  # fmt: skip
    with session_scope(database_url) as session:
        row = session.get(DatasetAnalysis, created["id"])
        assert row is not None
        row.status, row.result = "succeeded", result
    shown = client.get(f"/v1/datasets/{dataset_id}/analysis", headers=auth).json()
    assert shown["status"] == "succeeded" and shown["seconds"] == 3.5
    assert shown["best"] == {"backbone": "minilm-l6", "source": "english-text"}
    assert [c["backbone"] for c in shown["ranking"]] == ["minilm-l6", "tiny-vit"]
    assert all("curve" not in c for c in shown["ranking"])


def test_never_analysed_unknown_and_foreign_datasets_are_404(
    client: TestClient,
    auth: dict[str, str],
    dataset_id: str,
    make_tenant: Callable[[], dict[str, str]],
) -> None:
    never = client.get(f"/v1/datasets/{dataset_id}/analysis", headers=auth)
    assert_envelope(never, 404, code="analysis_not_found")
    for bad in ("ds_000000000000000000000000", "not-an-id!"):
        assert_envelope(client.post(f"/v1/datasets/{bad}/analyze", headers=auth), 404)
        assert_envelope(client.get(f"/v1/datasets/{bad}/analysis", headers=auth), 404)
    bob = make_tenant()
    client.post(f"/v1/datasets/{dataset_id}/analyze", headers=auth)
    foreign = client.post(f"/v1/datasets/{dataset_id}/analyze", headers=bob, json={"x": 1})
    assert_envelope(foreign, 404, code="dataset_not_found")  # 404 even with a bad body
    assert_envelope(client.get(f"/v1/datasets/{dataset_id}/analysis", headers=bob), 404)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"sample_size": 501}, "sample_size", "invalid_value"),
        ({"align_epochs": 21}, "align_epochs", "invalid_value"),
        ({"distance": "none"}, "distance", "invalid_value"),
        ({"surprise": True}, "surprise", "unknown_field"),
        ({"sources": ["wikipedia"]}, "sources.0", "invalid_source"),
        ({"backbones": ["/etc/models/x"]}, "backbones.0", "backbone_not_allowed"),
        ([1, 2], None, "invalid_value"),
    ],
)
def test_bad_requests_are_422_naming_the_field(
    client: TestClient,
    auth: dict[str, str],
    dataset_id: str,
    body: object,
    param: str | None,
    code: str,
    broker: redis.Redis,
) -> None:
    response = client.post(f"/v1/datasets/{dataset_id}/analyze", headers=auth, json=body)
    assert_envelope(response, 422, code=code, param=param)
    assert queued_messages(broker, "cpu") == []


def test_sources_may_name_own_datasets_but_not_foreign_ones(
    client: TestClient,
    auth: dict[str, str],
    dataset_id: str,
    make_tenant: Callable[[], dict[str, str]],
    tmp_path: Path,
) -> None:
    ok = client.post(
        f"/v1/datasets/{dataset_id}/analyze", headers=auth, json={"sources": [dataset_id]}
    )
    assert ok.status_code == 202, ok.text
    bob = make_tenant()
    path = tmp_path / "bob.npz"
    np.savez(path, x_train=np.zeros((10, 3), "f4"), y_train=np.arange(10) % 2)
    bobs = upload(client, bob, path).json()["id"]
    refused = client.post(
        f"/v1/datasets/{bobs}/analyze", headers=bob, json={"sources": [dataset_id]}
    )
    assert_envelope(refused, 404, param="sources.0")
    not_json = client.post(
        f"/v1/datasets/{dataset_id}/analyze",
        headers={**auth, "Content-Type": "application/json"},
        content=b"{oops",
    )
    assert_envelope(not_json, 422)
