"""Jobs: create (validate, idempotency, per-tenant limit, enqueue), read, list, cancel, events.

Broker failure policy: the job row is committed before the task is sent (a worker must find it);
if the broker then refuses the message the row is deleted again and the client gets 503
``broker_unavailable``. No job is left ``queued`` with no task behind it, and retrying with the
same ``Idempotency-Key`` is safe (the key is free again).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.config import Settings
from api.errors import ApiError, not_found
from api.models import Job, JobEvent, Tenant, looks_like_id, utcnow
from api.queue import GPU_QUEUE, BrokerUnavailable, JobQueue
from api.services.datasets import ACTIVE_JOB_STATUSES, get_dataset
from api.services.pagination import fetch_page
from orca_engine.data import DatasetInfo
from orca_engine.errors import EngineError, SpecError
from orca_engine.specs import JobSpec, check_backbone_location, local_backbone_path, resolve_spec

logger = logging.getLogger(__name__)

TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")
DATASET_ID_PREFIX = "ds_"


def request_hash(spec: JobSpec) -> str:
    """A fingerprint of the validated spec (defaults filled, key order irrelevant)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_backbone_path(backbone: str, model_dirs: Sequence[Path]) -> None:
    """422 unless a local backbone resolves (symlinks followed) inside an allowed model dir.

    The rule is the engine's own (:func:`orca_engine.specs.check_backbone_location`), so the API
    refuses exactly what a worker would; the API also refuses a path that does not exist.
    """
    path = local_backbone_path(backbone)
    if path is None:
        return
    try:
        check_backbone_location(backbone, model_dirs)
    except SpecError as exc:
        message = exc.message if model_dirs else f"{exc.message} (set ORCA_MODEL_DIRS)"
        raise ApiError(422, "backbone_not_allowed", message, param="backbone") from exc
    resolved = path.expanduser().resolve()
    if not resolved.exists():
        raise ApiError(
            422,
            "backbone_not_found",
            f"backbone path {str(path)!r} does not exist",
            param="backbone",
        )


def _check_source(*, db_session: Session, tenant_id: str, source: str) -> None:
    if source.startswith("dataset:"):
        raise ApiError(
            422,
            "invalid_source",
            "name an uploaded dataset by its id (ds_...), not by a path",
            param="alignment.source",
        )
    if source.startswith(DATASET_ID_PREFIX):
        try:
            get_dataset(db_session=db_session, tenant_id=tenant_id, dataset_id=source)
        except ApiError as exc:
            exc.param = "alignment.source"
            raise


def get_job(*, db_session: Session, tenant_id: str, job_id: str, for_update: bool = False) -> Job:
    """The tenant's job, or 404 (also for another tenant's id)."""
    if not looks_like_id(job_id):
        raise not_found("job", job_id)
    query = select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    job = db_session.scalar(query)
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(
    *, db_session: Session, tenant_id: str, limit: int, after: str | None
) -> tuple[Sequence[Job], bool]:
    """The tenant's jobs, newest first."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    return fetch_page(db_session, query, id_column=Job.id, limit=limit, after=after)


def add_event(
    *,
    db_session: Session,
    job_id: str,
    message: str,
    kind: str = "log",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Append an event to a job's log (flushed; the caller commits)."""
    event = JobEvent(job_id=job_id, kind=kind, message=message, data=data)
    db_session.add(event)
    db_session.flush()
    return event


def _find_idempotent(
    *, db_session: Session, tenant_id: str, idempotency_key: str, fingerprint: str
) -> Job | None:
    job = db_session.scalar(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
    )
    if job is not None and job.request_hash != fingerprint:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body",
            param="Idempotency-Key",
        )
    return job


def create_job(
    *,
    db_session: Session,
    settings: Settings,
    queue: JobQueue,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate ``spec`` against its dataset, record the job and enqueue it.

    Returns ``(job, created)``; ``created`` is False when an earlier request with the same
    ``idempotency_key`` and body already made the job.
    """
    fingerprint = request_hash(spec)
    if idempotency_key:
        existing = _find_idempotent(
            db_session=db_session,
            tenant_id=tenant_id,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
        if existing is not None:
            return existing, False

    try:
        dataset = get_dataset(
            db_session=db_session, tenant_id=tenant_id, dataset_id=spec.dataset_id
        )
    except ApiError as exc:
        exc.param = "dataset_id"
        raise
    check_backbone_path(spec.backbone, settings.model_dirs)
    _check_source(db_session=db_session, tenant_id=tenant_id, source=spec.alignment.source)

    queue_name = queue.pick_queue(spec.queue)
    try:
        resolve_spec(
            spec,
            DatasetInfo.from_dict(dataset.info),
            device="cuda" if queue_name == GPU_QUEUE else "cpu",
        )
    except EngineError as exc:
        raise ApiError(422, exc.code, exc.message, param=exc.param) from None

    # Serialise job creation per tenant (PostgreSQL row lock) so the concurrency limit holds.
    db_session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
    active = db_session.scalar(
        select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    )
    if (active or 0) >= settings.max_concurrent_jobs_per_tenant:
        retry_after = settings.job_limit_retry_after_seconds
        raise ApiError(
            429,
            "too_many_jobs",
            f"you already have {active} unfinished jobs (limit "
            f"{settings.max_concurrent_jobs_per_tenant}); retry when one finishes",
            headers={"Retry-After": str(retry_after)},
        )

    job = Job(
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        status="queued",
        queue=queue_name,
        idempotency_key=idempotency_key or None,
        request_hash=fingerprint,
    )
    db_session.add(job)
    try:
        db_session.flush()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race.
        db_session.rollback()
        if idempotency_key:
            existing = _find_idempotent(
                db_session=db_session,
                tenant_id=tenant_id,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            )
            if existing is not None:
                return existing, False
        raise
    add_event(
        db_session=db_session,
        job_id=job.id,
        kind="status",
        message=f"queued on {queue_name}",
        data={"status": "queued", "queue": queue_name},
    )
    db_session.commit()

    try:
        queue.enqueue(job.id, queue_name)
    except BrokerUnavailable:
        db_session.delete(job)
        db_session.commit()
        raise ApiError(
            503,
            "broker_unavailable",
            "the job queue is unreachable; no job was created, retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    logger.info("job %s queued on %s for tenant %s", job.id, queue_name, tenant_id)
    return job, True


def cancel_job(*, db_session: Session, queue: JobQueue, tenant_id: str, job_id: str) -> Job:
    """Queued → cancelled at once (task revoked); running → cancelling (the worker stops it);
    cancelling stays; a finished job is a 409."""
    job = get_job(db_session=db_session, tenant_id=tenant_id, job_id=job_id, for_update=True)
    if job.status in TERMINAL_JOB_STATUSES:
        raise ApiError(
            409, "job_finished", f"job {job_id} already finished ({job.status})", param="job_id"
        )
    if job.status == "queued":
        job.status = "cancelled"
        job.finished_at = utcnow()
        job.eta_seconds = None
        add_event(
            db_session=db_session,
            job_id=job.id,
            kind="status",
            message="cancelled before it started",
            data={"status": "cancelled"},
        )
        db_session.commit()
        queue.revoke(job.id)
    elif job.status == "running":
        job.status = "cancelling"
        add_event(
            db_session=db_session,
            job_id=job.id,
            kind="status",
            message="cancellation requested",
            data={"status": "cancelling"},
        )
        db_session.commit()
    else:
        db_session.commit()
    return job


def list_events(
    *, db_session: Session, job_id: str, limit: int, after: int | None
) -> tuple[Sequence[JobEvent], bool]:
    """A job's events in order (ascending ids) after the cursor."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    return fetch_page(
        db_session, query, id_column=JobEvent.id, limit=limit, after=after, ascending=True
    )


def jobs_by_status(*, db_session: Session) -> dict[str, int]:
    """Job counts per status across tenants (for the Prometheus gauge)."""
    rows = db_session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples()
    return {status: int(count) for status, count in rows}
