"""/v1/datasets: upload (streamed, validated), list, get, delete; transferability analysis."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api import metrics as prom
from api.deps import CurrentTenant, QueueDep, SessionDep, SettingsDep, StorageDep
from api.routes.common import DEFAULT_LIMIT, After, Limit
from api.schemas import (
    COMMON_ERROR_RESPONSES,
    AnalysisCreate,
    AnalysisPublic,
    DatasetPublic,
    DatasetsPublic,
    error_responses,
)
from api.services import analyses
from api.services import datasets as service
from api.uploads import receive_dataset_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=COMMON_ERROR_RESPONSES)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npz (x_train, y_train, optional x_val/y_val/x_test/y_test), "
                            ".csv or .parquet",
                        },
                        "name": {
                            "type": "string",
                            "description": "display name (default: the file name)",
                        },
                        "label_column": {
                            "type": "string",
                            "description": "label column of a .csv/.parquet upload (default: label)",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    summary="Upload a dataset",
    openapi_extra=_UPLOAD_BODY,
    responses=error_responses(
        413,
        422,
        descriptions={
            413: "over the upload, decompressed-size or per-tenant storage limit",
            422: "invalid content; `error.report` lists every problem",
        },
    ),
)
async def create_dataset(
    request: Request,
    tenant: CurrentTenant,
    db_session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> DatasetPublic:
    """Stream the file to storage (hashing it), validate it, and record it if it is valid.

    At most ``max_concurrent_validations`` uploads are validated at once; the rest wait here.
    """
    upload = await receive_dataset_upload(request, storage, max_bytes=settings.max_upload_bytes)
    dataset = await anyio.to_thread.run_sync(
        lambda: service.register_upload(
            db_session=db_session,
            storage=storage,
            settings=settings,
            tenant_id=tenant.id,
            upload=upload,
        ),
        limiter=service.validation_limiter(settings),
    )
    prom.UPLOAD_BYTES.inc(dataset.bytes)
    return DatasetPublic.from_row(dataset)


@router.get("", response_model=DatasetsPublic, summary="List datasets")
def list_datasets(
    tenant: CurrentTenant,
    db_session: SessionDep,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> DatasetsPublic:
    rows, has_more = service.list_datasets(
        db_session=db_session, tenant_id=tenant.id, limit=limit, after=after
    )
    return DatasetsPublic(data=[DatasetPublic.from_row(r) for r in rows], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetPublic, summary="Get a dataset")
def get_dataset(dataset_id: str, tenant: CurrentTenant, db_session: SessionDep) -> DatasetPublic:
    dataset = service.get_dataset(db_session=db_session, tenant_id=tenant.id, dataset_id=dataset_id)
    return DatasetPublic.from_row(dataset)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    summary="Delete a dataset",
    responses=error_responses(409, descriptions={409: "an unfinished job uses it"}),
)
def delete_dataset(
    dataset_id: str, tenant: CurrentTenant, db_session: SessionDep, storage: StorageDep
) -> Response:
    service.delete_dataset(
        db_session=db_session, storage=storage, tenant_id=tenant.id, dataset_id=dataset_id
    )
    return Response(status_code=204)


# -- transferability analysis -------------------------------------------------------------------


async def _read_json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "the body is not valid JSON"}]
        ) from None


def _analysis_request(body: Any) -> Callable[[], AnalysisCreate]:
    def parse() -> AnalysisCreate:
        if not isinstance(body, dict):
            raise RequestValidationError(
                [{"type": "dict_type", "loc": ("body",), "msg": "the body must be a JSON object"}]
            )
        try:
            return AnalysisCreate.model_validate(body)
        except ValidationError as exc:
            errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
            raise RequestValidationError(errors, body=body) from None

    return parse


@router.post(
    "/{dataset_id}/analyze",
    status_code=202,
    response_model=AnalysisPublic,
    summary="Analyse which backbone and source proxy suit a dataset",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": AnalysisCreate.model_json_schema()}},
        }
    },
    responses=error_responses(
        503, descriptions={503: "the queue is unreachable; nothing was started"}
    ),
)
async def analyze_dataset(
    dataset_id: str,
    request: Request,
    tenant: CurrentTenant,
    db_session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> AnalysisPublic:
    """Start a transferability analysis on a worker (seconds to a minute) and return it queued.

    For each candidate backbone and source proxy, a sample of the dataset is embedded by a fresh
    embedder, aligned for a few epochs, and the distance before/after is measured; the ranking
    (lowest normalised aligned distance first) is what jobs with `backbone: auto` /
    `alignment.source: auto` then choose from. Poll `GET /v1/datasets/{id}/analysis`.
    """
    parse = _analysis_request(await _read_json_body(request))
    analysis = await anyio.to_thread.run_sync(
        lambda: analyses.create_analysis(
            db_session=db_session,
            settings=settings,
            queue=queue,
            tenant_id=tenant.id,
            dataset_id=dataset_id,
            parse_request=parse,
        )
    )
    return AnalysisPublic.from_row(analysis)


@router.get(
    "/{dataset_id}/analysis",
    response_model=AnalysisPublic,
    summary="The latest transferability analysis of a dataset",
    responses=error_responses(404, descriptions={404: "unknown dataset, or it was never analysed"}),
)
def get_analysis(dataset_id: str, tenant: CurrentTenant, db_session: SessionDep) -> AnalysisPublic:
    analysis = analyses.get_latest_analysis(
        db_session=db_session, tenant_id=tenant.id, dataset_id=dataset_id
    )
    return AnalysisPublic.from_row(analysis)
