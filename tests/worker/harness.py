"""Real services for worker and end-to-end tests: a throwaway PostgreSQL database, a Redis db,
Celery worker and uvicorn subprocesses (each in its own process group, always killed), and
small helpers to talk to the API over HTTP and read the database directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_HOST = "127.0.0.1"
PG_PORT = 5432
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


# -- PostgreSQL / Redis ------------------------------------------------------------------------


def _admin_connection() -> Any:
    import psycopg

    last_error: Exception | None = None
    for user in ("postgres", "root"):
        try:
            return psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", autocommit=True
            )
        except psycopg.OperationalError as error:
            last_error = error
    pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}: {last_error}")


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "orca_w") -> Iterator[str]:
    """Create an empty database, migrate it to head, yield its SQLAlchemy URL, drop it after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = _admin_connection()
    user = admin.info.user
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    try:
        from api.db import run_migrations

        run_migrations(url)
        yield url
    finally:
        from api.db import dispose_engines

        dispose_engines()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def dedicated_redis_db(db_number: int) -> Iterator[str]:
    """A Redis logical db emptied before and after use; yields the broker URL."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db_number)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}: {error}")
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db_number}"
    finally:
        client.flushdb()
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- subprocesses -------------------------------------------------------------------------------


def service_env(**orca_settings: str) -> dict[str, str]:
    """The environment for service subprocesses: this checkout importable, offline, few threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCA_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"ORCA_{k.upper()}": v for k, v in orca_settings.items()})
    return env


@dataclass
class Service:
    """A subprocess in its own process group, logging to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_seconds: float = 15.0) -> int | None:
        """SIGTERM the main process, then SIGKILL its whole group; returns the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_seconds)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers (pool children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        return self.process.returncode


def start_service(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Service:
    log_path = log_dir / f"{name}.log"
    handle = log_path.open("wb")
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    handle.close()
    return Service(name, process, log_path)


def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def start_worker(
    env: dict[str, str], log_dir: Path, *, queues: str = "cpu", name: str = "worker"
) -> Service:
    """A real Celery worker (prefork, one process) consuming ``queues``; waits until ready."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "--prefetch-multiplier",
        "1",
        "-n",
        f"{name}-{uuid.uuid4().hex[:6]}@%h",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    service = start_service(name, command, env, log_dir)

    def ready() -> bool:
        if not service.alive():
            raise AssertionError(f"worker exited early:\n{service.tail()}")
        return " ready." in service.log()

    wait_for(ready, timeout=120, what=f"the Celery worker to be ready\n{service.tail()}")
    return service


def start_api(env: dict[str, str], log_dir: Path, *, port: int) -> Service:
    """uvicorn serving ``api.main:app`` on 127.0.0.1:port; waits until /livez answers."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    service = start_service("api", command, env, log_dir)
    wait_for_http(f"http://127.0.0.1:{port}/livez", service, timeout=120)
    return service


@dataclass
class RunningStack:
    """What :func:`running_stack` started: the API on ``url`` and one worker, on fresh stores."""

    database_url: str
    broker_url: str
    data_dir: Path
    log_dir: Path
    env: dict[str, str]
    api: Service
    worker: Service
    url: str

    #: how many lines of the worker's and the API's log :meth:`logs` shows
    log_tail: ClassVar[tuple[int, int]] = (80, 30)

    def logs(self) -> str:
        worker_lines, api_lines = self.log_tail
        return (
            f"--- worker log ---\n{self.worker.tail(worker_lines)}\n"
            f"--- api log ---\n{self.api.tail(api_lines)}"
        )

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"


@contextlib.contextmanager
def running_stack(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *,
    redis_db: int,
    queues: str = "cpu",
    **orca_settings: str,
) -> Iterator[RunningStack]:
    """A fresh Postgres database and Redis db, the API under uvicorn and one Celery worker
    (``name``) consuming ``queues``, all stopped on exit; ``orca_settings`` go to the env."""
    data_dir = tmp_path_factory.mktemp(f"orca-{name}-data")
    log_dir = tmp_path_factory.mktemp(f"orca-{name}-logs")
    with (
        fresh_postgres_database(f"orca_{name}") as database_url,
        dedicated_redis_db(redis_db) as broker_url,
    ):
        env = service_env(
            database_url=database_url,
            broker_url=broker_url,
            data_dir=str(data_dir),
            **orca_settings,
        )
        port = free_port()
        api = start_api(env, log_dir, port=port)
        worker = None
        try:
            worker = start_worker(env, log_dir, queues=queues, name=name)
            yield RunningStack(
                database_url,
                broker_url,
                data_dir,
                log_dir,
                env,
                api,
                worker,
                f"http://127.0.0.1:{port}",
            )
        finally:
            if worker is not None:
                worker.stop()
            api.stop()


def wait_for_http(url: str, service: Service, *, timeout: float) -> None:
    def live() -> bool:
        if not service.alive():
            raise AssertionError(f"{service.name} exited early:\n{service.tail()}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(live, timeout=timeout, what=f"{url} to answer")


# -- data and API helpers -------------------------------------------------------------------------


def write_tiny_npz(
    path: Path, *, n_train: int = 40, n_test: int = 20, length: int = 32, seed: int = 0
) -> Path:
    """Two easy classes of 1-channel sequences (a sine and a ramp plus noise), labels 0/1."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 2 * np.pi, length, dtype=np.float32)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        base = np.where(y[:, None] == 0, np.sin(grid)[None, :], (grid / np.pi - 1)[None, :])
        x = base + 0.1 * rng.standard_normal((n, length))
        return x[:, None, :].astype(np.float32), y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def tiny_spec(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    """A job spec that finishes in seconds on a CPU: the tiny random backbone, few epochs."""
    spec: dict[str, Any] = {
        "dataset_id": dataset_id,
        "backbone": "tiny-bert",
        "allow_random_init": True,
        "queue": "cpu",
        "alignment": {"distance": "otdd_gaussian", "epochs": 1, "max_samples": 64},
        "finetune": {"epochs": 2, "batch_size": 16},
        "seed": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@dataclass
class ApiClient:
    """A bearer-authenticated httpx client for the service under test."""

    base_url: str
    api_key: str
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=120,
        )

    def upload(self, path: Path, name: str = "data") -> dict[str, Any]:
        with path.open("rb") as handle:
            response = self.http.post(
                "/v1/datasets",
                files={"file": (path.name, handle, "application/octet-stream")},
                data={"name": name},
            )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def create_job(
        self, spec: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.http.post("/v1/jobs", json=spec, headers=headers)
        assert response.status_code in (200, 201), response.text
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_for_status(
        self,
        job_id: str,
        statuses: tuple[str, ...],
        *,
        timeout: float,
        service_logs: Callable[[], str] = str,
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        try:
            return dict(
                wait_for(
                    reached, timeout=timeout, interval=0.5, what=f"job {job_id} to reach {statuses}"
                )
            )
        except AssertionError as error:
            raise AssertionError(
                f"{error}; last state {self.job(job_id)}\n{service_logs()}"
            ) from None

    def events(self, job_id: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 100})
        assert response.status_code == 200, response.text
        return list(response.json()["data"])


def create_api_key(database_url: str, tenant: str) -> str:
    """A key for ``tenant`` written straight into the service's database (as `orca keys create`)."""
    from api.db import session_scope
    from api.security import create_key

    with session_scope(database_url) as session:
        return create_key(session, tenant)


def add_tenant_and_dataset(session: Any, tenant: str) -> tuple[str, str]:
    """A tenant and a dataset row (no blob behind it) that job rows can point at; returns their
    ids. For tests that write jobs straight into the database instead of uploading."""
    from api.models import Dataset, Tenant

    owner = Tenant(name=tenant)
    session.add(owner)
    session.flush()
    dataset = Dataset(
        tenant_id=owner.id,
        name="d",
        filename="d.npz",
        format="npz",
        sha256="0" * 64,
        bytes=1,
        storage_key="datasets/00/x.npz",
    )
    session.add(dataset)
    session.flush()
    return owner.id, dataset.id
