"""``ORCA_METRICS_PORT``: /metrics also served on an internal port, with current job counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.db import session_scope
from api.services.jobs import jobs_by_status
from tests.api.helpers import upload
from tests.worker.harness import free_port, write_tiny_npz


def job_gauge(text: str) -> dict[str, float]:
    return {
        sample.labels["state"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "orca_jobs"
    }


def test_metrics_port_serves_the_registry_with_job_counts_read_at_scrape_time(
    make_client: Callable[..., TestClient],
    broker: redis.Redis,
    auth: dict[str, str],
    database_url: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    client = make_client(metrics_port=port)
    internal = f"http://127.0.0.1:{port}/metrics"
    dataset = upload(client, auth, write_tiny_npz(tmp_path / "tiny.npz")).json()
    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": dataset["id"]})
    assert job.status_code == 201, job.text

    text = httpx.get(internal, timeout=10).text
    assert "orca_upload_bytes_total" in text and "orca_predict_seconds_bucket" in text
    with session_scope(database_url) as session:
        expected = jobs_by_status(db_session=session)
    assert expected.get("queued", 0) >= 1
    gauge = job_gauge(text)
    assert {state: n for state, n in gauge.items() if n} == {
        state: float(n) for state, n in expected.items() if n
    }

    client.__exit__(None, None, None)  # app shutdown closes the internal port
    with pytest.raises(httpx.TransportError):
        httpx.get(internal, timeout=2)
