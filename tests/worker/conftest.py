"""A real service stack for worker tests: PostgreSQL (fresh database), Redis (db 11), the API
under uvicorn and one Celery worker process, all torn down when the package's tests end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.worker.harness import ApiClient, RunningStack, create_api_key, running_stack

WORKER_TESTS_REDIS_DB = 11
HEARTBEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 8.0


@dataclass
class Stack(RunningStack):
    client: ApiClient


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory,
        "worker",
        redis_db=WORKER_TESTS_REDIS_DB,
        worker_heartbeat_seconds=str(HEARTBEAT_SECONDS),
        worker_lost_after_seconds=str(LOST_AFTER_SECONDS),
        job_max_attempts="3",
        max_concurrent_jobs_per_tenant="20",
    ) as running:
        client = ApiClient(running.url, create_api_key(running.database_url, "workers"))
        yield Stack(**vars(running), client=client)
