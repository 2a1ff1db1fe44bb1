"""/v1/datasets: upload (streamed, validated), list, get, delete."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request, Response

from api import metrics as prom
from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.routes.common import DEFAULT_LIMIT, After, Limit
from api.schemas import COMMON_ERROR_RESPONSES, DatasetPublic, DatasetsPublic, error_responses
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
