"""Dependency outages and API crashes.

* Broker down: a redis-server of our own (another loopback port) is stopped and started again;
  /readyz answers 503 naming the broker while it is down, and 200 again by itself after.
* Database down: PostgreSQL is reached through a loopback TCP relay that the test cuts and
  restores (the shared server on 5432 is never touched); /readyz follows the same way.
* The API SIGKILLed in the middle of an upload: no dataset appears, and the partial temp file is
  removed when the API starts again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.config import Settings
from api.db import session_scope
from api.main import create_app
from api.models import Dataset
from tests.reliability.conftest import FaultStack
from tests.worker.harness import free_port, start_api, wait_for

pytestmark = pytest.mark.slow


class TcpRelay:
    """A loopback TCP relay to ``target`` that can be cut (listener and every connection closed)
    and restored on the same port: from the client's side, the server went away and came back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown() wakes the thread blocked in accept() and stops listening at once.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def _postgres_user() -> str:
    for user in ("postgres", "root"):
        try:
            psycopg.connect(host="127.0.0.1", port=5432, user=user, dbname="test").close()
            return user
        except psycopg.OperationalError:
            continue
    pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")


@contextlib.contextmanager
def own_redis_server(port: int, workdir: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A throwaway redis-server on ``port``; yields a function that (re)starts it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [
                *(binary, "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        processes.append(process)
        wait_for(lambda: _port_open(port), timeout=20, what=f"redis-server on {port}")
        return process

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_readyz_is_503_while_broker_or_database_is_down_and_recovers_by_itself(
    tmp_path: Path,
) -> None:
    redis_port = free_port()
    relay = TcpRelay(("127.0.0.1", 5432))
    relay.start()
    user = _postgres_user()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path / "var",
        database_url=f"postgresql+psycopg://{user}@127.0.0.1:{relay.port}/test",
        broker_url=f"redis://127.0.0.1:{redis_port}/0",
        broker_timeout_seconds=0.5,
    )
    with (
        own_redis_server(redis_port, tmp_path) as start_redis,
        TestClient(create_app(settings)) as client,
    ):
        redis_server = start_redis()

        def checks() -> tuple[int, dict[str, str]]:
            response = client.get("/readyz")
            return response.status_code, response.json()["checks"]

        assert checks() == (200, {"database": "ok", "broker": "ok", "storage": "ok"})

        redis_server.terminate()
        redis_server.wait(timeout=10)
        status, down = checks()
        assert status == 503 and down["broker"].startswith("failed"), down
        assert down["database"] == "ok"
        start_redis()
        wait_for(
            lambda: checks()[0] == 200, timeout=20, what="readiness after the broker came back"
        )

        relay.cut()
        status, down = checks()
        assert status == 503 and down["database"].startswith("failed"), down
        assert down["broker"] == "ok"
        relay.start()
        wait_for(
            lambda: checks()[0] == 200, timeout=20, what="readiness after the database came back"
        )
    relay.cut()


def test_api_killed_mid_upload_leaves_no_dataset_and_its_temp_file_is_swept_on_restart(
    fault_stack: FaultStack, tmp_path: Path
) -> None:
    port = free_port()
    api = start_api(fault_stack.env, tmp_path, port=port)
    tmp_dir = fault_stack.storage_dir / "tmp"
    marker = f"upload-{api.process.pid}@"
    boundary = "crashboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    declared = len(head) + 50_000_000
    try:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                (
                    f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {fault_stack.client.api_key}\r\n"
                    f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                    f"Content-Length: {declared}\r\n\r\n"
                ).encode()
                + head
            )
            for _ in range(40):  # 2.6 MB of a declared 50 MB, then the API dies
                conn.sendall(b"\x01" * 65536)

            def partial_files() -> list[Path]:
                if not tmp_dir.is_dir():
                    return []
                return [p for p in tmp_dir.iterdir() if p.name.startswith(marker)]

            [partial] = wait_for(partial_files, timeout=30, what="the upload's temp file")
            wait_for(lambda: partial.stat().st_size > 0, timeout=30, what="bytes on disk")
            os.killpg(api.process.pid, signal.SIGKILL)
            api.process.wait(timeout=10)
    finally:
        api.stop()

    assert partial.exists(), "the test needs a leftover to sweep"
    with session_scope(fault_stack.database_url) as session:
        assert session.scalar(select(func.count()).where(Dataset.filename == "big.npz")) == 0
    listed = fault_stack.client.http.get("/v1/datasets", params={"limit": 100}).json()["data"]
    assert all(d["filename"] != "big.npz" for d in listed), listed

    restarted = start_api(fault_stack.env, tmp_path, port=free_port())
    try:
        wait_for(lambda: not partial.exists(), timeout=10, what="the stale temp file to go")
    finally:
        restarted.stop()
