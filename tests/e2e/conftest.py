"""End-to-end fixtures: the production stack (PostgreSQL + Redis db 12 + uvicorn + a Celery
worker, all real processes) shared by the package's tests and torn down after them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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

E2E_REDIS_DB = 12


@dataclass
class ProductionStack:
    database_url: str
    env: dict[str, str]
    api: Service
    worker: Service
    client: ApiClient

    def logs(self) -> str:
        return f"--- worker log ---\n{self.worker.tail(80)}\n--- api log ---\n{self.api.tail(30)}"


@pytest.fixture(scope="package")
def production_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    data_dir = tmp_path_factory.mktemp("orca-e2e-data")
    log_dir = tmp_path_factory.mktemp("orca-e2e-logs")
    with (
        fresh_postgres_database("orca_e2e") as database_url,
        dedicated_redis_db(E2E_REDIS_DB) as broker_url,
    ):
        env = service_env(
            database_url=database_url,
            broker_url=broker_url,
            data_dir=str(data_dir),
            worker_heartbeat_seconds="2",
        )
        port = free_port()
        api = start_api(env, log_dir, port=port)
        worker = None
        try:
            # Like a machine without GPUs: one worker takes both queues.
            worker = start_worker(env, log_dir, queues="cpu,gpu", name="e2e")
            client = ApiClient(f"http://127.0.0.1:{port}", create_api_key(database_url, "e2e"))
            yield ProductionStack(database_url, env, api, worker, client)
        finally:
            if worker is not None:
                worker.stop()
            api.stop()
