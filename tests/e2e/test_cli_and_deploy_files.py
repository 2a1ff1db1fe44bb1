"""The operator CLI (keys, migrate, export-example) and the docker-compose file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.worker.harness import REPO_ROOT, service_env


def orca(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO_ROOT,
        env=service_env(data_dir=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "channels"),
    [("gunpoint", 50, 150, 1), ("italypower", 67, 1029, 1), ("basicmotions", 40, 40, 6)],
)
def test_export_example_writes_an_uploadable_npz(
    tmp_path: Path, name: str, n_train: int, n_test: int, channels: int
) -> None:
    out = tmp_path / f"{name}.npz"
    result = orca("export-example", name, str(out), data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(out, allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert arrays["x_train"].shape[:2] == (n_train, channels)
        assert arrays["x_test"].shape[0] == n_test
        assert arrays["x_train"].dtype == np.float32
        assert len(np.unique(arrays["y_train"])) >= 2


def test_export_example_rejects_an_unknown_name(tmp_path: Path) -> None:
    result = orca("export-example", "mnist", str(tmp_path / "x.npz"), data_dir=tmp_path)
    assert result.returncode == 2
    assert "gunpoint" in result.stdout + result.stderr


def test_keys_created_by_the_cli_authenticate_until_revoked(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    assert orca("migrate", data_dir=tmp_path).returncode == 0
    created = orca("keys", "create", "--tenant", "acme", data_dir=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("orca_")

    from api.config import Settings
    from api.main import create_app

    settings = Settings(data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/datasets", headers=headers).status_code == 200
        revoked = orca("keys", "revoke", key[:12], data_dir=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        assert client.get("/v1/datasets", headers=headers).status_code == 401

    missing = orca("keys", "revoke", "orca_nothing", data_dir=tmp_path)
    assert missing.returncode == 1


def test_docker_compose_file_is_valid() -> None:
    if shutil.which("docker-compose"):
        command = ["docker-compose", "config", "-q"]
    elif (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        command = ["docker", "compose", "config", "-q"]
    else:
        pytest.skip("no compose client installed (apt-get install docker-compose) to validate it")
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flags", [[], ["--cpu", "--gpu", "0"]])
def test_worker_needs_exactly_one_of_gpu_or_cpu(tmp_path: Path, flags: list[str]) -> None:
    result = orca("worker", *flags, data_dir=tmp_path)
    assert result.returncode == 2
    assert "exactly one of --gpu N or --cpu" in result.stdout + result.stderr
