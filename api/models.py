"""SQLAlchemy 2 models: tenants, API keys, datasets, jobs, job events, fine-tuned models,
dataset analyses.

IDs are time-ordered strings (``<prefix>_<ms timestamp hex><random hex>``) so ``ORDER BY id DESC`` is
newest first and a list cursor (``after``) is just the last id of the previous page.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id(prefix: str) -> str:
    """A sortable unique id: prefix, 12 hex digits of milliseconds, 12 random hex digits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


#: What every id made by :func:`new_id` looks like; anything else cannot name an object.
ID_PATTERN = r"^[A-Za-z0-9_]{1,64}$"
_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def looks_like_id(value: str) -> bool:
    """True when ``value`` could be an id of ours (checked before it reaches the database, which
    refuses some strings outright, e.g. ones with NUL characters)."""
    return 0 < len(value) <= 64 and set(value) <= _ID_CHARACTERS


def utcnow() -> datetime:
    """Timezone-aware now in UTC (every timestamp column stores and returns these)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on PostgreSQL and on SQLite.

    SQLite has no timezone type and hands back naive values; without this, comparing a stored
    heartbeat with ``utcnow()`` would raise on SQLite and not on PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the full key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so an operator can tell keys apart when revoking.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # npz | csv | parquet
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(500))
    label_column: Mapped[str | None] = mapped_column(String(200), default=None)
    # orca_engine.data.DatasetInfo.to_dict(): shapes, splits, inferred task type, classes.
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # {"errors": [], "warnings": [...]} from validation.
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Soft delete: jobs and models keep pointing at the row; the blob is removed when no live
    # row references its sha256 any more. Deleted rows answer 404.
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_idempotency"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    # The spec as submitted (validated) and as resolved by the engine (every `auto` made concrete).
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    resolved_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # queued | running | cancelling | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    # prepare | align | refine | evaluate | export
    stage: Mapped[str | None] = mapped_column(String(16), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    # {"val": {...}, "test": {...}, "alignment": {"before": x, "after": y}, "train": {...}}
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # {"code": ..., "message": ...} when failed
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    model_id: Mapped[str | None] = mapped_column(String(40), default=None)
    queue: Mapped[str] = mapped_column(String(16), default="cpu")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    # Integer ids: monotonic, used as SSE event ids (Last-Event-ID) and as the page cursor.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # log | stage | progress | metric | choice | error | status
    kind: Mapped[str] = mapped_column(String(16), default="log")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    # Where the bundle dir lives in storage (model.safetensors, config.json, metrics.json, ...).
    storage_key: Mapped[str] = mapped_column(String(500))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    task_spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetAnalysis(Base):
    """A transferability analysis of a dataset: which backbone/source pair suits it (issue 7).

    Runs on a worker (``orca.analyze_dataset``); ``result`` is the engine's
    ``AnalysisResult.to_dict()`` once it succeeded. The latest succeeded one per dataset is what
    jobs with ``backbone: auto`` / ``alignment.source: auto`` choose from.
    """

    __tablename__ = "dataset_analyses"
    __table_args__ = (Index("ix_dataset_analyses_dataset_id_id", "dataset_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("an"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    # queued | running | succeeded | failed
    status: Mapped[str] = mapped_column(String(16), default="queued")
    queue: Mapped[str] = mapped_column(String(16), default="cpu")
    # The request as validated (candidates, distance, sample size, epochs, seed).
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # {"code": ..., "message": ...} when failed
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
