"""End-to-end fixtures: the production stack (PostgreSQL + Redis db 12 + uvicorn + a Celery
worker, all real processes) shared by the package's tests and torn down after them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.worker.harness import ApiClient, RunningStack, create_api_key, running_stack

E2E_REDIS_DB = 12


@dataclass
class ProductionStack(RunningStack):
    client: ApiClient


@pytest.fixture(scope="package")
def production_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    # Like a machine without GPUs: one worker takes both queues.
    with running_stack(
        tmp_path_factory,
        "e2e",
        redis_db=E2E_REDIS_DB,
        queues="cpu,gpu",
        worker_heartbeat_seconds="2",
    ) as running:
        client = ApiClient(running.url, create_api_key(running.database_url, "e2e"))
        yield ProductionStack(**vars(running), client=client)
