"""Small helpers shared by the API tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from api.config import Settings


def queued_messages(client: redis.Redis, queue: str = "cpu") -> list[dict[str, Any]]:
    """The Celery messages waiting in ``queue`` (headers + decoded body)."""
    messages = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        body = (
            base64.b64decode(envelope["body"])
            if envelope.get("properties", {}).get("body_encoding") == "base64"
            else envelope["body"]
        )
        messages.append({"headers": envelope["headers"], "body": json.loads(body)})
    return messages


def upload(client: TestClient, headers: dict[str, str], path: Path, **fields: str) -> Any:
    """POST a file to /v1/datasets as multipart."""
    with path.open("rb") as handle:
        return client.post(
            "/v1/datasets",
            headers=headers,
            files={"file": (path.name, handle, "application/octet-stream")},
            data=fields,
        )


def storage_files(settings: Settings, sub: str = "datasets") -> list[Path]:
    """Files under one storage area (plus leftovers in tmp/ when ``sub`` is tmp)."""
    root = settings.resolved_storage_dir / sub
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def assert_envelope(
    response: Any, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The response is the SPEC error envelope with this status (and code/param when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"type", "code", "message", "param"} <= set(error), error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return dict(error)
