"""Property-based fuzzing of every operation in /openapi.json with a valid API key (schemathesis).

The app runs in-process (ASGI) on the test PostgreSQL database with Redis db 10 as its broker.
Each operation gets schema-conforming ("positive") and schema-violating ("negative") cases; every
response must be a non-5xx, with a status code, content type, headers and body that the OpenAPI
document declares. Derandomized, so a failure reproduces on the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.config import Settings
from api.main import create_app
from tests.api.helpers import upload

FUZZ_REDIS_URL = "redis://127.0.0.1:6379/10"
# Per operation and generation mode; operations with tiny input spaces stop earlier by themselves.
MAX_EXAMPLES = 45
MIN_TOTAL_CASES = 1000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture()
def fuzz_app(make_settings: Callable[..., Settings]) -> Iterator[FastAPI]:
    broker = redis.Redis.from_url(FUZZ_REDIS_URL)
    broker.flushdb()
    settings = make_settings(
        broker_url=FUZZ_REDIS_URL,
        broker_timeout_seconds=0.5,
        max_concurrent_jobs_per_tenant=1000,
        predict_rate_per_minute=100_000,
    )
    yield create_app(settings)
    broker.flushdb()
    broker.close()


def test_fuzz_every_operation_gives_no_5xx_and_matches_the_schema(
    fuzz_app: FastAPI,
    auth: dict[str, str],
    gunpoint_npz: Path,
) -> None:
    from fastapi.testclient import TestClient

    with TestClient(fuzz_app) as client:
        # One real dataset, so generated ids are not the only thing the list endpoints return.
        assert upload(client, auth, gunpoint_npz).status_code == 201
        schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
        counted: dict[str, int] = {}
        operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
        assert len(operations) >= 15, [op.label for op in operations]

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz_operation(operation, mode, auth, counted)

    total = sum(counted.values())
    print(f"schemathesis: {total} cases over {len(counted)} operations: {counted}")
    assert total >= MIN_TOTAL_CASES, (total, counted)


def _fuzz_operation(
    operation: Any, mode: GenerationMode, auth: dict[str, str], counted: dict[str, int]
) -> None:
    try:
        strategy = operation.as_strategy(generation_mode=mode)
    except Exception:  # an operation without anything to negate has no negative strategy
        if mode is GenerationMode.NEGATIVE:
            return
        raise

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    def run(case: Any) -> None:
        counted[operation.label] = counted.get(operation.label, 0) + 1
        case.call_and_validate(headers=dict(auth), checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        # Nothing to negate (no parameters, no body): the positive pass covered it.
        if mode is not GenerationMode.NEGATIVE:
            raise
