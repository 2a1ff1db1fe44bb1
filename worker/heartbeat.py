"""Liveness for running jobs: a heartbeat while a job runs, and a reaper for jobs whose worker vanished.

A worker that dies mid-job (killed, machine lost, OOM-killed) stops beating. Every worker runs
:func:`reap_lost_jobs` periodically; it puts such jobs back on the queue (they resume from their last
stage checkpoint) or fails them once they have used up ``job_max_attempts``. So no job stays
``running`` forever, even on a broker that loses unacknowledged messages. The same loop runs
:func:`resend_lost_messages`, which sends ``queued`` jobs again when their broker queue has lost
every message (a Redis without persistence restarted), so no job stays ``queued`` forever either.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from api.config import Settings, get_settings
from api.db import session_scope
from api.models import Job, JobEvent

logger = logging.getLogger("orca.worker")

ACTIVE_STATUSES = ("running", "cancelling")

Enqueue = Callable[[str, str], None]
#: messages waiting in a broker queue (None: the broker could not be asked)
QueueSize = Callable[[str], int | None]


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; treat them as the UTC they were written in."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def this_worker_id() -> str:
    """``host:pid`` of the process running a job, shown in the job and used to detect dead workers."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_process_is_dead(worker_id: str | None) -> bool:
    """True only when ``worker_id`` names a process on this host that no longer exists."""
    if not worker_id or ":" not in worker_id:
        return False
    host, _, pid_text = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Heartbeat:
    """Background thread that stamps ``job.heartbeat_at`` while this worker owns the job.

    If the stamp finds the job no longer ours (a reaper requeued it, another worker took it over) it
    sets :attr:`lost`; the job's callbacks then stop the run so two workers never finish one job.
    """

    def __init__(self, job_id: str, worker_id: str, *, interval_seconds: float) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval_seconds = interval_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_seconds + 5)

    def beat(self) -> bool:
        """Stamp the heartbeat now; False when the job is no longer owned by this worker."""
        with session_scope() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.worker_id == self.worker_id,
                    Job.status.in_(ACTIVE_STATUSES),
                )
                .values(heartbeat_at=utc_now())
            )
            owned = bool(getattr(result, "rowcount", 0))
        return owned

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                if not self.beat():
                    logger.warning("job %s is no longer owned by %s", self.job_id, self.worker_id)
                    self.lost.set()
                    return
            except (OperationalError, InterfaceError) as error:
                # The database is unreachable: the job keeps running and the next beat retries.
                # An outage longer than worker_lost_after_seconds lets the reaper requeue the job;
                # this worker then sees it is no longer the owner and stops without writing.
                logger.warning(
                    "heartbeat for job %s skipped, database unreachable (%s)",
                    self.job_id,
                    type(error.orig).__name__ if error.orig is not None else type(error).__name__,
                )
            except Exception:  # nothing else may kill the job either; the next beat retries
                logger.exception("heartbeat for job %s failed", self.job_id)


def reap_lost_jobs(
    session: Session,
    now: datetime | None = None,
    *,
    settings: Settings | None = None,
    enqueue: Enqueue | None = None,
) -> list[str]:
    """Requeue (or fail, after ``job_max_attempts``) jobs whose worker stopped beating.

    A job counts as lost when it is ``running``/``cancelling`` and its heartbeat is older than
    ``worker_lost_after_seconds``. A lost ``cancelling`` job simply becomes ``cancelled``. Requeued
    jobs are sent to the broker again with ``enqueue(job_id, queue)`` after ``session`` commits.
    Returns the ids of the jobs it changed.
    """
    settings = settings or get_settings()
    now = now or utc_now()
    cutoff = now - timedelta(seconds=settings.worker_lost_after_seconds)
    lost_jobs = (
        session.execute(
            select(Job)
            .where(Job.status.in_(ACTIVE_STATUSES))
            .where((Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff))
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    changed: list[str] = []
    to_enqueue: list[tuple[str, str]] = []
    for job in lost_jobs:
        heartbeat = as_utc(job.heartbeat_at) or as_utc(job.started_at)
        if heartbeat is not None and heartbeat >= cutoff:
            continue  # never beat yet, but started recently
        previous_worker = job.worker_id or "unknown"
        job.worker_id = None
        job.heartbeat_at = None
        job.eta_seconds = None
        if job.status == "cancelling":
            job.status = "cancelled"
            job.finished_at = now
            message = f"worker {previous_worker} lost while cancelling; job cancelled"
        elif job.attempts >= settings.job_max_attempts:
            job.status = "failed"
            job.finished_at = now
            job.error = {
                "code": "too_many_attempts",
                "message": (
                    f"the worker running this job was lost {job.attempts} times "
                    f"(limit {settings.job_max_attempts}); the job may exhaust the worker's "
                    "memory -- try a smaller batch_size or max_samples"
                ),
            }
            message = f"worker {previous_worker} lost; giving up after {job.attempts} attempts"
        else:
            job.status = "queued"
            to_enqueue.append((job.id, job.queue))
            message = "worker lost; requeued"
        session.add(
            JobEvent(
                job_id=job.id,
                kind="status",
                message=message,
                data={"status": job.status, "worker_id": previous_worker},
            )
        )
        logger.warning("job %s: %s", job.id, message)
        changed.append(job.id)
    session.commit()
    if to_enqueue:
        send = enqueue or _default_enqueue
        for job_id, queue in to_enqueue:
            send(job_id, queue)
    return changed


def resend_lost_messages(
    session: Session,
    now: datetime | None = None,
    *,
    settings: Settings | None = None,
    queue_size: QueueSize,
    enqueue: Enqueue,
) -> list[str]:
    """Send again every job queued for ``queued_resend_after_seconds`` whose broker queue is empty.

    A ``queued`` job's message waits in its broker queue until a worker takes it and claims the
    job (``running``) within moments. So a job still ``queued`` after the grace period while its
    queue holds no message at all has lost its message -- a broker without persistence restarted
    -- and would wait forever. Sending it again is safe even in a race with a worker that just
    took the original: :func:`worker.tasks.claim_job` ignores a duplicate delivery. A queue that
    still holds messages (a backlog, or no worker for that device) is left alone, and so is one
    the broker cannot report on. Returns the ids of the jobs sent again.
    """
    settings = settings or get_settings()
    now = now or utc_now()
    cutoff = now - timedelta(seconds=settings.queued_resend_after_seconds)
    waiting = (
        session.execute(
            select(Job)
            .where(Job.status == "queued")
            .where(Job.created_at < cutoff)
            .order_by(Job.created_at)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    sizes: dict[str, int | None] = {}
    resend: list[tuple[str, str]] = []
    for job in waiting:
        if job.queue not in sizes:
            sizes[job.queue] = queue_size(job.queue)
        if sizes[job.queue] != 0:
            continue
        resend.append((job.id, job.queue))
        session.add(
            JobEvent(
                job_id=job.id,
                kind="log",
                message=f"its message was no longer in the broker's {job.queue!r} queue; sent again",
                data={"status": "queued"},
            )
        )
        logger.warning("job %s: queued without a broker message; sending it again", job.id)
    session.commit()
    for job_id, queue in resend:
        enqueue(job_id, queue)
    return [job_id for job_id, _ in resend]


def broker_queue_size(celery_app: Any, queue: str) -> int | None:
    """Messages ready in ``queue`` on ``celery_app``'s broker: 0 when the queue does not exist
    (a restarted Redis keeps no empty lists), None when the broker cannot be asked."""
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            declared = connection.default_channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
    except Exception as error:
        if "NOT_FOUND" in str(error) or str(getattr(error, "reply_code", "")) == "404":
            return 0
        logger.warning("could not read the size of broker queue %r: %s", queue, error)
        return None


def _send_run_job(celery_app: Any, job_id: str, queue: str) -> None:
    """Send ``job_id`` to ``queue`` through ``celery_app`` (how every resend reaches a worker)."""
    from worker.celery_app import TASK_RUN_JOB

    celery_app.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)


def _default_enqueue(job_id: str, queue: str) -> None:
    from worker.celery_app import app

    _send_run_job(app, job_id, queue)


class _Reaper:
    """The periodic reaper thread a worker runs in its main process."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


_reaper = _Reaper()


def reaper_interval_seconds(settings: Settings) -> float:
    """Check often enough to notice a lost job soon after ``worker_lost_after_seconds`` (and a
    lost message soon after ``queued_resend_after_seconds``)."""
    shortest = min(settings.worker_lost_after_seconds, settings.queued_resend_after_seconds)
    return max(1.0, min(shortest / 3, 60.0))


def start_reaper_thread(celery_app: Any) -> None:
    """Run :func:`reap_lost_jobs` every few seconds until :func:`stop_reaper_thread`."""
    if _reaper.thread is not None and _reaper.thread.is_alive():
        return
    settings = get_settings()
    interval = reaper_interval_seconds(settings)

    enqueue = functools.partial(_send_run_job, celery_app)

    def loop() -> None:
        while not _reaper.stop.wait(interval):
            try:
                with session_scope() as session:
                    reap_lost_jobs(session, settings=settings, enqueue=enqueue)
                with session_scope() as session:
                    resend_lost_messages(
                        session,
                        settings=settings,
                        queue_size=lambda queue: broker_queue_size(celery_app, queue),
                        enqueue=enqueue,
                    )
            except Exception:
                logger.exception("reaping lost jobs failed; retrying in %.0f s", interval)

    _reaper.stop.clear()
    _reaper.thread = threading.Thread(target=loop, name="orca-reaper", daemon=True)
    _reaper.thread.start()
    logger.info("reaper checks for lost jobs every %.0f s", interval)


def stop_reaper_thread() -> None:
    _reaper.stop.set()
