"""The production broker can be RabbitMQ instead of Redis by changing one URL (ORCA_BROKER_URL)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.worker.harness import (
    ApiClient,
    create_api_key,
    free_port,
    fresh_postgres_database,
    service_env,
    start_api,
    start_worker,
    tiny_spec,
    write_tiny_npz,
)

pytestmark = pytest.mark.slow

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _rabbitmq_listening() -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", 5672)) == 0


def test_a_job_runs_end_to_end_with_rabbitmq_as_the_broker(tmp_path: Path) -> None:
    if not _rabbitmq_listening():
        pytest.skip("RabbitMQ is not listening on 127.0.0.1:5672 (guest/guest)")
    with fresh_postgres_database("orca_rmq") as database_url:
        env = service_env(
            database_url=database_url, broker_url=RABBITMQ_URL, data_dir=str(tmp_path / "var")
        )
        port = free_port()
        api = start_api(env, tmp_path, port=port)
        worker = start_worker(env, tmp_path, name="rabbitmq")
        try:
            client = ApiClient(f"http://127.0.0.1:{port}", create_api_key(database_url, "rmq"))
            dataset_id = client.upload(write_tiny_npz(tmp_path / "data.npz"))["id"]
            job = client.create_job(tiny_spec(dataset_id))
            done = client.wait_for_status(
                job["id"],
                ("succeeded", "failed", "cancelled"),
                timeout=120,
                service_logs=lambda: worker.tail(40),
            )
            assert done["status"] == "succeeded", done
            assert done["model_id"] and "accuracy" in done["metrics"]["test"]
        finally:
            worker.stop()
            api.stop()
