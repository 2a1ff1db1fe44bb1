"""Another tenant's objects answer 404 on every route, reads and writes alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from api.config import Settings
from api.db import session_scope
from api.models import Job, Model
from api.storage import LocalStorage
from tests.api.helpers import assert_envelope, upload


def test_tenant_b_sees_none_of_tenant_a(
    client: TestClient,
    settings: Settings,
    make_tenant: Callable[[], dict[str, str]],
    gunpoint_npz: Path,
    database_url: str,
) -> None:
    alice, bob = make_tenant(), make_tenant()
    dataset = upload(client, alice, gunpoint_npz).json()["id"]
    job = client.post("/v1/jobs", headers=alice, json={"dataset_id": dataset}).json()["id"]
    storage = LocalStorage(settings.resolved_storage_dir)
    with session_scope(database_url) as session:
        row = session.get(Job, job)
        assert row is not None
        model = Model(
            tenant_id=row.tenant_id,
            job_id=job,
            dataset_id=dataset,
            storage_key="",
            task_spec={},
            metrics={},
        )
        session.add(model)
        session.flush()
        model.storage_key = storage.model_key(model.id)
        bundle = storage.model_dir(model.id)
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text("{}")
        model_id = model.id

    attempts = [
        ("get", f"/v1/datasets/{dataset}", None),
        ("delete", f"/v1/datasets/{dataset}", None),
        ("get", f"/v1/jobs/{job}", None),
        ("post", f"/v1/jobs/{job}/cancel", None),
        ("get", f"/v1/jobs/{job}/events", None),
        ("get", f"/v1/jobs/{job}/plots/alignment.png", None),
        ("get", f"/v1/jobs/{job}/plots/training.png", None),
        ("get", f"/v1/models/{model_id}", None),
        ("get", f"/v1/models/{model_id}/download", None),
        ("post", f"/v1/models/{model_id}/predict", {"inputs": [[0.0] * 150]}),
        ("delete", f"/v1/models/{model_id}", None),
    ]
    for method, path, body in attempts:
        response = client.request(method, path, headers=bob, json=body)
        assert_envelope(response, 404)
    events = client.get(f"/v1/jobs/{job}/events", headers={**bob, "Accept": "text/event-stream"})
    assert_envelope(events, 404)
    # A job on someone else's dataset is refused the same way.
    assert_envelope(
        client.post("/v1/jobs", headers=bob, json={"dataset_id": dataset}), 404, param="dataset_id"
    )
    assert_envelope(
        client.post(
            "/v1/jobs", headers=bob, json={"dataset_id": dataset, "alignment": {"source": dataset}}
        ),
        404,
    )
    for resource in ("datasets", "jobs", "models"):
        assert client.get(f"/v1/{resource}", headers=bob).json() == {"data": [], "has_more": False}
    # Nothing of Alice's changed.
    assert client.get(f"/v1/datasets/{dataset}", headers=alice).status_code == 200
    assert client.get(f"/v1/jobs/{job}", headers=alice).json()["status"] == "queued"
    assert client.get(f"/v1/models/{model_id}", headers=alice).status_code == 200
    with session_scope(database_url) as session:
        assert session.scalar(select(Model).where(Model.id == model_id)) is not None
