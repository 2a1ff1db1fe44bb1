"""Uploads from strangers: hostile file names, table limits, degenerate datasets, storage quota.

Each refusal must be the envelope with the report listing the problem, and nothing may stay in
storage (no blob, no temp file, no dataset row).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from api.config import Settings
from tests.api.helpers import assert_envelope, storage_files, upload


def _post_file(
    client: TestClient, headers: dict[str, str], filename: str, content: bytes, **fields: str
) -> object:
    return client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (filename, content, "application/octet-stream")},
        data=fields,
    )


def _tiny_npz_bytes(tmp_path: Path, n: int = 12, seed: int = 0) -> bytes:
    path = tmp_path / f"tiny-{seed}.npz"
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.normal(size=(n, 4)).astype("f4"), y_train=np.arange(n) % 2)
    return path.read_bytes()


def _assert_nothing_stored(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []
    assert storage_files(settings) == [] and storage_files(settings, "tmp") == []


@pytest.mark.parametrize(
    "hostile_name",
    ["../../etc/passwd.npz", "..\\..\\windows\\win.ini.npz", "/abs/path/x.npz", "a\x00b.npz"],
)
def test_a_file_name_never_becomes_a_path(
    client: TestClient,
    settings: Settings,
    auth: dict[str, str],
    tmp_path: Path,
    hostile_name: str,
) -> None:
    content = _tiny_npz_bytes(tmp_path)
    response = _post_file(client, auth, hostile_name, content, name=hostile_name)
    assert response.status_code == 201, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    # Only the last component is kept, as display text; no separators, no control characters.
    assert "/" not in body["filename"] and "\\" not in body["filename"]
    assert "\x00" not in body["filename"] and "\x00" not in body["name"]
    assert body["filename"].endswith(".npz")
    [blob] = storage_files(settings)
    assert blob.name == f"{body['sha256']}.npz"
    assert blob.is_relative_to(settings.resolved_storage_dir / "datasets")
    root = settings.resolved_storage_dir
    assert not (root / ".." / ".." / "etc" / "passwd.npz").exists()
    every_file = [p for p in root.parent.rglob("*") if p.is_file()]
    assert not any("passwd" in p.name or "win.ini" in p.name for p in every_file), every_file


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_row_and_column_limits_are_422_with_a_report(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    auth: dict[str, str],
    tmp_path: Path,
    fmt: str,
) -> None:
    client = make_client(max_csv_rows=10, max_csv_columns=5)
    rng = np.random.default_rng(0)
    too_long = pd.DataFrame({"a": rng.normal(size=30), "label": np.arange(30) % 2})
    too_wide = pd.DataFrame({f"f{i}": rng.normal(size=6) for i in range(8)} | {"label": [0, 1] * 3})
    for frame, words in [(too_long, "rows"), (too_wide, "columns")]:
        path = tmp_path / f"table.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        error = assert_envelope(upload(client, auth, path), 422, code="dataset_invalid")
        messages = " ".join(issue["message"] for issue in error["report"]["errors"])
        assert words in messages and "at most" in messages, error
    _assert_nothing_stored(client, auth, make_settings())


DEGENERATE: dict[str, tuple[dict[str, np.ndarray], str, str]] = {
    "empty_train": (
        {"x_train": np.zeros((0, 4), "f4"), "y_train": np.zeros(0, "i8")},
        "x_train",
        "empty",
    ),
    "empty_test": (
        {
            "x_train": np.eye(6, 4, dtype="f4"),
            "y_train": np.arange(6) % 2,
            "x_test": np.zeros((0, 4), "f4"),
            "y_test": np.zeros(0, "i8"),
        },
        "x_test",
        "empty",
    ),
    "single_class": (
        {"x_train": np.eye(6, 4, dtype="f4"), "y_train": np.zeros(6, "i8")},
        "y_train",
        "single class",
    ),
    "infinite": (
        {"x_train": np.full((6, 4), np.inf, "f4"), "y_train": np.arange(6) % 2},
        "x_train",
        "inf",
    ),
    "label_count_mismatch": (
        {"x_train": np.eye(6, 4, dtype="f4"), "y_train": np.arange(5) % 2},
        "y_train",
        "",
    ),
    "object_array": (
        {"x_train": np.array([[1.0], [2.0, 3.0]], dtype=object), "y_train": np.array([0, 1])},
        "x_train",
        "",
    ),
}


@pytest.mark.parametrize("kind", sorted(DEGENERATE))
def test_degenerate_datasets_are_422_naming_the_member(
    kind: str, client: TestClient, settings: Settings, auth: dict[str, str], tmp_path: Path
) -> None:
    arrays, field, words = DEGENERATE[kind]
    path = tmp_path / f"{kind}.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    error = assert_envelope(upload(client, auth, path), 422, code="dataset_invalid", param="file")
    issues = error["report"]["errors"]
    named = [issue for issue in issues if issue["field"] == field]
    assert named, issues
    assert any(words in issue["message"].lower() for issue in named), issues
    _assert_nothing_stored(client, auth, settings)


def test_storage_quota_per_tenant_is_413_and_keeps_nothing(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    make_tenant: Callable[[], dict[str, str]],
    tmp_path: Path,
) -> None:
    first, second = _tiny_npz_bytes(tmp_path, seed=1), _tiny_npz_bytes(tmp_path, seed=2)
    client = make_client(max_storage_bytes_per_tenant=len(first) + len(second) // 2)
    alice, bob = make_tenant(), make_tenant()
    assert _post_file(client, alice, "a.npz", first).status_code == 201  # type: ignore[attr-defined]
    refused = _post_file(client, alice, "b.npz", second)
    error = assert_envelope(refused, 413, code="storage_quota_exceeded", param="file")
    assert "quota" in error["message"]
    assert len(client.get("/v1/datasets", headers=alice).json()["data"]) == 1
    assert len(storage_files(make_settings())) == 1 and storage_files(make_settings(), "tmp") == []
    # The quota is per tenant: another tenant may still upload.
    assert _post_file(client, bob, "b.npz", second).status_code == 201  # type: ignore[attr-defined]
    # Deleting frees the quota again.
    dataset = client.get("/v1/datasets", headers=alice).json()["data"][0]["id"]
    assert client.delete(f"/v1/datasets/{dataset}", headers=alice).status_code == 204
    assert _post_file(client, alice, "b.npz", second).status_code == 201  # type: ignore[attr-defined]
