"""A job that is running when its database and broker go away finishes, with every event kept.

The worker reaches PostgreSQL through a loopback TCP relay that the test cuts (every connection
closed, new ones refused) and restores, and its broker is a redis-server of our own that the test
stops and starts again on the same port. The shared services on 5432/6379 are never touched. The
API talks to the database directly, so the test can watch the job throughout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.test_service_faults import TcpRelay, own_redis_server
from tests.worker.harness import (
    ApiClient,
    create_api_key,
    free_port,
    fresh_postgres_database,
    service_env,
    start_api,
    start_worker,
    tiny_spec,
    wait_for,
    write_tiny_npz,
)

pytestmark = pytest.mark.slow

EPOCHS = 60
OUTAGE_SECONDS = 4.0
TERMINAL = ("succeeded", "failed", "cancelled")


def all_events(client: ApiClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after is not None:
            params["after"] = after
        page = client.http.get(f"/v1/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def test_a_running_job_survives_a_database_outage_and_a_broker_restart(tmp_path: Path) -> None:
    redis_port = free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with (
        fresh_postgres_database("orca_o") as database_url,
        own_redis_server(redis_port, tmp_path) as start_redis,
    ):
        redis_server = start_redis()
        relay = TcpRelay(("127.0.0.1", 5432))
        relay.start()
        broker_url = f"redis://127.0.0.1:{redis_port}/0"
        common = {"broker_url": broker_url, "data_dir": str(tmp_path / "var")}
        api_env = service_env(database_url=database_url, **common)
        worker_env = service_env(
            database_url=database_url.replace(":5432/", f":{relay.port}/"),
            worker_heartbeat_seconds="1",
            # The outage must be survived by the running worker itself, not by the reaper.
            worker_lost_after_seconds="600",
            **common,
        )
        port = free_port()
        api = start_api(api_env, log_dir, port=port)
        worker = start_worker(worker_env, log_dir, name="outage")
        try:
            client = ApiClient(f"http://127.0.0.1:{port}", create_api_key(database_url, "outage"))

            def logs() -> str:
                return f"--- worker ---\n{worker.tail(80)}\n--- api ---\n{api.tail(20)}"

            data = write_tiny_npz(tmp_path / "data.npz", n_train=400, n_test=40, length=64)
            dataset_id = client.upload(data)["id"]
            spec = tiny_spec(
                dataset_id,
                alignment={"distance": "none", "epochs": 0},
                finetune={"epochs": EPOCHS, "batch_size": 16, "early_stopping_patience": 0},
            )
            job_id = client.create_job(spec)["id"]

            def refining() -> bool:
                job = client.job(job_id)
                assert job["status"] not in TERMINAL, (job, logs())
                return job["stage"] == "refine" and job["progress"] < 0.6

            wait_for(refining, timeout=120, interval=0.2, what=f"job {job_id} to be refining")

            relay.cut()
            redis_server.terminate()
            redis_server.wait(timeout=10)
            time.sleep(OUTAGE_SECONDS)
            job_during = client.job(job_id)
            assert job_during["status"] == "running", job_during
            start_redis()
            relay.start()

            final = client.wait_for_status(job_id, TERMINAL, timeout=240, service_logs=logs)
            assert final["status"] == "succeeded", (final, logs())
            assert final["progress"] == 1.0 and final["model_id"]
            # Each epoch's event, written or queued during the outage, is in the log in order.
            events = all_events(client, job_id)
            assert [e["id"] for e in events] == sorted(e["id"] for e in events)
            epochs = [
                e for e in events if e["kind"] == "metric" and e["message"].startswith("epoch ")
            ]
            assert [e["message"].split(":")[0] for e in epochs] == [
                f"epoch {n}/{EPOCHS}" for n in range(1, EPOCHS + 1)
            ]
            assert events[-1]["kind"] == "status" and events[-1]["message"].startswith("succeeded")
            assert "database unreachable" in worker.log()

            # The worker reconnected to the restarted broker: a new job runs to the end.
            second = client.create_job(tiny_spec(dataset_id, seed=1))
            done = client.wait_for_status(second["id"], TERMINAL, timeout=120, service_logs=logs)
            assert done["status"] == "succeeded", (done, logs())
        finally:
            worker.stop()
            api.stop()
            relay.cut()
