"""Auth and tenancy, walked over the app's own route table so a new route cannot be forgotten.

Every route is classified here: public (health, docs) or ``/v1`` (needs a key). Every ``/v1``
route with an id in its path is called with tenant B's key on tenant A's objects and must answer
404 (not 403, not the object); every ``/v1`` collection route must show B nothing of A's. A route
whose path parameter or collection this file does not know fails the test until it is added.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import routing
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.config import Settings
from api.db import session_scope
from api.models import Dataset, Job, Model
from api.security import revoke_key
from api.storage import LocalStorage
from tests.api.helpers import assert_envelope, upload

PUBLIC_PATHS = {
    "/livez",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    # The dashboard: static files that hold no data (tests/api/test_dashboard.py).
    "/",
    "/dashboard/{asset}",
}
# Collection routes and what tenant B may do there without touching tenant A's objects.
LIST_ROUTES = {("GET", "/v1/datasets"), ("GET", "/v1/jobs"), ("GET", "/v1/models")}
CREATE_IN_OWN_TENANT = {("POST", "/v1/datasets")}  # makes B's own object; A's are not named
CREATE_NAMING_A_DATASET = {("POST", "/v1/jobs")}
PARAM = re.compile(r"{(\w+)}")


def app_routes(client: TestClient) -> Iterator[tuple[str, str]]:
    """(method, path template) for every HTTP route the app serves, included routers flattened."""
    routes = client.app.routes  # type: ignore[attr-defined]
    # FastAPI >= 0.16x nests included routers; iter_route_contexts flattens them.
    contexts = (
        routing.iter_route_contexts(routes) if hasattr(routing, "iter_route_contexts") else routes
    )
    for route in contexts:
        methods = set(getattr(route, "methods", None) or ())
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            yield method, str(route.path)


@pytest.fixture()
def tenant_a_objects(
    client: TestClient,
    settings: Settings,
    database_url: str,
    make_tenant: Callable[[], dict[str, str]],
    tmp_path: Path,
) -> dict[str, Any]:
    """Tenant A with one dataset, one job and one model (bundle files on disk)."""
    alice = make_tenant()
    path = tmp_path / "tiny.npz"
    y = np.array([0, 1] * 10)
    np.savez(path, x_train=np.random.default_rng(0).normal(size=(20, 8)).astype("f4"), y_train=y)
    dataset = upload(client, alice, path).json()["id"]
    job = client.post("/v1/jobs", headers=alice, json={"dataset_id": dataset}).json()["id"]
    storage = LocalStorage(settings.resolved_storage_dir)
    with session_scope(database_url) as session:
        row = session.get(Job, job)
        assert row is not None
        model = Model(
            tenant_id=row.tenant_id, job_id=job, dataset_id=dataset, storage_key="", task_spec={}
        )
        session.add(model)
        session.flush()
        model.storage_key = storage.model_key(model.id)
        storage.model_dir(model.id).mkdir(parents=True)
        (storage.model_dir(model.id) / "config.json").write_text("{}")
        model_id = model.id
    return {
        "headers": alice,
        "path_values": {"dataset_id": dataset, "job_id": job, "model_id": model_id},
        "model_dir": storage.model_dir(model_id),
    }


def test_every_route_is_either_public_or_behind_a_key(client: TestClient) -> None:
    for method, path in app_routes(client):
        if path in PUBLIC_PATHS:
            continue
        assert path.startswith("/v1/"), f"{method} {path}: classify it as public or put it in /v1"
        concrete = PARAM.sub("x", path)
        error = assert_envelope(client.request(method, concrete), 401, code="missing_api_key")
        assert error["type"] == "authentication_error", (method, path)


def test_revoked_key_is_refused_on_every_route(
    client: TestClient, database_url: str, make_tenant: Callable[[], dict[str, str]]
) -> None:
    headers = make_tenant()
    key = headers["Authorization"].removeprefix("Bearer ")
    with session_scope(database_url) as session:
        revoke_key(session, key[:12])
    for method, path in app_routes(client):
        if path.startswith("/v1/"):
            response = client.request(method, PARAM.sub("x", path), headers=headers)
            assert_envelope(response, 401, code="invalid_api_key")


def test_tenant_b_gets_404_for_tenant_a_on_every_route(
    client: TestClient,
    database_url: str,
    make_tenant: Callable[[], dict[str, str]],
    tenant_a_objects: dict[str, Any],
) -> None:
    bob = make_tenant()
    values: dict[str, str] = {**tenant_a_objects["path_values"], "name": "alignment"}
    walked: list[str] = []
    for method, path in app_routes(client):
        if path in PUBLIC_PATHS:
            continue
        names = PARAM.findall(path)
        if not names:
            _check_collection_route(client, bob, method, path, values["dataset_id"])
            walked.append(f"{method} {path}")
            continue
        unknown = [n for n in names if n not in values]
        assert not unknown, f"{method} {path}: add a tenant-A value for {unknown} to this test"
        concrete = PARAM.sub(lambda m: values[m.group(1)], path)
        body = {"inputs": [[0.0] * 8]} if method == "POST" else None
        response = client.request(method, concrete, headers=bob, json=body)
        assert_envelope(response, 404)
        assert set(response.json()) == {"error"}, response.text  # nothing of the object leaks
        if path.endswith("/events"):  # the live stream is refused the same way
            stream = client.get(concrete, headers={**bob, "Accept": "text/event-stream"})
            assert_envelope(stream, 404)
        walked.append(f"{method} {path}")
    assert len(walked) >= 15, walked

    # Nothing of A's changed: B's deletes, cancels and predictions touched nothing.
    alice = tenant_a_objects["headers"]
    ids = tenant_a_objects["path_values"]
    assert client.get(f"/v1/datasets/{ids['dataset_id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/jobs/{ids['job_id']}", headers=alice).json()["status"] == "queued"
    assert client.get(f"/v1/models/{ids['model_id']}", headers=alice).status_code == 200
    assert (tenant_a_objects["model_dir"] / "config.json").is_file()
    with session_scope(database_url) as session:
        assert session.scalar(select(Model).where(Model.id == ids["model_id"])) is not None
        dataset = session.get(Dataset, ids["dataset_id"])
        assert dataset is not None and dataset.deleted_at is None


def _check_collection_route(
    client: TestClient, bob: dict[str, str], method: str, path: str, a_dataset: str
) -> None:
    route = (method, path)
    if route in LIST_ROUTES:
        response = client.get(path, headers=bob)
        assert response.json() == {"data": [], "has_more": False}, (route, response.text)
    elif route in CREATE_NAMING_A_DATASET:
        response = client.post(path, headers=bob, json={"dataset_id": a_dataset})
        assert_envelope(response, 404, param="dataset_id")
        aligned = client.post(
            path, headers=bob, json={"dataset_id": a_dataset, "alignment": {"source": a_dataset}}
        )
        assert_envelope(aligned, 404)
    elif route not in CREATE_IN_OWN_TENANT:
        raise AssertionError(f"{method} {path}: classify this collection route in this test")


def test_route_table_walk_sees_every_documented_operation(client: TestClient) -> None:
    """Guard for the walks above: the flattened route table holds every OpenAPI operation."""
    walked = {(method, path) for method, path in app_routes(client)}
    documented = {
        (method.upper(), path)
        for path, operations in client.get("/openapi.json").json()["paths"].items()
        for method in operations
    }
    assert documented and documented <= walked, documented - walked
