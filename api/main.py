"""The FastAPI application: ``create_app(settings)``; ``app`` for ``uvicorn api.main:app``.

Creating the app touches nothing outside the process (no database connection, no migration, no
broker connection): those happen on first use. Run ``orca migrate`` before serving.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import orca_engine
from api.config import Settings, get_settings
from api.errors import install_error_handlers
from api.metrics import PrometheusMiddleware, start_metrics_server
from api.predict_service import PredictService
from api.queue import JobQueue
from api.routes import dashboard, datasets, health, jobs, models
from api.storage import LocalStorage

logger = logging.getLogger(__name__)

DESCRIPTION = """
Adapt a pretrained transformer to your modality with ORCA (align, then refine) and call the
result over HTTP.

1. `POST /v1/datasets` — upload a `.npz`, `.csv` or `.parquet` (validated; every problem reported).
2. `POST /v1/jobs` — start a fine-tuning job from a task spec (every field but `dataset_id` defaults).
3. `GET /v1/jobs/{id}` or `/events` (SSE) — follow it; `GET /v1/models/{id}/download` for the bundle.
4. `POST /v1/models/{id}/predict` — predictions in your labels' space.

Authenticate with `Authorization: Bearer <api key>`. Errors always look like
`{"error": {"type", "code", "message", "param"}}`; lists are `{"data": [...], "has_more"}` paged
with `?limit=&after=`.
"""

TAGS = [
    {
        "name": "datasets",
        "description": "Uploads: stored content-addressed, validated, never trusted.",
    },
    {"name": "jobs", "description": "Fine-tuning jobs: align the embedder, then refine."},
    {"name": "models", "description": "Fine-tuned models: inspect, download, predict."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics (no key)."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app around ``settings`` (default: the process settings from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        logger.info("ORCA API starting (storage %s)", settings.resolved_storage_dir)
        try:
            removed = app.state.storage.sweep_stale_tmp(
                max_age_seconds=settings.stale_upload_max_age_seconds
            )
            if removed:
                logger.info("removed %d stale temp upload(s)", len(removed))
        except OSError as exc:  # an unwritable storage shows up in /readyz; start anyway
            logger.warning("could not sweep stale temp uploads: %s", exc)
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = start_metrics_server(
                settings.metrics_port,
                refresh=functools.partial(
                    health.refresh_job_counts, settings.resolved_database_url
                ),
            )
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

    app = FastAPI(
        title="ORCA model adaptation API",
        version=orca_engine.__version__ if hasattr(orca_engine, "__version__") else "0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.storage = LocalStorage(settings.resolved_storage_dir)
    app.state.queue = JobQueue(settings)
    app.state.predict_service = PredictService(settings)

    install_error_handlers(app)
    app.add_middleware(PrometheusMiddleware)
    for router in (datasets.router, jobs.router, models.router, health.router, dashboard.router):
        app.include_router(router)
    return app


app = create_app()
