"""API test fixtures: a fresh PostgreSQL database per test session (migrated with Alembic),
Redis as the real broker, and one app + TestClient per test built from explicit Settings.

Every test gets its own tenants (unique names), so tests never see each other's rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from api.config import Settings
from api.db import dispose_engines, run_migrations, session_scope
from api.main import create_app
from api.security import create_key

PG_HOSTPORT = "127.0.0.1:5432"
PG_ADMIN_DB = "test"
# A Redis database of our own so worker tests (which run real consumers) never take our messages.
REDIS_URL = "redis://127.0.0.1:6379/13"
QUEUES = ("cpu", "gpu")


def _admin_connection() -> tuple[psycopg.Connection[Any], str]:
    errors = []
    for user in ("postgres", "root"):
        try:
            conn = psycopg.connect(
                f"postgresql://{user}@{PG_HOSTPORT}/{PG_ADMIN_DB}", autocommit=True
            )
            return conn, user
        except psycopg.OperationalError as exc:
            errors.append(f"{user}: {exc}")
    raise RuntimeError("PostgreSQL is not reachable at " + PG_HOSTPORT + ": " + "; ".join(errors))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A throwaway database, migrated to head, dropped at the end of the session."""
    admin, user = _admin_connection()
    name = f"orca_test_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{user}@{PG_HOSTPORT}/{name}"
    try:
        run_migrations(url)
        yield url
    finally:
        dispose_engines()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture()
def broker() -> Iterator[redis.Redis]:
    """The Redis database used as broker, with our queues emptied before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*QUEUES)
    yield client
    client.delete(*QUEUES)
    client.close()


@pytest.fixture()
def make_settings(database_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one test; keyword overrides change single values (limits, URLs)."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "database_url": database_url,
            "broker_url": REDIS_URL,
            "model_dirs": [tmp_path / "models"],
            "queue_inspect_timeout_seconds": 0.2,
            "events_poll_seconds": 0.05,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    (tmp_path / "models").mkdir(exist_ok=True)
    return build


@pytest.fixture()
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture()
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """A TestClient on a fresh app; keyword overrides go to its Settings."""
    clients: list[TestClient] = []

    def build(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture()
def client(make_client: Callable[..., TestClient], broker: redis.Redis) -> TestClient:
    return make_client()


@pytest.fixture()
def make_tenant(database_url: str) -> Callable[[], dict[str, str]]:
    """Creates a tenant with a fresh API key; returns its Authorization headers."""

    def build() -> dict[str, str]:
        with session_scope(database_url) as session:
            key = create_key(session, f"tenant-{secrets.token_hex(6)}")
        return {"Authorization": f"Bearer {key}"}

    return build


@pytest.fixture()
def auth(make_tenant: Callable[[], dict[str, str]]) -> dict[str, str]:
    return make_tenant()
