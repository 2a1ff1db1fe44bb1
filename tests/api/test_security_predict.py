"""Prediction requests over the size limits: body bytes (413) and samples per request (422),
and many concurrent clients (more than the database pool and the thread pool hold)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import redis
from fastapi.testclient import TestClient

from api.config import Settings
from api.main import create_app
from tests.api.helpers import assert_envelope
from tests.api.test_models import engine_bundle, install_model, tiny_npz

__all__ = ["engine_bundle", "tiny_npz"]  # fixtures shared with test_models


def test_predict_body_and_batch_limits(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    auth: dict[str, str],
    tiny_npz: Path,
    engine_bundle: Path,
    database_url: str,
    broker: redis.Redis,
) -> None:
    client = make_client(max_predict_body_bytes=20_000, predict_max_inputs=4)
    model = install_model(client, make_settings(), auth, tiny_npz, engine_bundle, database_url)
    url = f"/v1/models/{model}/predict"
    sample = np.load(tiny_npz)["x_train"][0]

    too_big = client.post(
        url, headers={**auth, "Content-Type": "application/json"}, content=b" " * 30_000
    )
    assert_envelope(too_big, 413, code="body_too_large", param="inputs")

    five = np.stack([sample] * 5).tolist()
    assert_envelope(
        client.post(url, headers=auth, json={"inputs": five}), 422, code="too_many_inputs"
    )
    four = client.post(url, headers=auth, json={"inputs": five[:4]})
    assert four.status_code == 200 and len(four.json()["predictions"]) == 4

    wrong_dtype = client.post(url, headers=auth, json={"inputs": [["a"] * sample.shape[-1]]})
    assert_envelope(wrong_dtype, 422, param="inputs")


def test_many_concurrent_predict_clients_do_not_exhaust_the_connection_pool(
    make_client: Callable[..., TestClient],
    make_settings: Callable[..., Settings],
    auth: dict[str, str],
    tiny_npz: Path,
    engine_bundle: Path,
    database_url: str,
    broker: redis.Redis,
) -> None:
    """100 clients at once: more than the 30 pooled connections and the 40 worker threads.

    A request that kept its connection while awaiting the shared forward pass made the others
    block worker threads on the pool until its 30 s timeout, then fail with 500.
    """
    settings = make_settings(predict_rate_per_minute=100_000)
    model = install_model(make_client(), settings, auth, tiny_npz, engine_bundle, database_url)
    app = create_app(settings)
    body = {"inputs": np.load(tiny_npz)["x_train"][0].tolist()}

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
            calls = [
                http.post(f"/v1/models/{model}/predict", headers=auth, json=body)
                for _ in range(100)
            ]
            return [r.status_code for r in await asyncio.gather(*calls)]

    started = time.monotonic()
    statuses = asyncio.run(run())
    assert statuses == [200] * 100, statuses
    assert time.monotonic() - started < 25, "requests queued behind the connection pool"
