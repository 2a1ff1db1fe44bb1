"""`orca serve` on a bare machine: SQLite + the SQLite-file Celery broker + its embedded worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.worker.harness import (
    REPO_ROOT,
    ApiClient,
    free_port,
    service_env,
    tiny_spec,
    wait_for,
    wait_for_http,
    write_tiny_npz,
)
from tests.worker.harness import Service as ServiceProcess

pytestmark = pytest.mark.slow


def pids_with_data_dir(data_dir: Path) -> list[int]:
    """Processes whose environment names ``data_dir``: the server and everything it started."""
    needle = f"ORCA_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[tuple[ServiceProcess, str, Path]]:
    data_dir = (tmp_path / "orca-data").resolve()
    port = free_port()
    env = service_env(data_dir=str(data_dir))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--host", "127.0.0.1"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = ServiceProcess("orca-serve", process, log_path)
    try:
        yield server, f"http://127.0.0.1:{port}", data_dir
    finally:
        server.stop(grace_seconds=30)
        for pid in pids_with_data_dir(data_dir):  # never leave a child behind, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_orca_serve_runs_a_job_end_to_end_and_stops_cleanly(
    embedded_server: tuple[ServiceProcess, str, Path], tmp_path: Path
) -> None:
    server, url, data_dir = embedded_server
    wait_for_http(f"{url}/livez", server, timeout=180)
    key_file = data_dir / "local-api-key"
    assert key_file.is_file()
    assert key_file.stat().st_mode & 0o777 == 0o600
    api_key = key_file.read_text().strip()
    wait_for(lambda: api_key in server.log(), timeout=30, what="serve to print the key")

    client = ApiClient(url, api_key)
    npz = write_tiny_npz(tmp_path / "tiny.npz", seed=7)
    dataset = client.upload(npz, name="tiny")
    spec = tiny_spec(dataset["id"])
    spec.pop("queue")  # "auto": the embedded worker consumes every queue
    job = client.create_job(spec)
    done = client.wait_for_status(
        job["id"], ("succeeded", "failed", "cancelled"), timeout=300, service_logs=server.tail
    )
    assert done["status"] == "succeeded", done
    # The embedded default: state and queue are SQLite files under the data dir.
    assert (data_dir / "orca.db").is_file() and (data_dir / "broker.db").is_file()

    with np.load(npz) as arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    answer = client.http.post(
        f"/v1/models/{done['model_id']}/predict", json={"inputs": x_test.tolist()}
    ).json()
    accuracy = float(np.mean(np.asarray(answer["predictions"]) == y_test))
    assert abs(accuracy - done["metrics"]["test"]["accuracy"]) <= 1e-9

    # Ctrl-C / SIGTERM stops the API and the worker, and the exit is clean.
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.tail()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/livez", timeout=2)
    wait_for(lambda: not pids_with_data_dir(data_dir), timeout=30, what="the children to exit")


def test_orca_serve_shows_the_same_key_again(tmp_path: Path) -> None:
    """A second `serve` (here: the key set-up step alone) reuses the stored local key."""
    data_dir = (tmp_path / "orca-data").resolve()
    code = (
        "import sys; from pathlib import Path; from cli.main import _settings, ensure_local_key;"
        "from api.db import run_migrations; s = _settings(Path(sys.argv[1]));"
        "run_migrations(s.resolved_database_url); print(ensure_local_key(s.data_dir.resolve()))"
    )
    keys = [
        subprocess.run(
            [sys.executable, "-c", code, str(data_dir)],
            cwd=REPO_ROOT,
            env=service_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert keys[0] == keys[1] and keys[0].startswith("orca_")


def test_a_killed_orca_serve_takes_its_api_and_worker_with_it(
    embedded_server: tuple[ServiceProcess, str, Path],
) -> None:
    """SIGKILL (an OOM kill, ``kill -9``) leaves `serve` no time to stop its children itself."""
    server, url, data_dir = embedded_server
    wait_for_http(f"{url}/livez", server, timeout=180)
    children = [pid for pid in pids_with_data_dir(data_dir) if pid != server.process.pid]
    assert len(children) >= 2, children  # the API and the worker (and the worker's pool)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    wait_for(
        lambda: not pids_with_data_dir(data_dir),
        timeout=60,
        what=f"the API and the worker to exit after their parent was killed\n{server.tail()}",
    )
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/livez", timeout=2)
