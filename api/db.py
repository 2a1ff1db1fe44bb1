"""Database engine, sessions and migrations.

One engine per database URL, created on first use (never at import time), so the API, the worker
and tests can point at different databases in the same process. SQLite (the embedded default)
gets WAL, a busy timeout and foreign keys; PostgreSQL goes through psycopg 3.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from api.config import get_settings

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def normalise_url(url: str) -> str:
    """Pin PostgreSQL URLs to the psycopg 3 driver (``postgresql://`` would pick psycopg2)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """A new engine for ``url`` with the per-dialect settings this service relies on."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: ``Settings.resolved_database_url``)."""
    url = normalise_url(url or get_settings().resolved_database_url)
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests call this before dropping their database)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


class _LazySessionMaker(sessionmaker[Session]):
    """A sessionmaker that binds to the settings' database when no ``bind`` is given."""

    def __call__(self, **local_kw: Any) -> Session:
        local_kw.setdefault("bind", get_engine())
        return super().__call__(**local_kw)


# `SessionLocal()` → a session on the configured database; `SessionLocal(bind=engine)` elsewhere.
SessionLocal = _LazySessionMaker(autoflush=False, expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    session = SessionLocal(bind=get_engine(url))
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: one session per request on the app's database; services commit."""
    settings = request.app.state.settings
    with SessionLocal(bind=get_engine(settings.resolved_database_url)) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def run_migrations(url: str | None = None) -> None:
    """``alembic upgrade head`` on ``url`` (default: the settings' database), programmatically."""
    from alembic import command
    from alembic.config import Config

    url = normalise_url(url or get_settings().resolved_database_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(ALEMBIC_INI.parent / "alembic"))
    # Passed as an attribute, not an ini option: ini interpolation would mangle '%' in passwords.
    config.attributes["url"] = url
    logger.info("migrating %s to head", parsed.render_as_string(hide_password=True))
    command.upgrade(config, "head")
