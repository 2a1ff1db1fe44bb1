"""Auth, the error envelope, health endpoints, metrics and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from api.db import session_scope
from api.security import hash_key, revoke_key
from tests.api.helpers import assert_envelope

PROTECTED = [
    ("get", "/v1/datasets"),
    ("post", "/v1/datasets"),
    ("get", "/v1/datasets/ds_x"),
    ("delete", "/v1/datasets/ds_x"),
    ("get", "/v1/jobs"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs/job_x"),
    ("post", "/v1/jobs/job_x/cancel"),
    ("get", "/v1/jobs/job_x/events"),
    ("get", "/v1/jobs/job_x/plots/alignment.png"),
    ("get", "/v1/models"),
    ("get", "/v1/models/mdl_x"),
    ("delete", "/v1/models/mdl_x"),
    ("get", "/v1/models/mdl_x/download"),
    ("post", "/v1/models/mdl_x/predict"),
]


def test_every_resource_route_needs_a_valid_key(client: TestClient) -> None:
    for method, path in PROTECTED:
        missing = client.request(method, path)
        error = assert_envelope(missing, 401, code="missing_api_key")
        assert error["type"] == "authentication_error"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, path, headers={"Authorization": "Bearer orca_not-a-key"})
        assert_envelope(wrong, 401, code="invalid_api_key")
        basic = client.request(method, path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401, (method, path)


def test_revoked_key_is_refused(
    client: TestClient, database_url: str, make_tenant: Callable[[], dict[str, str]]
) -> None:
    headers = make_tenant()
    assert client.get("/v1/datasets", headers=headers).status_code == 200
    key = headers["Authorization"].removeprefix("Bearer ")
    with session_scope(database_url) as session:
        revoked = revoke_key(session, key[:12])
        assert [k.key_hash for k in revoked] == [hash_key(key)]
    assert_envelope(client.get("/v1/datasets", headers=headers), 401, code="invalid_api_key")


def test_keys_are_stored_hashed(
    database_url: str, make_tenant: Callable[[], dict[str, str]]
) -> None:
    from sqlalchemy import select

    from api.models import ApiKey

    key = make_tenant()["Authorization"].removeprefix("Bearer ")
    assert key.startswith("orca_") and len(key) >= 5 + 43
    with session_scope(database_url) as session:
        stored = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        assert stored is not None
        assert key not in (stored.key_hash, stored.prefix, stored.id)


def test_unknown_route_and_wrong_method_use_the_envelope(
    client: TestClient, auth: dict[str, str]
) -> None:
    error = assert_envelope(client.get("/v1/nothing-here", headers=auth), 404, code="not_found")
    assert error["type"] == "not_found_error"
    assert_envelope(client.put("/v1/datasets", headers=auth), 405, code="method_not_allowed")


def test_validation_errors_name_the_field(client: TestClient, auth: dict[str, str]) -> None:
    error = assert_envelope(client.get("/v1/datasets?limit=101", headers=auth), 422, param="limit")
    assert error["details"][0]["param"] == "limit"
    assert_envelope(client.get("/v1/jobs?limit=0", headers=auth), 422, param="limit")
    assert_envelope(client.get("/v1/models?limit=abc", headers=auth), 422, param="limit")


def test_livez_and_readyz_need_no_key(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_the_failed_dependency(make_client: Callable[..., TestClient]) -> None:
    client = make_client(broker_url="redis://127.0.0.1:1/0", broker_timeout_seconds=0.5)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["storage"] == "ok"
    assert checks["broker"].startswith("failed")


def test_metrics_exposes_requests_and_jobs(client: TestClient, auth: dict[str, str]) -> None:
    client.get("/v1/datasets", headers=auth)
    text = client.get("/metrics").text
    assert 'orca_http_requests_total{method="GET",route="/v1/datasets",status="200"}' in text
    assert 'orca_jobs{state="queued"}' in text
    assert "orca_predict_seconds_bucket" in text
    assert "orca_upload_bytes_total" in text


def test_openapi_has_bearer_auth_and_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())
    create_job = spec["paths"]["/v1/jobs"]["post"]
    assert create_job["security"]
    assert "examples" in create_job["requestBody"]["content"]["application/json"]
    assert "multipart/form-data" in spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    # a job's resolved spec names the values a client can read, not just "an object"
    resolved = spec["components"]["schemas"]["JobPublic"]["properties"]["resolved_spec"]
    assert {"token_budget", "ensemble_members", "finetune_mode", "reasons"} <= set(
        resolved["properties"]
    )
    assert client.get("/docs").status_code == 200
