"""/v1/jobs: create (idempotent), list, get, cancel, events (JSON pages or SSE), plots."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Header, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.db import session_scope
from api.deps import CurrentTenant, QueueDep, SessionDep, SettingsDep, StorageDep
from api.models import Job
from api.plots import job_plot
from api.routes.common import DEFAULT_LIMIT, After, Limit
from api.schemas import (
    COMMON_ERROR_RESPONSES,
    JOB_CREATE_EXAMPLES,
    JobEventPublic,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    error_responses,
)
from api.services import jobs as service
from orca_engine.specs import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_ERROR_RESPONSES)

SSE_BATCH = 500
SSE_PING_SECONDS = 15


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    summary="Create a fine-tuning job",
    responses={
        200: {"description": "an earlier request with this Idempotency-Key made the job"},
        **error_responses(
            404,
            409,
            422,
            429,
            503,
            descriptions={
                404: "no such dataset (param `dataset_id`)",
                409: "Idempotency-Key reused with a different body",
                422: "invalid or impossible spec; `param` names the field",
                429: "too many unfinished jobs; see Retry-After",
                503: "the queue is unreachable; nothing was created",
            },
        ),
    },
)
def create_job(
    spec: Annotated[JobSpec, Body(openapi_examples=JOB_CREATE_EXAMPLES)],
    response: Response,
    tenant: CurrentTenant,
    db_session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            pattern=r"^[ -~]+$",
            description="same key + same body → the same job; same key + another body → 409",
        ),
    ] = None,
) -> JobPublic:
    job, created = service.create_job(
        db_session=db_session,
        settings=settings,
        queue=queue,
        tenant_id=tenant.id,
        spec=spec,
        idempotency_key=idempotency_key,
    )
    response.status_code = 201 if created else 200
    return JobPublic.from_row(job)


@router.get("", response_model=JobsPublic, summary="List jobs")
def list_jobs(
    tenant: CurrentTenant,
    db_session: SessionDep,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> JobsPublic:
    rows, has_more = service.list_jobs(
        db_session=db_session, tenant_id=tenant.id, limit=limit, after=after
    )
    return JobsPublic(data=[JobPublic.from_row(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job")
def get_job(job_id: str, tenant: CurrentTenant, db_session: SessionDep) -> JobPublic:
    return JobPublic.from_row(
        service.get_job(db_session=db_session, tenant_id=tenant.id, job_id=job_id)
    )


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    responses=error_responses(409, descriptions={409: "the job already finished"}),
)
def cancel_job(
    job_id: str, tenant: CurrentTenant, db_session: SessionDep, queue: QueueDep
) -> JobPublic:
    job = service.cancel_job(db_session=db_session, queue=queue, tenant_id=tenant.id, job_id=job_id)
    return JobPublic.from_row(job)


def _poll_events(url: str, job_id: str, after: int) -> tuple[str | None, list[JobEventPublic]]:
    """The job's status, read *before* its new events, so nothing written before a terminal
    status can be missed."""
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        status = job.status if job is not None else None
        rows, _ = service.list_events(
            db_session=session, job_id=job_id, limit=SSE_BATCH, after=after
        )
        return status, [JobEventPublic.from_row(row) for row in rows]


async def _event_stream(
    request: Request, *, url: str, job_id: str, after: int, poll_seconds: float
) -> AsyncIterator[ServerSentEvent]:
    last_id = after
    while True:
        if await request.is_disconnected():
            return
        status, events = await run_in_threadpool(_poll_events, url, job_id, last_id)
        for event in events:
            last_id = event.id
            yield ServerSentEvent(
                data=json.dumps(event.model_dump(mode="json")), id=str(event.id), event=event.kind
            )
        if status is None or (status in service.TERMINAL_JOB_STATUSES and len(events) < SSE_BATCH):
            yield ServerSentEvent(data=json.dumps({"status": status}), event="end")
            return
        if not events:
            await anyio.sleep(poll_seconds)


@router.get(
    "/{job_id}/events",
    response_model=JobEventsPublic,
    summary="A job's event log (JSON pages, or live with Accept: text/event-stream)",
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "description": "one SSE event per job event (id = event id, event = kind); "
                    "honours Last-Event-ID; ends with an `end` event once the job finished",
                }
            }
        }
    },
)
def list_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    db_session: SessionDep,
    settings: SettingsDep,
    limit: Limit = DEFAULT_LIMIT,
    after: Annotated[int | None, Query(ge=0, description="the last event id already seen")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    job = service.get_job(db_session=db_session, tenant_id=tenant.id, job_id=job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = after or 0
        if last_event_id and last_event_id.strip().isdigit():
            start = max(start, int(last_event_id.strip()))
        return EventSourceResponse(
            _event_stream(
                request,
                url=settings.resolved_database_url,
                job_id=job.id,
                after=start,
                poll_seconds=settings.events_poll_seconds,
            ),
            ping=SSE_PING_SECONDS,
        )
    rows, has_more = service.list_events(
        db_session=db_session, job_id=job.id, limit=limit, after=after
    )
    return JobEventsPublic(data=[JobEventPublic.from_row(r) for r in rows], has_more=has_more)


@router.get(
    "/{job_id}/plots/{name}.png",
    summary="A PNG of the job's curves: `alignment` or `training`",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}},
        **error_responses(404, descriptions={404: "unknown job or plot, or no data yet"}),
    },
)
def get_plot(
    job_id: str, name: str, tenant: CurrentTenant, db_session: SessionDep, storage: StorageDep
) -> Response:
    job = service.get_job(db_session=db_session, tenant_id=tenant.id, job_id=job_id)
    png = job_plot(db_session=db_session, storage=storage, job=job, name=name)
    return Response(content=png, media_type="image/png", headers={"Cache-Control": "no-store"})
