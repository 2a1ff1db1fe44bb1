"""FastAPI dependencies: settings, database session, storage, queue and the calling tenant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.config import Settings
from api.db import SessionDep
from api.errors import ApiError
from api.models import Tenant
from api.queue import JobQueue
from api.security import tenant_for_key
from api.storage import LocalStorage

if TYPE_CHECKING:
    from api.predict_service import PredictService

__all__ = [
    "CurrentTenant",
    "PredictServiceDep",
    "QueueDep",
    "SessionDep",
    "SettingsDep",
    "StorageDep",
]

bearer_scheme = HTTPBearer(
    auto_error=False,
    bearerFormat="API key",
    description="`Authorization: Bearer orca_...` — create keys with `orca keys create <tenant>`.",
)


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_app_storage(request: Request) -> LocalStorage:
    storage: LocalStorage = request.app.state.storage
    return storage


def get_app_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


def get_predict_service(request: Request) -> PredictService:
    service: PredictService = request.app.state.predict_service
    return service


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[LocalStorage, Depends(get_app_storage)]
QueueDep = Annotated[JobQueue, Depends(get_app_queue)]
PredictServiceDep = Annotated["PredictService", Depends(get_predict_service)]


def get_current_tenant(
    db_session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Tenant:
    """The tenant owning the presented API key; 401 (with the envelope) otherwise."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "missing_api_key",
            "send your API key as 'Authorization: Bearer <key>'",
            headers=challenge,
        )
    try:
        tenant = tenant_for_key(db_session, credentials.credentials)
    finally:
        # Return the connection to the pool in this same worker thread. Held across the
        # request's awaits (a streaming upload, a shared forward pass), one connection per
        # in-flight request ran the pool dry, and threads blocked on it starved the requests
        # that held one: everything hung for the pool timeout. Routes check out again on use.
        db_session.close()
    if tenant is None:
        raise ApiError(
            401, "invalid_api_key", "the API key is invalid or revoked", headers=challenge
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
