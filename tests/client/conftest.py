"""A real service for client and CLI tests: a fresh PostgreSQL database, Redis db 9, the API under
uvicorn and one Celery worker, shared by the package's tests and torn down after them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from orca_client import Client
from tests.worker.harness import REPO_ROOT, RunningStack, create_api_key, running_stack

CLIENT_TESTS_REDIS_DB = 9
LABELS = np.array(["ramp", "sine"])

#: A job spec (without dataset_id) that finishes in seconds on a CPU: the tiny random backbone.
TINY_SPEC: dict[str, Any] = {
    "backbone": "tiny-bert",
    "allow_random_init": True,
    "queue": "cpu",
    "alignment": {"distance": "otdd_gaussian", "epochs": 1, "max_samples": 64},
    "finetune": {"epochs": 2, "batch_size": 16},
    "seed": 0,
}


def tiny_arrays(n: int, *, length: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): 1-channel sequences, a noisy sine or ramp, labelled with the strings in LABELS."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 2 * np.pi, length)
    y = LABELS[np.arange(n) % 2]
    base = np.where((y == "sine")[:, None], np.sin(grid)[None, :], (grid / np.pi - 1)[None, :])
    x = base + 0.1 * rng.standard_normal((n, length))
    return x[:, None, :].astype(np.float32), y


@dataclass
class ClientStack(RunningStack):
    api_key: str

    log_tail: ClassVar[tuple[int, int]] = (60, 30)

    def client(self) -> Client:
        return Client(self.url, self.api_key, timeout=60)

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCA_")}
        env.update(
            {
                "ORCA_URL": self.url,
                "ORCA_API_KEY": self.api_key,
                "PYTHONPATH": str(REPO_ROOT),
                "COLUMNS": "120",
            }
        )
        return env

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``orca ARGS`` as a user would, pointed at this service by ORCA_URL/ORCA_API_KEY."""
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=REPO_ROOT,
            env=self.cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="package")
def client_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientStack]:
    with running_stack(
        tmp_path_factory,
        "client",
        redis_db=CLIENT_TESTS_REDIS_DB,
        queues="cpu,gpu",
        events_poll_seconds="0.2",
        max_concurrent_jobs_per_tenant="20",
    ) as running:
        api_key = create_api_key(running.database_url, "client-tests")
        yield ClientStack(**vars(running), api_key=api_key)


@pytest.fixture
def orca(client_stack: ClientStack) -> Iterator[Client]:
    with client_stack.client() as client:
        yield client
