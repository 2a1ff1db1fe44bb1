"""/v1/models: list, get, delete, download (zip), predict (JSON or .npy, micro-batched)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, PredictServiceDep, SessionDep, SettingsDep, StorageDep
from api.errors import ApiError
from api.routes.common import DEFAULT_LIMIT, After, Limit
from api.schemas import (
    COMMON_ERROR_RESPONSES,
    ModelPublic,
    ModelsPublic,
    PredictRequest,
    PredictResponse,
    error_responses,
)
from api.services import models as service

router = APIRouter(prefix="/v1/models", tags=["models"], responses=COMMON_ERROR_RESPONSES)

NPY_CONTENT_TYPES = ("application/x-npy", "application/octet-stream")


@router.get("", response_model=ModelsPublic, summary="List fine-tuned models")
def list_models(
    tenant: CurrentTenant,
    db_session: SessionDep,
    limit: Limit = DEFAULT_LIMIT,
    after: After = None,
) -> ModelsPublic:
    rows, has_more = service.list_models(
        db_session=db_session, tenant_id=tenant.id, limit=limit, after=after
    )
    return ModelsPublic(data=[ModelPublic.from_row(r) for r in rows], has_more=has_more)


@router.get("/{model_id}", response_model=ModelPublic, summary="Get a model")
def get_model(model_id: str, tenant: CurrentTenant, db_session: SessionDep) -> ModelPublic:
    return ModelPublic.from_row(
        service.get_model(db_session=db_session, tenant_id=tenant.id, model_id=model_id)
    )


@router.delete("/{model_id}", status_code=204, summary="Delete a model and its files")
def delete_model(
    model_id: str,
    tenant: CurrentTenant,
    db_session: SessionDep,
    storage: StorageDep,
    predictions: PredictServiceDep,
) -> Response:
    service.delete_model(
        db_session=db_session, storage=storage, tenant_id=tenant.id, model_id=model_id
    )
    predictions.evict(model_id)
    return Response(status_code=204)


@router.get(
    "/{model_id}/download",
    summary="The checkpoint bundle as a .zip",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def download_model(
    model_id: str, tenant: CurrentTenant, db_session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    model = service.get_model(db_session=db_session, tenant_id=tenant.id, model_id=model_id)
    directory = service.bundle_dir(storage=storage, model=model)
    files = service.bundle_files(directory) if directory.is_dir() else []
    if not files:
        raise ApiError(
            404, "model_files_missing", f"the files of model {model_id} are gone", param="model_id"
        )
    return StreamingResponse(
        service.iter_zip(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{model.id}.zip"'},
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body exceeds {limit} bytes", param="inputs")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds {limit} bytes", param="inputs")
    return bytes(body)


def _parse_inputs(body: bytes, content_type: str) -> tuple[Any, bool]:
    """(inputs, is_npy) from a JSON ``{"inputs": X}`` or a raw ``.npy`` body."""
    if content_type in NPY_CONTENT_TYPES:
        try:
            return np.load(io.BytesIO(body), allow_pickle=False), True
        except (ValueError, OSError, EOFError) as exc:
            raise ApiError(
                422, "invalid_npy", f"the body is not a readable .npy array: {exc}", param="inputs"
            ) from None
    if content_type not in ("application/json", ""):
        raise ApiError(
            415,
            "unsupported_media_type",
            'send application/json {"inputs": ...} or an .npy body (application/x-npy)',
            param="inputs",
        )
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ApiError(
            422, "invalid_json", f"the body is not valid JSON: {exc}", param="inputs"
        ) from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ApiError(422, "missing_inputs", 'send {"inputs": [...]}', param="inputs")
    unknown = sorted(set(payload) - {"inputs"})
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}", param=unknown[0])
    return payload["inputs"], False


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    summary="Predict with a fine-tuned model",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": PredictRequest.model_json_schema(),
                    "example": {"inputs": [[0.1, 0.2, 0.3]]},
                },
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    responses={
        **error_responses(
            413,
            415,
            422,
            429,
            descriptions={
                413: "the body is over ORCA_MAX_PREDICT_BODY_BYTES",
                422: "inputs of the wrong shape/dtype or with NaN (param `inputs`)",
                429: "over the per-tenant prediction rate; see Retry-After",
            },
        ),
    },
)
async def predict(
    model_id: str,
    request: Request,
    tenant: CurrentTenant,
    db_session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    predictions: PredictServiceDep,
) -> PredictResponse:

    def lookup() -> Any:
        try:
            return service.get_model(db_session=db_session, tenant_id=tenant.id, model_id=model_id)
        finally:
            # Give the pooled connection back now: the rest of the request waits on the body
            # and a shared forward pass, and 64 clients holding one each exhausted the pool
            # (requests hung for the pool timeout, then failed with 500).
            db_session.close()

    model = await run_in_threadpool(lookup)
    predictions.check_rate(tenant.id)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, settings.max_predict_body_bytes)
    inputs, is_npy = _parse_inputs(body, content_type)
    answer = await predictions.predict(
        model_id=model.id,
        bundle_dir=service.bundle_dir(storage=storage, model=model),
        inputs=inputs,
        require_batch=is_npy,
    )
    return PredictResponse(model_id=model.id, **answer)
