"""Models: a real bundle from the engine (tiny-bert, a few seconds), served by the API:
download, predict (JSON / .npy, one sample / batch), micro-batching, rate limit, deletion."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from api import metrics as prom
from api.config import Settings
from api.db import session_scope
from api.main import create_app
from api.models import Job, Model
from api.storage import LocalStorage
from tests.api.helpers import assert_envelope, upload

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("orca_engine.pipeline") is None,
    reason="orca_engine.pipeline is not written yet (engine helpers)",
)

SAMPLE_SHAPE = (1, 16)
LABELS = (3, 7)  # original label values; predictions must come back in this space


def _tiny_dataset(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.array(LABELS * 20)
    x = rng.normal(size=(len(y), *SAMPLE_SHAPE)).astype(np.float32)
    x[y == LABELS[1]] += 1.5
    np.savez(path, x_train=x, y_train=y)
    return path


TINY_SPEC: dict[str, Any] = {
    "backbone": "tiny-bert",
    "alignment": {"epochs": 1, "max_samples": 20},
    "finetune": {"epochs": 1, "batch_size": 8},
    "allow_random_init": True,
}


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_dataset(tmp_path_factory.mktemp("tiny") / "tiny.npz")


@pytest.fixture(scope="session")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path) -> Path:
    """A real bundle trained by the engine once per session."""
    from orca_engine.pipeline import run_job

    root = tmp_path_factory.mktemp("bundle")
    result = run_job(
        {"dataset_id": "ds_tiny", **TINY_SPEC},
        tiny_npz,
        root / "work",
        bundle_dir=root / "bundle",
        device="cpu",
    )
    return Path(result.bundle_dir)


def install_model(
    client: TestClient,
    settings: Settings,
    headers: dict[str, str],
    npz: Path,
    bundle: Path,
    database_url: str,
) -> str:
    """Upload + job through the API, then finish the job the way the worker does."""
    dataset = upload(client, headers, npz).json()["id"]
    job = client.post("/v1/jobs", headers=headers, json={"dataset_id": dataset, **TINY_SPEC}).json()
    storage = LocalStorage(settings.resolved_storage_dir)
    with session_scope(database_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        model = Model(
            tenant_id=row.tenant_id,
            job_id=row.id,
            dataset_id=dataset,
            name="tiny",
            storage_key="",
            bytes=sum(p.stat().st_size for p in bundle.iterdir()),
            task_spec={"spec": row.spec},
            metrics={"val": {"accuracy": 1.0}},
        )
        session.add(model)
        session.flush()
        model.storage_key = storage.model_key(model.id)
        shutil.copytree(bundle, storage.model_dir(model.id))
        row.status, row.model_id, row.progress = "succeeded", model.id, 1.0
        return model.id


@pytest.fixture()
def model_id(
    client: TestClient,
    settings: Settings,
    auth: dict[str, str],
    tiny_npz: Path,
    engine_bundle: Path,
    database_url: str,
) -> str:
    return install_model(client, settings, auth, tiny_npz, engine_bundle, database_url)


def test_model_listing_and_download(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    listed = client.get("/v1/models", headers=auth).json()
    assert [m["id"] for m in listed["data"]] == [model_id] and listed["has_more"] is False
    model = client.get(f"/v1/models/{model_id}", headers=auth).json()
    assert model["metrics"] == {"val": {"accuracy": 1.0}}
    response = client.get(f"/v1/models/{model_id}/download", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert f"{model_id}.zip" in response.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    names = set(archive.namelist())
    assert {"model.safetensors", "config.json", "metrics.json", "curves.json"} <= names


def test_predict_json_and_npy(
    client: TestClient, auth: dict[str, str], model_id: str, tiny_npz: Path, engine_bundle: Path
) -> None:
    from orca_engine.predict import load_model

    x = np.load(tiny_npz)["x_train"][:5]
    expected = load_model(engine_bundle).predict(x)
    url = f"/v1/models/{model_id}/predict"

    batch = client.post(url, headers=auth, json={"inputs": x.tolist()})
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["model_id"] == model_id
    assert body["predictions"] == expected.predictions
    assert set(body["predictions"]) <= set(LABELS)
    assert np.allclose(body["probabilities"], expected.probabilities, atol=1e-5)
    assert np.allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-5)

    one = client.post(url, headers=auth, json={"inputs": x[0].tolist()}).json()
    assert one["predictions"] == expected.predictions[:1] and len(one["probabilities"]) == 1

    # JSON has no NaN: a shorter series pads with null, read as an upload's trailing padding
    padded = x.tolist()
    padded[0][0][-3:] = [None] * 3
    zero_filled = x.copy()
    zero_filled[0, 0, -3:] = 0.0
    nulls = client.post(url, headers=auth, json={"inputs": padded})
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["predictions"] == load_model(engine_bundle).predict(zero_filled).predictions

    buffer = io.BytesIO()
    np.save(buffer, x)
    npy = client.post(
        url, headers={**auth, "Content-Type": "application/x-npy"}, content=buffer.getvalue()
    )
    assert npy.status_code == 200 and npy.json()["predictions"] == expected.predictions


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        ({"inputs": [[1.0, 2.0]]}, "json"),
        ({"inputs": [[[float("nan")] * 16]]}, "json"),
        ({"inputs": [[[1.0] * 8 + [None] + [1.0] * 7]]}, "json"),  # null in a gap
        ({"inputs": [["a"] * 16]}, "json"),
        ({"inputs": [[[1.0] * 16], [[1.0] * 15]]}, "json"),
        ({"inputs": []}, "json"),
        (np.zeros(SAMPLE_SHAPE, np.float32), "npy"),  # an .npy body must be a batch
        (np.full((2, *SAMPLE_SHAPE), np.inf, np.float32), "npy"),
        (b"not an npy file", "raw"),
    ],
)
def test_bad_inputs_are_422_naming_inputs(
    client: TestClient, auth: dict[str, str], model_id: str, payload: Any, content_type: str
) -> None:
    url = f"/v1/models/{model_id}/predict"
    if content_type == "json":
        # Python's json writes NaN as the bare literal, as many clients do.
        response = client.post(
            url, headers={**auth, "Content-Type": "application/json"}, content=json.dumps(payload)
        )
    else:
        data = payload
        if isinstance(payload, np.ndarray):
            buffer = io.BytesIO()
            np.save(buffer, payload)
            data = buffer.getvalue()
        response = client.post(
            url, headers={**auth, "Content-Type": "application/octet-stream"}, content=data
        )
    assert_envelope(response, 422, param="inputs")


def test_object_npy_is_refused_without_unpickling(
    client: TestClient, auth: dict[str, str], model_id: str
) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    response = client.post(
        f"/v1/models/{model_id}/predict",
        headers={**auth, "Content-Type": "application/x-npy"},
        content=buffer.getvalue(),
    )
    assert_envelope(response, 422, code="invalid_npy", param="inputs")


def test_concurrent_requests_share_a_forward_pass(
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
    auth: dict[str, str],
    tiny_npz: Path,
    engine_bundle: Path,
    database_url: str,
    broker: redis.Redis,
) -> None:
    settings = make_settings(predict_batch_window_ms=300)
    model = install_model(make_client(), settings, auth, tiny_npz, engine_bundle, database_url)
    x = np.load(tiny_npz)["x_train"][:6]
    app = create_app(settings)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            url = f"/v1/models/{model}/predict"
            await http.post(url, headers=auth, json={"inputs": x[0].tolist()})  # load the model
            before = _batches()
            responses = await asyncio.gather(
                *(http.post(url, headers=auth, json={"inputs": sample.tolist()}) for sample in x)
            )
            passes = _batches() - before
            assert passes == 1, f"{passes} forward passes for {len(x)} concurrent requests"
            return list(responses)

    responses = asyncio.run(run())
    from orca_engine.predict import load_model

    expected = load_model(engine_bundle).predict(x).predictions
    assert [r.json()["predictions"][0] for r in responses] == expected


def _batches() -> int:
    return int(
        next(
            sample.value
            for metric in prom.PREDICT_BATCH_SIZE.collect()
            for sample in metric.samples
            if sample.name.endswith("_count")
        )
    )


def test_predict_rate_limit(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    auth: dict[str, str],
    tiny_npz: Path,
    engine_bundle: Path,
    database_url: str,
    broker: redis.Redis,
) -> None:
    client = make_client(predict_rate_per_minute=2)
    model = install_model(client, make_settings(), auth, tiny_npz, engine_bundle, database_url)
    sample = np.load(tiny_npz)["x_train"][0].tolist()
    url = f"/v1/models/{model}/predict"
    assert [
        client.post(url, headers=auth, json={"inputs": sample}).status_code for _ in range(2)
    ] == [200, 200]
    limited = client.post(url, headers=auth, json={"inputs": sample})
    assert_envelope(limited, 429, code="rate_limited")
    assert int(limited.headers["retry-after"]) >= 1


def test_delete_model_removes_files(
    client: TestClient, settings: Settings, auth: dict[str, str], model_id: str
) -> None:
    directory = LocalStorage(settings.resolved_storage_dir).model_dir(model_id)
    assert directory.is_dir()
    assert client.delete(f"/v1/models/{model_id}", headers=auth).status_code == 204
    assert not directory.exists()
    for method, path in [("get", ""), ("get", "/download"), ("post", "/predict"), ("delete", "")]:
        response = client.request(
            method, f"/v1/models/{model_id}{path}", headers=auth, json={"inputs": [0]}
        )
        assert_envelope(response, 404, code="model_not_found")


def test_requests_arriving_during_a_pass_go_together_in_the_next(
    tiny_npz: Path, engine_bundle: Path
) -> None:
    """Under load the batch grows to what arrived during one pass (no timer-sized dribble)."""
    from concurrent.futures import ThreadPoolExecutor

    from api.predict_service import MicroBatcher
    from orca_engine.predict import load_model

    predictor = load_model(engine_bundle)
    x = np.load(tiny_npz)["x_train"][:12]
    executor = ThreadPoolExecutor(max_workers=1)
    # window 0: without a pass in flight every request would go at once, alone
    batcher = MicroBatcher(predictor=predictor, window_seconds=0.0, max_batch=8, executor=executor)

    async def run() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(batcher.submit(x[i : i + 1]) for i in range(len(x)))))

    before = _batches()
    try:
        results = asyncio.run(run())
    finally:
        executor.shutdown()
    # the first request runs alone; the 11 that arrived meanwhile go as 8 (max_batch) + 3
    assert _batches() - before == 3
    assert [r["predictions"][0] for r in results] == predictor.predict(x).predictions
