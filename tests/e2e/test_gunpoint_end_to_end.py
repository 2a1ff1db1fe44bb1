"""The README's walk-through, for real: export GunPoint with the CLI, upload it, fine-tune the real
MiniLM backbone on the production stack (PostgreSQL + Redis + Celery worker + uvicorn), predict
the test split over HTTP, and check the HTTP predictions reproduce the engine's test accuracy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import ProductionStack
from tests.worker.harness import REPO_ROOT, service_env

pytestmark = pytest.mark.slow


def export_with_cli(name: str, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "export-example", name, str(out)],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_gunpoint_with_minilm_predictions_over_http_match_the_reported_test_accuracy(
    production_stack: ProductionStack, tmp_path: Path
) -> None:
    client = production_stack.client
    npz = export_with_cli("gunpoint", tmp_path / "gunpoint.npz")
    dataset = client.upload(npz, name="gunpoint")
    assert dataset["splits"]["train"] == 50 and dataset["splits"]["test"] == 150

    job = client.create_job(
        {
            "dataset_id": dataset["id"],
            "name": "gunpoint-minilm",
            "backbone": "minilm-l6",
            "alignment": {"distance": "otdd", "epochs": 5, "max_samples": 256},
            "finetune": {"epochs": 10},
            "seed": 0,
        }
    )
    done = client.wait_for_status(
        job["id"],
        ("succeeded", "failed", "cancelled"),
        timeout=600,
        service_logs=production_stack.logs,
    )
    assert done["status"] == "succeeded", done
    assert done["resolved_spec"]["backbone"] == "minilm-l6"
    # the default series embedder: its kernel bank's thresholds (and the whole-series scales the
    # head reads) must travel in the bundle for the HTTP predictions below to reproduce the
    # engine's accuracy
    assert done["resolved_spec"]["embedder_kernel_bank"] is True
    assert done["resolved_spec"]["head_kernel_summary"] is True
    alignment = done["metrics"]["alignment"]
    assert alignment["before"] is not None and alignment["after"] is not None
    reported = done["metrics"]["test"]["accuracy"]

    with np.load(npz) as arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    response = client.http.post(
        f"/v1/models/{done['model_id']}/predict", json={"inputs": x_test.tolist()}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    predictions = np.asarray(answer["predictions"])
    assert predictions.shape == (150,)
    assert set(predictions.tolist()) <= {1, 2}  # the upload's own label values
    assert len(answer["probabilities"]) == 150
    http_accuracy = float(np.mean(predictions == y_test))
    assert abs(http_accuracy - reported) <= 1e-9, (http_accuracy, reported)
    assert http_accuracy > 0.5  # better than chance on a two-class problem
