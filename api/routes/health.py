"""/livez, /readyz (database, broker, storage) and /metrics; no API key needed."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api import metrics as prom
from api.db import get_engine, session_scope
from api.deps import QueueDep, SettingsDep, StorageDep
from api.schemas import HealthStatus
from api.services.jobs import jobs_by_status

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=HealthStatus, summary="Liveness: the process answers")
def livez() -> HealthStatus:
    return HealthStatus(status="ok")


@router.get(
    "/readyz",
    response_model=HealthStatus,
    summary="Readiness: database, broker and storage",
    responses={
        503: {"model": HealthStatus, "description": "a dependency failed (named in checks)"}
    },
)
def readyz(settings: SettingsDep, storage: StorageDep, queue: QueueDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.resolved_database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        logger.warning("readiness: database failed: %s", exc)
        checks["database"] = f"failed: {type(exc).__name__}"
    try:
        queue.check_broker()
        checks["broker"] = "ok"
    except Exception as exc:
        logger.warning("readiness: broker failed: %s", exc)
        checks["broker"] = "failed: unreachable"
    try:
        storage.check_writable()
        checks["storage"] = "ok"
    except OSError as exc:
        logger.warning("readiness: storage failed: %s", exc)
        checks["storage"] = f"failed: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    body = HealthStatus(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def refresh_job_counts(database_url: str) -> None:
    """Read jobs by state into the gauge; a database outage leaves the last values."""
    try:
        with session_scope(database_url) as session:
            prom.set_job_counts(jobs_by_status(db_session=session))
    except Exception as exc:  # metrics must still render while the database is down
        logger.warning("could not count jobs for /metrics: %s", exc)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(settings: SettingsDep) -> Response:
    refresh_job_counts(settings.resolved_database_url)
    payload, content_type = prom.render_latest()
    return Response(content=payload, media_type=content_type)
