"""The Celery tasks: ``orca.run_job(job_id)`` and ``orca.analyze_dataset(analysis_id)``.

Thin and idempotent: it claims the job row (so a duplicate delivery is harmless), runs
``orca_engine.pipeline.run_job`` with database-backed callbacks, and records the outcome. A
redelivered job (worker crash, reaper requeue) resumes from the engine's stage checkpoints under the
job's work dir. The model row appears only once its bundle is complete on disk.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from api.config import Settings, get_settings
from api.db import session_scope
from api.models import Dataset, DatasetAnalysis, Job, JobEvent, Model, new_id
from api.storage import Storage, get_storage
from orca_engine.errors import EngineError, JobCancelled, SpecError
from worker.celery_app import TASK_ANALYZE_DATASET, TASK_RUN_JOB, app
from worker.heartbeat import (
    Heartbeat,
    as_utc,
    this_worker_id,
    utc_now,
    worker_process_is_dead,
)
from worker.reporting import DbCallbacks, json_safe

logger = logging.getLogger("orca.worker")

#: how long a finished job waits for an unreachable database before leaving it to the reaper
DATABASE_WAIT_SECONDS = 60.0

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

_Result = TypeVar("_Result")


def backoff_delays(max_seconds: float) -> Iterator[float]:
    """Waits of 0.5 s doubling to at most 8 s, while sleeping the next one stays within
    ``max_seconds`` from now: the one retry schedule for every wait on the database."""
    deadline = time.monotonic() + max_seconds
    delay = 0.5
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(delay * 2, 8.0)


def retry_while_database_unreachable(
    write: Callable[[], _Result], *, what: str, max_seconds: float = DATABASE_WAIT_SECONDS
) -> _Result:
    """Run the transaction ``write``, retrying with backoff while the database is unreachable.

    Only connection failures (``OperationalError``/``InterfaceError``) are retried, for up to
    ``max_seconds``; the failed transaction was rolled back, so ``write`` starts afresh. ``write``
    must cope with a commit that reached the database although its acknowledgement did not.
    """
    for delay in backoff_delays(max_seconds):
        try:
            return write()
        except (OperationalError, InterfaceError) as error:
            logger.warning(
                "database unreachable while %s; retrying in %.1f s (%s)",
                what,
                delay,
                type(error.orig).__name__ if error.orig is not None else type(error).__name__,
            )
        time.sleep(delay)
    return write()  # the last try: its error, if any, goes to the caller


class ClaimOutcome(enum.Enum):
    RUN = "run"
    SKIP = "skip"


@dataclass
class ClaimedJob:
    """What the task needs from the database to run a job, read while claiming it."""

    job_id: str
    tenant_id: str
    attempts: int
    spec: dict[str, Any]
    queue: str
    name: str | None
    dataset_id: str
    dataset_path: Path
    dataset_filename: str
    label_column: str | None
    source_paths: dict[str, Path] = field(default_factory=dict)
    #: the dataset's latest succeeded transferability analysis, for backbone/source "auto"
    stored_analysis: dict[str, Any] | None = None


@app.task(name=TASK_RUN_JOB, bind=True, acks_late=True)
def run_job_task(self: Task, job_id: str) -> str:
    """Run one job to a terminal state (or skip it when it is not ours to run)."""
    return execute_job(job_id)


def execute_job(job_id: str, *, settings: Settings | None = None) -> str:
    """Claim, run and record job ``job_id``; returns the status it was left in."""
    settings = settings or get_settings()
    worker_id = this_worker_id()
    # A delivery during a database outage must not drop the job (it would stay queued forever).
    claimed = retry_while_database_unreachable(
        lambda: claim_job(job_id, worker_id=worker_id, settings=settings),
        what=f"claiming job {job_id}",
    )
    if claimed is None:
        return "skipped"
    storage = get_storage()
    workdir = Path(storage.job_workdir(job_id))
    workdir.mkdir(parents=True, exist_ok=True)
    bundle_dir = workdir / "bundle"
    heartbeat = Heartbeat(job_id, worker_id, interval_seconds=settings.worker_heartbeat_seconds)
    callbacks = DbCallbacks(job_id, workdir=workdir, ownership_lost=heartbeat.lost)
    try:
        with heartbeat:
            result = _run_pipeline(claimed, settings, workdir, bundle_dir, callbacks)
    except JobCancelled:
        _free_device_memory()
        if heartbeat.lost.is_set():
            logger.warning("job %s was taken over by another worker; leaving it", job_id)
            return "lost"
        _wait_for_database(callbacks)
        if _finish(job_id, worker_id, status="cancelled", message="cancelled"):
            shutil.rmtree(workdir, ignore_errors=True)
        return "cancelled"
    except EngineError as error:
        _free_device_memory()
        engine_error: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.param:
            engine_error["param"] = error.param
        _wait_for_database(callbacks)
        if _finish(
            job_id,
            worker_id,
            status="failed",
            error=engine_error,
            message=f"failed: {error.message}",
        ):
            shutil.rmtree(workdir, ignore_errors=True)
        return "failed"
    except Exception as error:
        _free_device_memory()
        logger.exception("job %s failed with an internal error", job_id)
        if _is_out_of_memory(error):
            code, message = (
                "out_of_memory",
                "the device ran out of memory; try a smaller finetune.batch_size or "
                "alignment.max_samples",
            )
        else:
            code = "internal_error"
            message = (
                f"internal error in the worker ({type(error).__name__}); "
                "the operators have the details in the worker log"
            )
        _wait_for_database(callbacks)
        if _finish(
            job_id,
            worker_id,
            status="failed",
            error={"code": code, "message": message},
            message=f"failed: {message}",
        ):
            shutil.rmtree(workdir, ignore_errors=True)
        return "failed"
    if heartbeat.lost.is_set():
        return "lost"
    _wait_for_database(callbacks)
    status = _record_success(claimed, worker_id, result, bundle_dir, storage)
    shutil.rmtree(workdir, ignore_errors=True)
    return status


def _wait_for_database(
    callbacks: DbCallbacks, *, max_seconds: float = DATABASE_WAIT_SECONDS
) -> None:
    """Write the events still queued from an outage before recording how the job ended.

    Retries with backoff while the database is unreachable, so a finished job is recorded (and
    its events keep their order) after a short outage instead of failing. Past ``max_seconds``
    the job is left to the reaper, which requeues it to resume from its checkpoints.
    """
    for delay in backoff_delays(max_seconds):
        if callbacks.flush():
            return
        time.sleep(delay)
    if not callbacks.flush():
        raise RuntimeError(
            f"database unreachable for {max_seconds:.0f} s while recording job "
            f"{callbacks.job_id}; the reaper will requeue it"
        )


def claim_job(job_id: str, *, worker_id: str, settings: Settings) -> ClaimedJob | None:
    """Take ownership of a job, or decide it is not ours to run (None).

    Handles every delivery the broker may make: unknown or finished jobs are skipped, a job the user
    cancelled while queued becomes ``cancelled``, a job another live worker is running is left
    alone, one whose worker died is taken over, and attempts beyond ``job_max_attempts`` fail.
    """
    now = utc_now()
    with session_scope() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar()
        if job is None:
            logger.warning("job %s does not exist; dropping the message", job_id)
            return None
        if job.status in TERMINAL_STATUSES:
            logger.info("job %s is already %s; nothing to do", job_id, job.status)
            return None
        if job.status == "cancelling":
            # Cancelled while queued, or its worker died while it was being cancelled.
            job.status = "cancelled"
            job.finished_at = now
            job.eta_seconds = None
            session.add(
                JobEvent(
                    job_id=job_id, kind="status", message="cancelled", data={"status": "cancelled"}
                )
            )
            return None
        if job.status == "running" and job.worker_id != worker_id:
            heartbeat = as_utc(job.heartbeat_at)
            fresh = heartbeat is not None and now - heartbeat < timedelta(
                seconds=settings.worker_lost_after_seconds
            )
            if fresh and not worker_process_is_dead(job.worker_id):
                logger.info(
                    "job %s is running on %s; ignoring duplicate delivery", job_id, job.worker_id
                )
                return None
        if job.attempts >= settings.job_max_attempts:
            job.status = "failed"
            job.finished_at = now
            job.error = {
                "code": "too_many_attempts",
                "message": (
                    f"the job was started {job.attempts} times without finishing "
                    f"(limit {settings.job_max_attempts}); its worker keeps getting lost -- "
                    "try a smaller batch_size or max_samples"
                ),
            }
            session.add(
                JobEvent(
                    job_id=job_id,
                    kind="status",
                    message=f"failed: {job.error['message']}",
                    data={"status": "failed"},
                )
            )
            return None
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None:
            _fail_in_session(
                session, job, "dataset_missing", f"dataset {job.dataset_id} no longer exists", now
            )
            return None
        storage = get_storage()
        dataset_path = Path(storage.path_for(dataset.storage_key))
        if not dataset_path.is_file():
            _fail_in_session(
                session,
                job,
                "dataset_missing",
                f"the stored file of dataset {dataset.id} is missing; upload the dataset again "
                "and create a new job",
                now,
            )
            return None
        source_paths: dict[str, Path] = {}
        source = str((job.spec.get("alignment") or {}).get("source") or "auto")
        if source.startswith("ds_"):
            source_dataset = session.get(Dataset, source)
            if source_dataset is None or source_dataset.tenant_id != job.tenant_id:
                _fail_in_session(
                    session,
                    job,
                    "bad_hyperparameter",
                    f"alignment.source names dataset {source}, which does not exist",
                    now,
                )
                return None
            source_paths[source] = Path(storage.path_for(source_dataset.storage_key))
        job.attempts += 1
        job.status = "running"
        job.worker_id = worker_id
        job.heartbeat_at = now
        job.started_at = job.started_at or now
        job.error = None
        session.add(
            JobEvent(
                job_id=job_id,
                kind="status",
                message=f"running on {worker_id} (attempt {job.attempts})",
                data={"status": "running", "worker_id": worker_id, "attempt": job.attempts},
            )
        )
        if job.attempts > 1:
            session.add(
                JobEvent(
                    job_id=job_id,
                    kind="restart",
                    message="resuming from the last stage checkpoint",
                    data={"attempt": job.attempts},
                )
            )
        stored_analysis = None
        if job.spec.get("backbone", "auto") == "auto" or source == "auto":
            latest = session.scalar(
                select(DatasetAnalysis)
                .where(
                    DatasetAnalysis.dataset_id == dataset.id,
                    DatasetAnalysis.tenant_id == job.tenant_id,
                    DatasetAnalysis.status == "succeeded",
                )
                .order_by(DatasetAnalysis.id.desc())
                .limit(1)
            )
            stored_analysis = dict(latest.result) if latest is not None and latest.result else None
        return ClaimedJob(
            job_id=job.id,
            tenant_id=job.tenant_id,
            attempts=job.attempts,
            spec=dict(job.spec),
            queue=job.queue,
            name=job.name,
            dataset_id=dataset.id,
            dataset_path=dataset_path,
            dataset_filename=dataset.filename,
            label_column=dataset.label_column,
            source_paths=source_paths,
            stored_analysis=stored_analysis,
        )


def _fail_in_session(session: Any, job: Job, code: str, message: str, now: Any) -> None:
    job.status = "failed"
    job.finished_at = now
    job.eta_seconds = None
    job.error = {"code": code, "message": message}
    session.add(
        JobEvent(
            job_id=job.id, kind="status", message=f"failed: {message}", data={"status": "failed"}
        )
    )


def _device_for(queue: str) -> str:
    """The GPU this worker is pinned to (CUDA_VISIBLE_DEVICES) for GPU jobs, else the CPU."""
    import torch

    return "cuda" if queue == "gpu" and torch.cuda.is_available() else "cpu"


def _run_pipeline(
    claimed: ClaimedJob,
    settings: Settings,
    workdir: Path,
    bundle_dir: Path,
    callbacks: DbCallbacks,
) -> Any:
    from orca_engine import pipeline

    kwargs: dict[str, Any] = {
        "bundle_dir": bundle_dir,
        "callbacks": callbacks,
        "device": _device_for(claimed.queue),
        "proxy_cache_dir": settings.resolved_proxy_cache_dir,
        "model_dirs": tuple(settings.model_dirs),
        "filename": claimed.dataset_filename,
        "label_column": claimed.label_column,
    }
    if claimed.source_paths:
        kwargs["source_paths"] = {key: str(path) for key, path in claimed.source_paths.items()}
    if claimed.stored_analysis:
        kwargs["stored_analysis"] = claimed.stored_analysis
    if claimed.spec.get("backbone", "auto") == "auto":
        from orca_engine.analyze import local_backbones

        kwargs["extra_backbones"] = local_backbones(settings.model_dirs)
    return pipeline.run_job(claimed.spec, claimed.dataset_path, workdir, **kwargs)


def _final_job_metrics(
    metrics: dict[str, Any], running: dict[str, Any] | None, curves: dict[str, Any] | None
) -> dict[str, Any]:
    """The engine's final metrics, plus the last training metrics and the curves for the plots."""
    final = dict(metrics)
    if running and running.get("train"):
        final["train"] = running["train"]
    if curves:
        final["curves"] = json_safe(curves)
    return final


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _record_success(
    claimed: ClaimedJob, worker_id: str, result: Any, bundle_dir: Path, storage: Storage
) -> str:
    """Move the finished bundle into model storage, then create the model and close the job."""
    job_id = claimed.job_id
    produced = Path(getattr(result, "bundle_dir", bundle_dir) or bundle_dir)
    metrics = json_safe(dict(getattr(result, "metrics", {}) or {}))
    resolved_spec = json_safe(getattr(result, "resolved_spec", None))
    model_id = new_id("mdl")
    model_dir = Path(storage.model_dir(model_id))
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(produced, model_dir)  # same filesystem: the bundle appears whole or not at all
    # A cancel that lands after the engine finished still wins, and is committed like any outcome.

    def write() -> str:
        with session_scope() as session:
            job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar()
            if job is not None and job.model_id == model_id:
                return str(job.status)  # an earlier try committed, only its answer was lost
            if (
                job is None
                or job.worker_id != worker_id
                or job.status not in ("running", "cancelling")
            ):
                raise _NotOurs()
            if job.status == "cancelling":
                job.status = "cancelled"
                job.finished_at = utc_now()
                job.eta_seconds = None
                session.add(
                    JobEvent(
                        job_id=job_id,
                        kind="status",
                        message="cancelled",
                        data={"status": "cancelled"},
                    )
                )
                return "cancelled"
            task_spec = resolved_spec or job.resolved_spec or {}
            session.add(
                Model(
                    id=model_id,
                    tenant_id=claimed.tenant_id,
                    job_id=job_id,
                    dataset_id=claimed.dataset_id,
                    name=claimed.name,
                    storage_key=storage.model_key(model_id),
                    bytes=_directory_bytes(model_dir),
                    task_spec=task_spec,
                    metrics=metrics,
                )
            )
            job.status = "succeeded"
            job.stage = "export"
            job.progress = 1.0
            job.eta_seconds = 0.0
            job.metrics = _final_job_metrics(metrics, job.metrics, getattr(result, "curves", None))
            if resolved_spec:
                job.resolved_spec = resolved_spec
            job.model_id = model_id
            job.finished_at = utc_now()
            job.heartbeat_at = utc_now()
            session.add(
                JobEvent(
                    job_id=job_id,
                    kind="status",
                    message=f"succeeded; model {model_id}",
                    data={"status": "succeeded", "model_id": model_id, "metrics": metrics},
                )
            )
            return "succeeded"

    try:
        outcome = retry_while_database_unreachable(write, what=f"recording job {job_id}")
    except _NotOurs:
        shutil.rmtree(model_dir, ignore_errors=True)
        logger.warning("job %s changed owner before it could be recorded; discarding", job_id)
        return "lost"
    except Exception:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    if outcome != "succeeded":
        shutil.rmtree(model_dir, ignore_errors=True)
    return outcome


class _NotOurs(Exception):
    pass


def _finish(
    job_id: str,
    worker_id: str,
    *,
    status: str,
    message: str,
    error: dict[str, Any] | None = None,
) -> bool:
    """Record a terminal status, unless the job has meanwhile been taken by another worker.

    Returns False when the job is no longer this worker's (its work dir then stays for the next run).
    Waits (with backoff, up to ``DATABASE_WAIT_SECONDS``) for an unreachable database.
    """

    def write() -> bool:
        with session_scope() as session:
            job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar()
            if job is None or job.worker_id != worker_id:
                return False
            if job.status == status and job.finished_at is not None:
                return True  # an earlier try committed, only its answer was lost
            job.status = status
            job.error = error
            job.eta_seconds = None
            job.finished_at = utc_now()
            session.add(
                JobEvent(
                    job_id=job_id,
                    kind="status",
                    message=message,
                    data={"status": status, **({"error": error} if error else {})},
                )
            )
        return True

    return retry_while_database_unreachable(write, what=f"recording job {job_id} as {status}")


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_device_memory() -> None:
    """Give cached GPU memory back so the next job on this GPU starts with all of it."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory is best effort
        logger.debug("could not empty the CUDA cache", exc_info=True)


# --- dataset transferability analysis -----------------------------------------------------------


@dataclass
class ClaimedAnalysis:
    """What the analysis task needs, read while claiming the row."""

    analysis_id: str
    queue: str
    params: dict[str, Any]
    dataset_path: Path
    dataset_filename: str
    label_column: str | None
    #: (``dataset:<path>``, dataset id) for each uploaded dataset named as an extra source
    dataset_sources: list[tuple[str, str]] = field(default_factory=list)


@app.task(name=TASK_ANALYZE_DATASET, bind=True, acks_late=True)
def analyze_dataset_task(self: Task, analysis_id: str) -> str:
    """Run one transferability analysis to ``succeeded`` or ``failed``."""
    return execute_analysis(analysis_id)


def execute_analysis(analysis_id: str, *, settings: Settings | None = None) -> str:
    """Claim, run and record analysis ``analysis_id``; returns the status it was left in.

    Idempotent: the analysis is a pure, seeded measurement, so a redelivered message (worker
    lost mid-run) simply measures again; a finished analysis is never run twice.
    """
    settings = settings or get_settings()
    claimed = retry_while_database_unreachable(
        lambda: _claim_analysis(analysis_id), what=f"claiming analysis {analysis_id}"
    )
    if claimed is None:
        return "skipped"
    try:
        result = _run_analysis(claimed, settings)
    except EngineError as error:
        _free_device_memory()
        failure: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.param:
            failure["param"] = error.param
        return _finish_analysis(analysis_id, status="failed", error=failure)
    except Exception as error:
        _free_device_memory()
        logger.exception("analysis %s failed with an internal error", analysis_id)
        code = "out_of_memory" if _is_out_of_memory(error) else "internal_error"
        message = (
            "the device ran out of memory; try a smaller sample_size"
            if code == "out_of_memory"
            else f"internal error in the worker ({type(error).__name__}); "
            "the operators have the details in the worker log"
        )
        return _finish_analysis(
            analysis_id, status="failed", error={"code": code, "message": message}
        )
    return _finish_analysis(analysis_id, status="succeeded", result=json_safe(result))


def _claim_analysis(analysis_id: str) -> ClaimedAnalysis | None:
    with session_scope() as session:
        analysis = session.execute(
            select(DatasetAnalysis).where(DatasetAnalysis.id == analysis_id).with_for_update()
        ).scalar()
        if analysis is None:
            logger.warning("analysis %s does not exist; dropping the message", analysis_id)
            return None
        if analysis.status in ("succeeded", "failed"):
            return None
        now = utc_now()

        def fail(message: str) -> None:
            analysis.status = "failed"
            analysis.finished_at = now
            analysis.error = {"code": "dataset_missing", "message": message}

        storage = get_storage()
        dataset = session.get(Dataset, analysis.dataset_id)
        if dataset is None or dataset.deleted_at is not None:
            fail(f"dataset {analysis.dataset_id} no longer exists")
            return None
        dataset_path = Path(storage.path_for(dataset.storage_key))
        if not dataset_path.is_file():
            fail(f"the stored file of dataset {dataset.id} is missing; upload it again")
            return None
        dataset_sources: list[tuple[str, str]] = []
        for source in analysis.params.get("sources") or []:
            if not str(source).startswith("ds_"):
                continue
            other = session.get(Dataset, source)
            if other is None or other.tenant_id != analysis.tenant_id or other.deleted_at:
                fail(f"source dataset {source} no longer exists")
                return None
            dataset_sources.append((f"dataset:{storage.path_for(other.storage_key)}", source))
        analysis.status = "running"
        analysis.attempts += 1
        analysis.started_at = now
        analysis.error = None
        return ClaimedAnalysis(
            analysis_id=analysis.id,
            queue=analysis.queue,
            params=dict(analysis.params),
            dataset_path=dataset_path,
            dataset_filename=dataset.filename,
            label_column=dataset.label_column,
            dataset_sources=dataset_sources,
        )


def _run_analysis(claimed: ClaimedAnalysis, settings: Settings) -> dict[str, Any]:
    from orca_engine.analyze import (
        analyze_transferability,
        available_backbones,
        default_candidates,
    )
    from orca_engine.data import load_dataset
    from orca_engine.specs import check_backbone_location

    params = claimed.params
    allow_random_init = bool(params.get("allow_random_init", False))
    backbones = list(params.get("backbones") or []) or available_backbones(
        allow_random_init=allow_random_init, model_dirs=settings.model_dirs
    )
    for backbone in backbones:
        check_backbone_location(backbone, settings.model_dirs)
    extra_sources: list[str | tuple[str, str]] = [
        source for source in params.get("sources") or [] if not str(source).startswith("ds_")
    ]
    extra_sources += claimed.dataset_sources
    seed = int(params.get("seed", 0))
    dataset = load_dataset(
        claimed.dataset_path,
        filename=claimed.dataset_filename,
        label_column=claimed.label_column,
        seed=seed,
    )
    logger.info("analysis %s: %d backbone(s)", claimed.analysis_id, len(backbones))
    result = analyze_transferability(
        dataset,
        default_candidates(backbones, extra_sources=extra_sources),
        distance=str(params.get("distance", "otdd")),
        sample_size=int(params.get("sample_size", 256)),
        align_epochs=int(params.get("align_epochs", 10)),
        seed=seed,
        device=_device_for(claimed.queue),
        proxy_cache_dir=settings.resolved_proxy_cache_dir,
        allow_random_init=allow_random_init,
    )
    if result.best is None:
        reasons = "; ".join(f"{c.backbone} + {c.source}: {c.reason}" for c in result.candidates[:5])
        raise SpecError(f"no backbone/source pair could be measured ({reasons})", param="backbones")
    return result.to_dict()


def _finish_analysis(
    analysis_id: str,
    *,
    status: str,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> str:
    def write() -> str:
        with session_scope() as session:
            analysis = session.get(DatasetAnalysis, analysis_id)
            if analysis is None:
                return "lost"
            analysis.status = status
            analysis.result = result
            analysis.error = error
            analysis.finished_at = utc_now()
        return status

    return retry_while_database_unreachable(write, what=f"recording analysis {analysis_id}")
