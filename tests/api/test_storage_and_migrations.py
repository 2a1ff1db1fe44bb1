"""Storage invariants, migrations on PostgreSQL and SQLite, and the no-torch rule for the API."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from api.db import get_engine, run_migrations, session_scope
from api.models import Base, Tenant
from api.storage import BlobTooLarge, LocalStorage

REPO = Path(__file__).resolve().parents[2]


def test_put_stream_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = storage.put_stream([b"abc", b"def"], ext="npz", max_bytes=10)
    second = storage.put_stream([b"abcdef"], ext="npz", max_bytes=10)
    assert first == second
    assert first.key == f"datasets/{first.sha256[:2]}/{first.sha256}.npz"
    assert first.path.read_bytes() == b"abcdef" and first.bytes == 6
    assert list((tmp_path / "tmp").iterdir()) == []


def test_put_stream_over_the_limit_keeps_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    produced = []

    def chunks():  # type: ignore[no-untyped-def]
        for index in range(100):
            produced.append(index)
            yield b"x" * 10

    with pytest.raises(BlobTooLarge):
        storage.put_stream(chunks(), ext="csv", max_bytes=25)
    assert len(produced) == 3  # stopped at the first chunk past the limit
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    for key in ("../x", "/etc/passwd", "datasets/../../x", ""):
        with pytest.raises(ValueError):
            storage.path_for(key)
    with pytest.raises(ValueError):
        storage.model_dir("../evil")
    assert storage.job_workdir("job_1").is_dir()


def test_postgres_schema_matches_the_models(database_url: str) -> None:
    with get_engine(database_url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_sqlite_migrates_and_keeps_utc_timestamps(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'orca.db'}"
    run_migrations(url)
    run_migrations(url)  # idempotent
    engine = get_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with session_scope(url) as session:
        session.add(Tenant(id="ten_1", name="t"))
    with session_scope(url) as session:
        tenant = session.get(Tenant, "ten_1")
        assert tenant is not None and isinstance(tenant.created_at, datetime)
        assert (
            tenant.created_at.utcoffset() is not None
            and tenant.created_at.utcoffset().total_seconds() == 0
        )


def test_api_requests_do_not_import_torch(tmp_path: Path, gunpoint_npz: Path) -> None:
    """Uploads, validation, job specs and the app itself stay torch-free (SPEC layering)."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from api.config import Settings
from api.db import run_migrations, session_scope
from api.main import create_app
from api.security import create_key
url = "sqlite:///{tmp_path}/t.db"
run_migrations(url)
with session_scope(url) as s:
    key = create_key(s, "t")
settings = Settings(_env_file=None, data_dir="{tmp_path}/var", database_url=url)
client = TestClient(create_app(settings))
h = {{"Authorization": "Bearer " + key}}
with open("{gunpoint_npz}", "rb") as f:
    r = client.post("/v1/datasets", headers=h, files={{"file": ("g.npz", f)}})
assert r.status_code == 201, r.text
assert client.get("/v1/datasets", headers=h).status_code == 200
assert client.get("/openapi.json").status_code == 200
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "timm", "ot"))
assert not heavy, heavy[:5]
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
