"""A real stack for fault tests: fresh PostgreSQL database, Redis db 12, the API under uvicorn and
one Celery worker process (tests/worker/harness.py), all stopped when the package's tests end."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from api.db import session_scope
from api.models import Job
from tests.worker.harness import ApiClient, RunningStack, create_api_key, running_stack

RELIABILITY_REDIS_DB = 12
HEARTBEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 8.0
MAX_ATTEMPTS = 2


@dataclass
class FaultStack(RunningStack):
    client: ApiClient

    log_tail: ClassVar[tuple[int, int]] = (60, 20)

    def job_row(self, job_id: str) -> dict[str, Any]:
        """The job as the database has it (status, attempts, worker, error, metrics)."""
        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return {
                "status": job.status,
                "stage": job.stage,
                "attempts": job.attempts,
                "worker_id": job.worker_id,
                "error": job.error,
                "metrics": job.metrics,
                "model_id": job.model_id,
            }


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    with running_stack(
        tmp_path_factory,
        "fault",
        redis_db=RELIABILITY_REDIS_DB,
        worker_heartbeat_seconds=str(HEARTBEAT_SECONDS),
        worker_lost_after_seconds=str(LOST_AFTER_SECONDS),
        job_max_attempts=str(MAX_ATTEMPTS),
        max_concurrent_jobs_per_tenant="20",
    ) as running:
        client = ApiClient(running.url, create_api_key(running.database_url, "faults"))
        yield FaultStack(**vars(running), client=client)
