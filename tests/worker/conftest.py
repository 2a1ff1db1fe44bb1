"""A real service stack for worker tests: PostgreSQL (fresh database), Redis (db 11), the API
under uvicorn and one Celery worker process, all torn down when the package's tests end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.worker.harness import (
    ApiClient,
    Service,
    create_api_key,
    dedicated_redis_db,
    free_port,
    fresh_postgres_database,
    service_env,
    start_api,
    start_worker,
)

WORKER_TESTS_REDIS_DB = 11
HEARTBEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 8.0


@dataclass
class Stack:
    database_url: str
    broker_url: str
    data_dir: Path
    env: dict[str, str]
    api: Service
    worker: Service
    client: ApiClient

    def logs(self) -> str:
        return f"--- worker log ---\n{self.worker.tail(80)}\n--- api log ---\n{self.api.tail(30)}"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("orca-worker-data")
    log_dir = tmp_path_factory.mktemp("orca-worker-logs")
    with (
        fresh_postgres_database("orca_w") as database_url,
        dedicated_redis_db(WORKER_TESTS_REDIS_DB) as broker_url,
    ):
        env = service_env(
            database_url=database_url,
            broker_url=broker_url,
            data_dir=str(data_dir),
            worker_heartbeat_seconds=str(HEARTBEAT_SECONDS),
            worker_lost_after_seconds=str(LOST_AFTER_SECONDS),
            job_max_attempts="3",
            max_concurrent_jobs_per_tenant="20",
        )
        port = free_port()
        api = start_api(env, log_dir, port=port)
        worker = None
        try:
            worker = start_worker(env, log_dir, queues="cpu")
            client = ApiClient(f"http://127.0.0.1:{port}", create_api_key(database_url, "workers"))
            yield Stack(database_url, broker_url, data_dir, env, api, worker, client)
        finally:
            if worker is not None:
                worker.stop()
            api.stop()
