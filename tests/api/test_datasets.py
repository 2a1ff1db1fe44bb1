"""Uploads: the happy path with GunPoint, every kind of bad upload, listing, deletion."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from api.main import create_app
from tests.api.helpers import assert_envelope, storage_files, upload


def test_upload_gunpoint(
    client: TestClient, settings: Settings, auth: dict[str, str], gunpoint_npz: Path
) -> None:
    response = upload(client, auth, gunpoint_npz, name="gunpoint")
    assert response.status_code == 201, response.text
    body = response.json()
    raw = gunpoint_npz.read_bytes()
    assert body["id"].startswith("ds_")
    assert body["name"] == "gunpoint"
    assert body["filename"] == "gunpoint.npz"
    assert body["sha256"] == hashlib.sha256(raw).hexdigest()
    assert body["bytes"] == len(raw)
    assert body["format"] == "npz"
    assert body["input_kind"] == "seq1d"
    assert body["shapes"] == {"sample_shape": [1, 150], "label_shape": []}
    assert body["splits"]["train"] == 50 and body["splits"]["test"] == 150
    assert body["task_type"] == "classification"
    assert body["n_classes"] == 2
    assert body["report"]["errors"] == []
    # Stored content-addressed, byte for byte.
    [blob] = storage_files(settings)
    assert blob.name == f"{body['sha256']}.npz" and blob.read_bytes() == raw
    assert storage_files(settings, "tmp") == []
    assert client.get(f"/v1/datasets/{body['id']}", headers=auth).json() == body


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


BAD_UPLOADS: dict[str, Callable[[Path], Path]] = {
    "object_array": lambda d: _npz(
        d / "objects.npz",
        x_train=np.array([[1.0, 2.0], [3.0]], dtype=object),
        y_train=np.array([0, 1]),
    ),
    "nan": lambda d: _npz(
        d / "nan.npz",
        x_train=np.where(np.eye(8, 4) > 0, np.nan, 1.0).astype(np.float32),
        y_train=np.array([0, 1] * 4),
    ),
    "shape_mismatch": lambda d: _npz(
        d / "mismatch.npz",
        x_train=np.zeros((10, 4), np.float32),
        y_train=np.array([0, 1] * 4 + [0]),
    ),
    "no_labels": lambda d: _npz(d / "nolabels.npz", x_train=np.zeros((10, 4), np.float32)),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_bad_upload_is_reported_and_leaves_nothing(
    kind: str, client: TestClient, settings: Settings, auth: dict[str, str], tmp_path: Path
) -> None:
    path = BAD_UPLOADS[kind](tmp_path)
    error = assert_envelope(upload(client, auth, path), 422, code="dataset_invalid", param="file")
    report = error["report"]
    assert report["errors"], report
    assert all({"field", "message"} <= set(issue) for issue in report["errors"])
    assert client.get("/v1/datasets", headers=auth).json() == {"data": [], "has_more": False}
    assert storage_files(settings) == [] and storage_files(settings, "tmp") == []


def test_report_lists_every_problem(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    path = _npz(
        tmp_path / "many.npz",
        x_train=np.full((6, 3), np.inf, np.float32),
        y_train=np.array([0, 1, 0]),
        x_test=np.array([[1.0, 2.0], [3.0]], dtype=object),
    )
    report = assert_envelope(upload(client, auth, path), 422)["report"]
    fields = {issue["field"] for issue in report["errors"]}
    assert len(report["errors"]) >= 2 and "x_test" in fields, report


def test_unsupported_extension(
    client: TestClient, settings: Settings, auth: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "data.txt"
    path.write_text("1,2,3\n")
    assert_envelope(upload(client, auth, path), 422, code="unsupported_file_type", param="file")
    assert storage_files(settings, "tmp") == [] and storage_files(settings) == []


def test_missing_file_and_unknown_field(
    client: TestClient, auth: dict[str, str], gunpoint_npz: Path
) -> None:
    missing = client.post(
        "/v1/datasets", headers=auth, data={"name": "x"}, files={"other": ("a.npz", b"x")}
    )
    assert missing.status_code == 422 and missing.json()["error"]["param"] in ("file", "other")
    not_multipart = client.post("/v1/datasets", headers=auth, json={"file": "x"})
    assert_envelope(not_multipart, 422, code="multipart_required", param="file")


def test_upload_over_the_size_limit_is_413(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    auth: dict[str, str],
    gunpoint_npz: Path,
) -> None:
    client = make_client(max_upload_bytes=10_000)
    assert_envelope(upload(client, auth, gunpoint_npz), 413, code="upload_too_large", param="file")
    assert storage_files(make_settings()) == []


def test_streamed_upload_is_cut_off_without_content_length(
    make_settings: Callable[..., Settings], auth: dict[str, str]
) -> None:
    """No Content-Length to trust: the server stops reading at the limit and drops the temp file.

    httpx's ASGI transport pulls the body lazily (TestClient would buffer it all first), so the
    count of chunks produced shows how far the server read.
    """
    settings = make_settings(max_upload_bytes=100_000)
    app = create_app(settings)
    boundary = "orcatestboundary"
    sent = {"bytes": 0}

    async def body() -> AsyncIterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(400):  # 400 x 64 KiB = 25 MiB if nobody stops us
            sent["bytes"] += 65536
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post(
                "/v1/datasets",
                headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                content=body(),
            )

    response = asyncio.run(post())
    assert_envelope(response, 413, code="upload_too_large")
    assert sent["bytes"] < 1_000_000, "the server kept reading after the limit"
    assert storage_files(settings) == [] and storage_files(settings, "tmp") == []


def test_zip_bomb_is_413_with_report(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(
        path, x_train=np.zeros((2000, 1000), np.float32), y_train=np.zeros(2000, np.int64)
    )
    assert path.stat().st_size < 200_000  # 8 MB of zeros compress to almost nothing
    client = make_client(max_decompressed_bytes=1_000_000)
    error = assert_envelope(upload(client, auth, path), 413, code="dataset_too_large", param="file")
    assert any("decompressed" in issue["message"] for issue in error["report"]["errors"])
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []
    assert storage_files(make_settings()) == []


def test_too_many_members_is_413(
    make_client: Callable[..., TestClient], auth: dict[str, str], tmp_path: Path
) -> None:
    path = _npz(
        tmp_path / "members.npz",
        x_train=np.zeros((4, 2), np.float32),
        y_train=np.array([0, 1, 0, 1]),
        x_test=np.zeros((4, 2), np.float32),
        y_test=np.array([0, 1, 0, 1]),
    )
    client = make_client(max_npz_members=3)
    error = assert_envelope(upload(client, auth, path), 413, param="file")
    assert error["report"]["errors"]


def test_list_pagination_newest_first(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    ids = []
    for index in range(5):
        path = _npz(
            tmp_path / f"d{index}.npz",
            x_train=np.random.default_rng(index).normal(size=(12, 3)).astype(np.float32),
            y_train=np.array([0, 1] * 6),
        )
        response = upload(client, auth, path)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    newest_first = ids[::-1]
    first = client.get("/v1/datasets?limit=2", headers=auth).json()
    assert [d["id"] for d in first["data"]] == newest_first[:2] and first["has_more"] is True
    second = client.get(f"/v1/datasets?limit=2&after={newest_first[1]}", headers=auth).json()
    assert [d["id"] for d in second["data"]] == newest_first[2:4] and second["has_more"] is True
    last = client.get(f"/v1/datasets?limit=2&after={newest_first[3]}", headers=auth).json()
    assert [d["id"] for d in last["data"]] == newest_first[4:] and last["has_more"] is False
    default = client.get("/v1/datasets", headers=auth).json()
    assert len(default["data"]) == 5 and default["has_more"] is False


def test_delete_keeps_a_blob_another_dataset_shares(
    client: TestClient, settings: Settings, auth: dict[str, str], tmp_path: Path
) -> None:
    # Unique content: blobs are shared by hash across every tenant in the (session-wide) database.
    path = _npz(
        tmp_path / "shared.npz",
        x_train=np.random.default_rng().normal(size=(12, 3)).astype(np.float32),
        y_train=np.array([0, 1] * 6),
    )
    first = upload(client, auth, path).json()
    second = upload(client, auth, path).json()
    assert first["sha256"] == second["sha256"] and first["id"] != second["id"]
    assert len(storage_files(settings)) == 1
    assert client.delete(f"/v1/datasets/{first['id']}", headers=auth).status_code == 204
    assert_envelope(
        client.get(f"/v1/datasets/{first['id']}", headers=auth), 404, code="dataset_not_found"
    )
    assert len(storage_files(settings)) == 1
    assert client.delete(f"/v1/datasets/{second['id']}", headers=auth).status_code == 204
    assert storage_files(settings) == []
    assert_envelope(client.delete(f"/v1/datasets/{second['id']}", headers=auth), 404)
