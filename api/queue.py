"""Enqueueing jobs by task name with a producer-only Celery app (the API never imports ``worker``).

The task is ``orca.run_job`` with ``args=[job_id]`` and ``task_id=job_id`` (so a queued job can
be revoked by its id); a dataset analysis is ``orca.analyze_dataset`` with its analysis id.
``queue="auto"`` routes to ``gpu`` when some worker runs its jobs on a CUDA device, asked by a
short broadcast (the worker's ``orca_devices`` command) whose answer is cached; otherwise, or when
the broadcast fails, ``cpu``. A worker that merely listens on ``gpu`` without a GPU (the embedded
worker reads both queues) does not count: ``auto`` jobs would run on its CPU while labelled gpu.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery

from api.config import Settings

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "orca.run_job"
ANALYZE_DATASET_TASK = "orca.analyze_dataset"
GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
#: the remote-control command every worker answers with ``{"cuda_devices": n}`` (worker.celery_app)
DEVICES_COMMAND = "orca_devices"


def gpu_worker_in(replies: list[dict[str, Any]] | None) -> bool:
    """True when a broadcast reply (``[{node: answer}, ...]``) names a worker with a CUDA device.

    Workers that do not know the command answer ``{"error": ...}`` and count as CPU-only.
    """
    for reply in replies or []:
        for answer in (reply or {}).values():
            devices = answer.get("cuda_devices") if isinstance(answer, dict) else None
            if isinstance(devices, int) and devices > 0:
                return True
    return False


class BrokerUnavailable(Exception):
    """The broker could not be reached (or refused the message)."""


def create_celery_app(settings: Settings, *, name: str = "orca-api") -> Celery:
    """A Celery app wired to the configured broker with the service's shared conventions.

    The worker builds its own app on top of the same broker URL; this one only produces.
    """
    broker_url = settings.resolved_broker_url
    app = Celery(name, broker=broker_url, set_as_current=False)
    transport_options: dict[str, Any] = {}
    if broker_url.startswith(("redis://", "rediss://")):
        # Fail fast instead of hanging a request when Redis is down.
        transport_options = {
            "socket_connect_timeout": settings.broker_timeout_seconds,
            "socket_timeout": settings.broker_timeout_seconds,
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        broker_connection_timeout=settings.broker_timeout_seconds,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=1,
        broker_transport_options=transport_options,
        task_default_queue=CPU_QUEUE,
    )
    return app


class JobQueue:
    """The API's view of the job queue: route, enqueue, revoke, check the broker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()
        self._gpu_checked_at = float("-inf")
        self._gpu_available = False

    @property
    def celery_app(self) -> Celery:
        """The producer app, created on first use."""
        with self._lock:
            if self._app is None:
                self._app = create_celery_app(self._settings)
            return self._app

    def gpu_workers_available(self) -> bool:
        """True when some worker runs its jobs on a CUDA device (cached for a while)."""
        now = time.monotonic()
        if now - self._gpu_checked_at < self._settings.queue_inspect_ttl_seconds:
            return self._gpu_available
        available = False
        try:
            replies = self.celery_app.control.broadcast(
                DEVICES_COMMAND, reply=True, timeout=self._settings.queue_inspect_timeout_seconds
            )
            available = gpu_worker_in(replies)
        except Exception as exc:  # an unreachable broker or a transport without broadcast
            logger.info("could not ask workers for their devices (%s); routing to cpu", exc)
        self._gpu_available = available
        self._gpu_checked_at = now
        return available

    def pick_queue(self, requested: str) -> str:
        """``gpu``/``cpu`` as asked, or for ``auto`` the GPU queue when a GPU worker listens."""
        if requested in (GPU_QUEUE, CPU_QUEUE):
            return requested
        return GPU_QUEUE if self.gpu_workers_available() else CPU_QUEUE

    def enqueue(self, job_id: str, queue: str) -> None:
        """Send ``orca.run_job(job_id)`` to ``queue``; :class:`BrokerUnavailable` on failure."""
        self._send(RUN_JOB_TASK, job_id, queue)

    def enqueue_analysis(self, analysis_id: str, queue: str) -> None:
        """Send ``orca.analyze_dataset(analysis_id)`` to ``queue`` (same failure contract)."""
        self._send(ANALYZE_DATASET_TASK, analysis_id, queue)

    def _send(self, task: str, object_id: str, queue: str) -> None:
        try:
            self.celery_app.send_task(
                task,
                args=[object_id],
                queue=queue,
                task_id=object_id,
                retry=True,
                retry_policy={
                    "max_retries": 2,
                    "interval_start": 0,
                    "interval_step": 0.2,
                    "interval_max": 0.5,
                },
            )
        except Exception as exc:
            logger.warning("could not enqueue %s(%s) on %s: %s", task, object_id, queue, exc)
            raise BrokerUnavailable(str(exc)) from exc

    def revoke(self, job_id: str) -> None:
        """Ask workers to drop the queued task of ``job_id`` (best effort: the worker also
        checks the job's status before it starts)."""
        try:
            self.celery_app.control.revoke(job_id)
        except Exception as exc:
            logger.info("could not broadcast revoke for job %s: %s", job_id, exc)

    def check_broker(self) -> None:
        """Raise :class:`BrokerUnavailable` unless a broker connection opens quickly."""
        try:
            with self.celery_app.connection_for_write() as connection:
                connection.ensure_connection(
                    max_retries=1,
                    interval_start=0,
                    interval_step=0.2,
                    timeout=self._settings.broker_timeout_seconds,
                )
        except Exception as exc:
            raise BrokerUnavailable(str(exc)) from exc
