"""The Celery app the workers run: broker from Settings, one queue per device kind.

Production uses Redis (or RabbitMQ); the embedded default is kombu's SQLAlchemy transport over a
SQLite file under ``data_dir`` -- a real broker that needs no server, so the embedded mode runs the
very same worker code as production. No result backend: job state lives in our database.

Start a worker with ``orca worker --gpu N`` / ``orca worker --cpu`` (or ``celery -A worker.celery_app
worker -Q cpu``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from celery.worker.control import inspect_command
from kombu import Exchange, Queue

from api.config import Settings, get_settings
from api.queue import DEVICES_COMMAND, GPU_QUEUE

logger = logging.getLogger("orca.worker")

TASK_RUN_JOB = "orca.run_job"
TASK_ANALYZE_DATASET = "orca.analyze_dataset"
QUEUES = ("gpu", "cpu")
# Redis re-delivers an unacknowledged message after this long. Jobs can run for many hours and a
# message is only acknowledged when the job ends (acks_late), so it must exceed any job's run time;
# a worker that vanishes is noticed much sooner by the heartbeat reaper (worker.heartbeat).
REDIS_VISIBILITY_TIMEOUT_SECONDS = 7 * 24 * 3600


def _ensure_sqlite_parent(url: str) -> None:
    """The SQLite broker file's directory must exist before kombu opens it."""
    for prefix in ("sqla+sqlite:///", "sqlite:///"):
        if url.startswith(prefix):
            path = url[len(prefix) :]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the worker app (kept in one place so tests can inspect them)."""
    broker_url = settings.resolved_broker_url
    transport_options: dict[str, Any] = {}
    if broker_url.startswith(("redis://", "rediss://")):
        transport_options["visibility_timeout"] = REDIS_VISIBILITY_TIMEOUT_SECONDS
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        # A broker restart must not end the worker: reconnect for as long as it takes.
        "broker_connection_max_retries": None,
        # ... nor the job it is running (Celery 6 flips this default to True, which would kill
        # every running job on a broker blip; the job's state lives in our database, not in
        # the message, so the running worker finishes and records it -- see RELIABILITY.md).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_transport_options": transport_options,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A job is acknowledged only when it ends; a worker that dies mid-job gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One job at a time per worker process: never hold a second job while a GPU is busy.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # Each queue on its own direct exchange, keyed by its name: what a producer that only
        # names the queue (the API's send_task(queue=...)) creates, so both sides agree.
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_default_queue": "cpu",
        "task_routes": {TASK_RUN_JOB: {"queue": "cpu"}, TASK_ANALYZE_DATASET: {"queue": "cpu"}},
        "task_track_started": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def create_celery_app(settings: Settings | None = None) -> Celery:
    """Build the worker-side Celery app from Settings (the producer side lives in ``api.queue``)."""
    settings = settings or get_settings()
    _ensure_sqlite_parent(settings.resolved_broker_url)
    celery = Celery("orca", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = create_celery_app()


@worker_process_init.connect
def _reset_db_connections_in_child(**_: Any) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    from api.db import get_engine

    get_engine().dispose(close=False)


#: CUDA devices this worker's jobs run on; counted at start-up, and only when it consumes "gpu"
#: (a worker reading that queue without a GPU runs those jobs on the CPU and reports 0 here)
_cuda_devices = 0


def count_cuda_devices() -> int:
    """CUDA devices this process may use, counted without initialising CUDA.

    ``torch.cuda.device_count`` asks NVML first, so the prefork pool forked after this call can
    still use CUDA in its children.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return 0
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of every worker image
        return 0
    return int(torch.cuda.device_count())


@celeryd_after_setup.connect
def _count_devices(sender: str, instance: Any, **_: Any) -> None:
    """Count CUDA devices once, before any job, when this worker consumes the ``gpu`` queue."""
    global _cuda_devices
    consumed = set(instance.app.amqp.queues.consume_from)
    _cuda_devices = count_cuda_devices() if GPU_QUEUE in consumed else 0
    if GPU_QUEUE in consumed and not _cuda_devices:
        logger.warning(
            "worker %s consumes the %r queue but sees no CUDA device: it runs those jobs on the "
            "CPU, and the API does not route queue 'auto' jobs to it",
            sender,
            GPU_QUEUE,
        )


@inspect_command(name=DEVICES_COMMAND)  # type: ignore[untyped-decorator]
def _report_devices(state: Any) -> dict[str, int]:
    """The CUDA devices this worker's jobs run on (the API's ``queue: auto`` routing asks)."""
    return {"cuda_devices": _cuda_devices}


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """Every worker also looks for jobs whose worker vanished (see worker.heartbeat)."""
    from worker.heartbeat import start_reaper_thread

    start_reaper_thread(app)


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    from worker.heartbeat import stop_reaper_thread

    stop_reaper_thread()
