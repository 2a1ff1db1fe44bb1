"""Datasets: validate a stored upload, record it, list, get, delete (soft, blob when unused)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import anyio
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.config import Settings
from api.errors import ApiError, not_found
from api.models import Dataset, Job, looks_like_id, utcnow
from api.services.pagination import fetch_page
from api.storage import LocalStorage
from api.uploads import FILE_FIELD, ReceivedUpload
from orca_engine.data import Limits, Report, inspect_file

logger = logging.getLogger(__name__)

ACTIVE_JOB_STATUSES = ("queued", "running", "cancelling")


def upload_limits(settings: Settings) -> Limits:
    """The engine's validation limits from the service settings."""
    return Limits(
        max_members=settings.max_npz_members,
        max_decompressed_bytes=settings.max_decompressed_bytes,
        max_rows=settings.max_csv_rows,
        max_columns=settings.max_csv_columns,
    )


_validation_limiters: dict[int, anyio.CapacityLimiter] = {}
_validation_limiters_lock = threading.Lock()


def validation_limiter(settings: Settings) -> anyio.CapacityLimiter:
    """The process-wide bound on uploads validated at once (``max_concurrent_validations``).

    Validation scans the whole upload, so each one running costs memory and CPU; with this limit
    concurrent uploads queue for a slot instead of all scanning together. Waiting happens on the
    event loop, not in a worker thread.
    """
    with _validation_limiters_lock:
        limiter = _validation_limiters.get(settings.max_concurrent_validations)
        if limiter is None:
            limiter = anyio.CapacityLimiter(settings.max_concurrent_validations)
            _validation_limiters[settings.max_concurrent_validations] = limiter
        return limiter


def _report_is_size_refusal(report: Report) -> bool:
    # The engine flags decompressed-size refusals; a member-count refusal is a size limit too.
    if getattr(report, "too_large", False):
        return True
    return any(
        issue.field == FILE_FIELD and "members" in issue.message and "at most" in issue.message
        for issue in report.errors
    )


def blob_in_use(*, db_session: Session, sha256: str, exclude_id: str | None = None) -> bool:
    """True when a live dataset row (any tenant) still references the blob with this hash."""
    query = select(func.count()).where(Dataset.sha256 == sha256, Dataset.deleted_at.is_(None))
    if exclude_id is not None:
        query = query.where(Dataset.id != exclude_id)
    return bool(db_session.scalar(query))


def tenant_storage_bytes(*, db_session: Session, tenant_id: str) -> int:
    """Bytes of live datasets a tenant has uploaded."""
    total = db_session.scalar(
        select(func.coalesce(func.sum(Dataset.bytes), 0)).where(
            Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None)
        )
    )
    return int(total or 0)


def _discard_blob(*, db_session: Session, storage: LocalStorage, upload: ReceivedUpload) -> None:
    if not blob_in_use(db_session=db_session, sha256=upload.blob.sha256):
        storage.delete(upload.blob.key)


def register_upload(
    *,
    db_session: Session,
    storage: LocalStorage,
    settings: Settings,
    tenant_id: str,
    upload: ReceivedUpload,
) -> Dataset:
    """Validate a stored upload with the engine and record it; on any refusal the blob goes
    (unless another dataset shares it) and no row is written. Blocking: run it in a thread,
    holding a slot of :func:`validation_limiter`."""
    try:
        used = tenant_storage_bytes(db_session=db_session, tenant_id=tenant_id)
        if used + upload.blob.bytes > settings.max_storage_bytes_per_tenant:
            raise ApiError(
                413,
                "storage_quota_exceeded",
                f"this upload would take your datasets to {used + upload.blob.bytes} bytes, over "
                f"the quota of {settings.max_storage_bytes_per_tenant}; delete datasets first",
                param=FILE_FIELD,
            )
        label_column = upload.fields.get("label_column") or None
        info, report = inspect_file(
            upload.blob.path,
            filename=upload.filename,
            label_column=label_column,
            limits=upload_limits(settings),
        )
        if info is None or not report.ok:
            status = 413 if _report_is_size_refusal(report) else 422
            raise ApiError(
                status,
                "dataset_too_large" if status == 413 else "dataset_invalid",
                report.summary() if report.errors else "the dataset could not be read",
                param=FILE_FIELD,
                extra={"report": report.to_dict()},
            )
        dataset = Dataset(
            tenant_id=tenant_id,
            name=upload.fields.get("name") or upload.filename,
            filename=upload.filename,
            format=info.format,
            sha256=upload.blob.sha256,
            bytes=upload.blob.bytes,
            storage_key=upload.blob.key,
            label_column=label_column,
            info=info.to_dict(),
            report=report.to_dict(),
        )
        db_session.add(dataset)
        db_session.commit()
        return dataset
    except BaseException:
        db_session.rollback()
        _discard_blob(db_session=db_session, storage=storage, upload=upload)
        raise


def get_dataset(*, db_session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's live dataset, or 404 (also for another tenant's id)."""
    if not looks_like_id(dataset_id):
        raise not_found("dataset", dataset_id)
    dataset = db_session.scalar(
        select(Dataset).where(
            Dataset.id == dataset_id, Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None)
        )
    )
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def list_datasets(
    *, db_session: Session, tenant_id: str, limit: int, after: str | None
) -> tuple[Sequence[Dataset], bool]:
    """The tenant's live datasets, newest first."""
    query = select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None))
    return fetch_page(db_session, query, id_column=Dataset.id, limit=limit, after=after)


def active_jobs_using(*, db_session: Session, tenant_id: str, dataset_id: str) -> list[str]:
    """Ids of unfinished jobs that train on, or align towards, this dataset."""
    jobs = db_session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    )
    return [
        job.id
        for job in jobs
        if job.dataset_id == dataset_id
        or (job.spec or {}).get("alignment", {}).get("source") == dataset_id
    ]


def delete_dataset(
    *, db_session: Session, storage: LocalStorage, tenant_id: str, dataset_id: str
) -> None:
    """Delete a dataset (409 while an unfinished job uses it); the blob goes when unused."""
    dataset = get_dataset(db_session=db_session, tenant_id=tenant_id, dataset_id=dataset_id)
    users = active_jobs_using(db_session=db_session, tenant_id=tenant_id, dataset_id=dataset_id)
    if users:
        raise ApiError(
            409,
            "dataset_in_use",
            f"dataset {dataset_id} is used by unfinished job(s) {', '.join(users)}; "
            "cancel them or wait for them to finish",
            param="dataset_id",
        )
    dataset.deleted_at = utcnow()
    db_session.commit()
    if not blob_in_use(db_session=db_session, sha256=dataset.sha256):
        storage.delete(dataset.storage_key)
        logger.info("removed blob %s", dataset.storage_key)
