"""Jobs: creation + enqueue on the real broker, spec 422s, idempotency, limits, cancel, events, plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.db import session_scope
from api.models import Job, JobEvent
from tests.api.helpers import assert_envelope, queued_messages, upload


@pytest.fixture()
def dataset_id(client: TestClient, auth: dict[str, str], gunpoint_npz: Path) -> str:
    response = upload(client, auth, gunpoint_npz)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _set_job(database_url: str, job_id: str, **values: Any) -> None:
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for key, value in values.items():
            setattr(job, key, value)


def _add_events(
    database_url: str, job_id: str, events: list[tuple[str, str, dict[str, Any] | None]]
) -> None:
    with session_scope(database_url) as session:
        for kind, message, data in events:
            session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data))


def test_create_job_enqueues_on_the_broker(
    client: TestClient, auth: dict[str, str], dataset_id: str, broker: redis.Redis
) -> None:
    response = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id, "name": "gp"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["model_id"] is None
    assert job["queue"] == "cpu"  # no GPU worker listens on this broker
    assert (
        job["spec"]["dataset_id"] == dataset_id and job["spec"]["alignment"]["distance"] == "otdd"
    )
    assert job["metrics"] == {"val": {}, "test": {}, "alignment": {}}
    [message] = queued_messages(broker, "cpu")
    assert message["headers"]["task"] == "orca.run_job"
    assert message["headers"]["id"] == job["id"]
    assert message["body"][0] == [job["id"]]
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()
    assert [(e["kind"], e["data"]["status"]) for e in events["data"]] == [("status", "queued")]
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json() == job


def test_explicit_queue_is_honoured(
    client: TestClient, auth: dict[str, str], dataset_id: str, broker: redis.Redis
) -> None:
    response = client.post(
        "/v1/jobs", headers=auth, json={"dataset_id": dataset_id, "queue": "gpu"}
    )
    assert response.status_code == 201 and response.json()["queue"] == "gpu"
    assert len(queued_messages(broker, "gpu")) == 1 and queued_messages(broker, "cpu") == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"surprise": 1}, "surprise"),
        ({"finetune": {"lr": 5.0}}, "finetune.lr"),
        ({"finetune": {"epochs": "soon"}}, "finetune.epochs"),
        ({"finetune": {"learning_rate": 0.1}}, "finetune.learning_rate"),
        ({"alignment": {"distance": "kl"}}, "alignment.distance"),
        ({"seed": -1}, "seed"),
        ({"task": {"type": "regression", "metric": "accuracy"}}, "task.metric"),
        ({"task": {"type": "dense_regression"}}, "task.type"),
        ({"backbone": "/etc"}, "backbone"),
        ({"backbone": "hf:../../outside"}, "backbone"),
        ({"alignment": {"source": "dataset:/etc/passwd"}}, "alignment.source"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(
    client: TestClient,
    auth: dict[str, str],
    dataset_id: str,
    broker: redis.Redis,
    body: dict[str, Any],
    param: str,
) -> None:
    response = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id, **body})
    assert_envelope(response, 422, param=param)
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []
    assert queued_messages(broker) == []


def test_backbone_symlink_escaping_model_dirs_is_refused(
    client: TestClient, auth: dict[str, str], dataset_id: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (tmp_path / "models" / "sneaky").symlink_to(outside)
    response = client.post(
        "/v1/jobs",
        headers=auth,
        json={"dataset_id": dataset_id, "backbone": f"hf:{tmp_path / 'models' / 'sneaky'}"},
    )
    assert_envelope(response, 422, code="backbone_not_allowed", param="backbone")
    inside = tmp_path / "models" / "real"
    inside.mkdir()
    ok = client.post(
        "/v1/jobs", headers=auth, json={"dataset_id": dataset_id, "backbone": f"hf:{inside}"}
    )
    assert ok.status_code == 201, ok.text


def test_unknown_dataset_is_404_naming_dataset_id(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/jobs", headers=auth, json={"dataset_id": "ds_doesnotexist"})
    assert_envelope(response, 404, code="dataset_not_found", param="dataset_id")
    missing = client.post("/v1/jobs", headers=auth, json={})
    assert_envelope(missing, 422, param="dataset_id")


def test_idempotency_key(
    client: TestClient, auth: dict[str, str], dataset_id: str, broker: redis.Redis
) -> None:
    body = {"dataset_id": dataset_id, "seed": 3}
    headers = {**auth, "Idempotency-Key": "create-once"}
    first = client.post("/v1/jobs", headers=headers, json=body)
    assert first.status_code == 201
    # Same body written differently (defaults spelled out, other key order) is the same request.
    again = client.post(
        "/v1/jobs", headers=headers, json={"seed": 3, "queue": "auto", "dataset_id": dataset_id}
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/jobs", headers=auth).json()["data"]) == 1
    assert len(queued_messages(broker)) == 1
    conflict = client.post("/v1/jobs", headers=headers, json={**body, "seed": 4})
    assert_envelope(conflict, 409, code="idempotency_key_reused")
    other_key = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "another"}, json=body)
    assert other_key.status_code == 201 and other_key.json()["id"] != first.json()["id"]


def test_concurrent_job_limit_is_429(
    make_client: Callable[..., TestClient],
    auth: dict[str, str],
    gunpoint_npz: Path,
    broker: redis.Redis,
) -> None:
    client = make_client(max_concurrent_jobs_per_tenant=2)
    dataset = upload(client, auth, gunpoint_npz).json()["id"]
    for _ in range(2):
        assert (
            client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset}).status_code == 201
        )
    refused = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset})
    assert_envelope(refused, 429, code="too_many_jobs")
    assert int(refused.headers["retry-after"]) > 0
    first = client.get("/v1/jobs", headers=auth).json()["data"][-1]
    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth).status_code == 200
    assert client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset}).status_code == 201


def test_broker_down_is_503_and_leaves_no_job(
    make_client: Callable[..., TestClient],
    auth: dict[str, str],
    gunpoint_npz: Path,
    database_url: str,
) -> None:
    client = make_client(broker_url="redis://127.0.0.1:1/0", broker_timeout_seconds=0.5)
    dataset = upload(client, auth, gunpoint_npz).json()["id"]
    headers = {**auth, "Idempotency-Key": "retry-me"}
    response = client.post("/v1/jobs", headers=headers, json={"dataset_id": dataset})
    assert_envelope(response, 503, code="broker_unavailable")
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []
    with session_scope(database_url) as session:
        assert session.scalars(select(Job).where(Job.dataset_id == dataset)).all() == []


def test_cancel_semantics(
    client: TestClient, auth: dict[str, str], dataset_id: str, database_url: str
) -> None:
    queued = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    assert_envelope(
        client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth), 409, code="job_finished"
    )

    running = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()
    _set_job(database_url, running["id"], status="running", stage="align")
    cancelling = client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth).json()
    assert cancelling["status"] == "cancelling" and cancelling["finished_at"] is None
    assert (
        client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth).json()["status"]
        == "cancelling"
    )

    for status in ("succeeded", "failed"):
        finished = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()
        _set_job(database_url, finished["id"], status=status)
        assert_envelope(client.post(f"/v1/jobs/{finished['id']}/cancel", headers=auth), 409)
    assert_envelope(
        client.post("/v1/jobs/job_nope/cancel", headers=auth), 404, code="job_not_found"
    )


def test_dataset_delete_is_409_while_a_job_uses_it(
    client: TestClient, auth: dict[str, str], dataset_id: str, database_url: str
) -> None:
    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()
    for status in ("queued", "running", "cancelling"):
        _set_job(database_url, job["id"], status=status)
        assert_envelope(
            client.delete(f"/v1/datasets/{dataset_id}", headers=auth), 409, code="dataset_in_use"
        )
    _set_job(database_url, job["id"], status="succeeded")
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=auth).status_code == 204
    # The finished job still reads fine; new jobs cannot use the deleted dataset.
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["dataset_id"] == dataset_id
    assert_envelope(client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}), 404)


def test_job_pagination(client: TestClient, auth: dict[str, str], dataset_id: str) -> None:
    ids = [
        client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()["id"]
        for _ in range(3)
    ]
    page = client.get("/v1/jobs?limit=2", headers=auth).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get(f"/v1/jobs?limit=2&after={ids[1]}", headers=auth).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_events_paging_and_sse(
    client: TestClient, auth: dict[str, str], dataset_id: str, database_url: str
) -> None:
    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()
    _add_events(database_url, job["id"], [("log", f"line {i}", {"i": i}) for i in range(4)])
    first = client.get(f"/v1/jobs/{job['id']}/events?limit=3", headers=auth).json()
    assert [e["kind"] for e in first["data"]] == ["status", "log", "log"] and first["has_more"]
    ids = [e["id"] for e in first["data"]]
    assert ids == sorted(ids)
    rest = client.get(f"/v1/jobs/{job['id']}/events?limit=3&after={ids[-1]}", headers=auth).json()
    assert [e["message"] for e in rest["data"]] == ["line 2", "line 3"] and not rest["has_more"]
    assert_envelope(
        client.get(f"/v1/jobs/{job['id']}/events?after=-1", headers=auth), 422, param="after"
    )

    # SSE: the job finished, so the stream sends what is there (after Last-Event-ID) and ends.
    _add_events(database_url, job["id"], [("status", "succeeded", {"status": "succeeded"})])
    _set_job(database_url, job["id"], status="succeeded")
    sse_headers = {**auth, "Accept": "text/event-stream", "Last-Event-ID": str(ids[1])}
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=sse_headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    data = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert [d.get("message") for d in data[:-1]] == ["line 1", "line 2", "line 3", "succeeded"]
    assert data[-1] == {"status": "succeeded"}
    assert f"id: {ids[2]}" in text


def test_sse_follows_a_live_job(
    client: TestClient, auth: dict[str, str], dataset_id: str, database_url: str
) -> None:
    """Events written while the stream is open arrive, and the stream ends at a terminal state."""
    import threading
    import time

    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()

    def worker() -> None:
        time.sleep(0.3)
        _add_events(database_url, job["id"], [("stage", "align", {"stage": "align"})])
        time.sleep(0.3)
        _add_events(database_url, job["id"], [("status", "failed", {"status": "failed"})])
        _set_job(database_url, job["id"], status="failed")

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={**auth, "Accept": "text/event-stream"}
    ) as stream:
        text = "".join(stream.iter_text())
    thread.join()
    assert time.monotonic() - started < 10
    kinds = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("event:")
    ]
    assert kinds == ["status", "stage", "status", "end"]


def test_plots(
    client: TestClient, auth: dict[str, str], dataset_id: str, database_url: str
) -> None:
    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset_id}).json()
    base = f"/v1/jobs/{job['id']}/plots"
    assert_envelope(client.get(f"{base}/alignment.png", headers=auth), 404, code="plot_not_ready")
    assert_envelope(client.get(f"{base}/training.png", headers=auth), 404, code="plot_not_ready")
    assert_envelope(client.get(f"{base}/nonsense.png", headers=auth), 404, code="plot_not_found")
    _add_events(
        database_url,
        job["id"],
        [
            ("metric", f"align epoch {e}", {"stage": "align", "epoch": e, "distance": 2.0 / e})
            for e in range(1, 5)
        ]
        + [
            (
                "metric",
                f"epoch {e}",
                {
                    "stage": "refine",
                    "epoch": e,
                    "train_loss": 1 / e,
                    "val_loss": 1.2 / e,
                    "val_accuracy": 0.5 + e / 10,
                },
            )
            for e in range(1, 4)
        ],
    )
    for name in ("alignment", "training"):
        response = client.get(f"{base}/{name}.png", headers=auth)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG\r\n\x1a\n") and len(response.content) > 5000
    # Curves stored with the job win over events.
    _set_job(database_url, job["id"], metrics={"curves": {"alignment": [3.0, 2.0, 1.0]}})
    assert client.get(f"{base}/alignment.png", headers=auth).status_code == 200


def test_auto_routing_counts_only_workers_that_report_a_cuda_device() -> None:
    from api.queue import gpu_worker_in

    assert gpu_worker_in([{"gpu0@a": {"cuda_devices": 1}}, {"cpu@b": {"cuda_devices": 0}}])
    assert not gpu_worker_in([{"embedded@a": {"cuda_devices": 0}}])
    # a worker of an older release does not know the command
    assert not gpu_worker_in([{"old@a": {"error": "No such command"}}])
    assert not gpu_worker_in([]) and not gpu_worker_in(None)
