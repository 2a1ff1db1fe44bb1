"""A job that is running when its database and broker go away finishes, with every event kept.

The worker reaches PostgreSQL through a loopback TCP relay that the test cuts (every connection
closed, new ones refused) and restores, and its broker is a redis-server of our own (no
persistence, like our compose file) that the test stops and starts again on the same port. The
shared services on 5432/6379 are never touched. The API talks to the database directly, so the
test can watch the job throughout. The reaper is held off (``worker_lost_after_seconds`` 600):
these outages must be ridden out by the running worker itself.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.test_service_faults import TcpRelay, own_redis_server
from tests.worker.harness import (
    ApiClient,
    Service,
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

OUTAGE_SECONDS = 4.0
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class OutageStack:
    client: ApiClient
    api: Service
    worker: Service
    relay: TcpRelay
    start_redis: Callable[[], subprocess.Popen[bytes]]
    redis_server: subprocess.Popen[bytes]
    dataset_id: str

    def logs(self) -> str:
        return f"--- worker ---\n{self.worker.tail(80)}\n--- api ---\n{self.api.tail(20)}"

    def stop_redis(self) -> None:
        self.redis_server.terminate()
        self.redis_server.wait(timeout=10)

    def restart_redis(self) -> None:
        self.redis_server = self.start_redis()

    def create_refine_job(self, epochs: int) -> str:
        """A job that spends ~0.25 s per fine-tuning epoch, one event each, and no alignment."""
        spec = tiny_spec(
            self.dataset_id,
            alignment={"distance": "none", "epochs": 0},
            # one model: its epochs form one numbered sequence that the log check can follow
            finetune={
                "epochs": epochs,
                "batch_size": 16,
                "early_stopping_patience": 0,
                "ensemble_members": 1,
            },
        )
        return str(self.client.create_job(spec)["id"])

    def wait_until_refining(self, job_id: str, *, below_progress: float) -> None:
        def refining() -> bool:
            job = self.client.job(job_id)
            assert job["status"] not in TERMINAL, (job, self.logs())
            return job["stage"] == "refine" and 0 < job["progress"] < below_progress

        wait_for(refining, timeout=120, interval=0.1, what=f"job {job_id} to be refining")


@contextlib.contextmanager
def outage_stack(tmp_path: Path) -> Iterator[OutageStack]:
    """API (direct database) and one worker (database through the relay, our own redis)."""
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
        common = {"broker_url": f"redis://127.0.0.1:{redis_port}/0", "data_dir": str(tmp_path)}
        worker_env = service_env(
            database_url=database_url.replace(":5432/", f":{relay.port}/"),
            worker_heartbeat_seconds="1",
            worker_lost_after_seconds="600",
            queued_resend_after_seconds="3",
            **common,
        )
        port = free_port()
        api = start_api(service_env(database_url=database_url, **common), log_dir, port=port)
        worker: Service | None = None
        try:
            worker = start_worker(worker_env, log_dir, name="outage")
            client = ApiClient(f"http://127.0.0.1:{port}", create_api_key(database_url, "outage"))
            data = write_tiny_npz(tmp_path / "data.npz", n_train=400, n_test=40, length=64)
            dataset_id = str(client.upload(data)["id"])
            yield OutageStack(client, api, worker, relay, start_redis, redis_server, dataset_id)
        finally:
            if worker is not None:
                worker.stop()
            api.stop()
            relay.cut()


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


def assert_complete_event_log(events: list[dict[str, Any]], epochs: int) -> None:
    """Every epoch's event, written live or queued during the outage, is there once and in order."""
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    epoch_events = [
        e for e in events if e["kind"] == "metric" and e["message"].startswith("epoch ")
    ]
    assert [e["message"].split(":")[0] for e in epoch_events] == [
        f"epoch {n}/{epochs}" for n in range(1, epochs + 1)
    ]
    assert events[-1]["kind"] == "status" and events[-1]["message"].startswith("succeeded")


def test_a_running_job_survives_a_database_outage_and_a_broker_restart(tmp_path: Path) -> None:
    epochs = 60
    with outage_stack(tmp_path) as stack:
        client = stack.client
        job_id = stack.create_refine_job(epochs)
        stack.wait_until_refining(job_id, below_progress=0.6)
        # Queued behind the running job (one worker, one job at a time): its message waits in
        # Redis and dies with it.
        waiting_id = stack.create_refine_job(3)

        stack.relay.cut()
        stack.stop_redis()  # no persistence: the job's unacknowledged message is gone for good
        time.sleep(OUTAGE_SECONDS)
        job_during = client.job(job_id)
        assert job_during["status"] == "running", job_during
        stack.restart_redis()
        stack.relay.start()

        final = client.wait_for_status(job_id, TERMINAL, timeout=240, service_logs=stack.logs)
        assert final["status"] == "succeeded", (final, stack.logs())
        assert final["progress"] == 1.0 and final["model_id"]
        assert_complete_event_log(all_events(client, job_id), epochs)
        assert "database unreachable" in stack.worker.log()

        # The queued job's message was lost with the broker; the worker's sweep sent it again.
        waited = client.wait_for_status(waiting_id, TERMINAL, timeout=120, service_logs=stack.logs)
        assert waited["status"] == "succeeded", (waited, stack.logs())
        notes = [e["message"] for e in all_events(client, waiting_id)]
        assert any("sent again" in note for note in notes), notes

        # The worker reconnected to the restarted broker: a new job runs to the end.
        second = client.create_job(tiny_spec(stack.dataset_id, seed=1))
        done = client.wait_for_status(second["id"], TERMINAL, timeout=120, service_logs=stack.logs)
        assert done["status"] == "succeeded", (done, stack.logs())


def test_a_job_that_finishes_while_the_database_is_down_is_recorded_once_it_is_back(
    tmp_path: Path,
) -> None:
    epochs = 24
    with outage_stack(tmp_path) as stack:
        client = stack.client
        job_id = stack.create_refine_job(epochs)
        stack.wait_until_refining(job_id, below_progress=0.5)

        stack.relay.cut()
        # The engine finishes (refine, evaluate, export) while no write can reach the database.
        wait_for(
            lambda: f"job {job_id} stage: done" in stack.worker.log(),
            timeout=120,
            what=f"job {job_id} to finish in the engine\n{stack.logs()}",
        )
        time.sleep(2.0)  # the worker is now waiting to record the outcome
        assert client.job(job_id)["status"] == "running"
        stack.relay.start()

        final = client.wait_for_status(job_id, TERMINAL, timeout=120, service_logs=stack.logs)
        assert final["status"] == "succeeded", (final, stack.logs())
        assert final["model_id"] and final["metrics"]["test"]
        assert client.http.get(f"/v1/models/{final['model_id']}").status_code == 200
        events = all_events(client, job_id)
        assert_complete_event_log(events, epochs)
        assert [e["message"] for e in events if e["kind"] == "stage"][-1].startswith("done")
