"""Observability on a real run: the plots are PNGs that follow the job while it trains, and the
Prometheus counters on /metrics move with uploads, jobs and predictions."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.worker.conftest import Stack
from tests.worker.harness import tiny_spec, wait_for, write_tiny_npz

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decoded_png(content: bytes) -> Image.Image:
    """The image, after checking the bytes are one complete, valid PNG."""
    assert content.startswith(PNG_SIGNATURE)
    Image.open(io.BytesIO(content)).verify()  # checksums and structure
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG" and image.width > 100 and image.height > 100
    image.load()
    return image


def refine_epochs_recorded(stack: Stack, job_id: str) -> int:
    return sum(
        1
        for event in stack.client.events(job_id)
        if event["kind"] == "metric" and (event["data"] or {}).get("stage") == "refine"
    )


def test_training_plot_is_a_png_that_changes_while_the_job_runs(
    stack: Stack, tmp_path: Path
) -> None:
    client = stack.client
    dataset = client.upload(write_tiny_npz(tmp_path / "plots.npz", seed=7), name="plots")
    epochs = 60  # long enough to catch the refinement half way; no early stop
    job = client.create_job(
        tiny_spec(dataset["id"], finetune={"epochs": epochs, "early_stopping_patience": 0})
    )
    plot_url = f"/v1/jobs/{job['id']}/plots/training.png"
    assert client.http.get(plot_url).status_code == 404  # nothing trained yet

    def mid_run_plot() -> bytes | None:
        response = client.http.get(plot_url)
        if response.status_code == 200:
            return response.content
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "plot_not_ready"
        assert client.job(job["id"])["status"] not in TERMINAL, "finished before any plot"
        return None

    mid_run = wait_for(mid_run_plot, timeout=300, interval=0.1, what="a first training plot")
    seen_by_then = refine_epochs_recorded(stack, job["id"])
    # The plot was drawn from at most this many epochs: strictly part of the run.
    assert 1 <= seen_by_then < epochs, seen_by_then

    done = client.wait_for_status(job["id"], TERMINAL, timeout=300, service_logs=stack.logs)
    assert done["status"] == "succeeded", done
    final_response = client.http.get(plot_url)
    assert final_response.status_code == 200
    assert final_response.headers["content-type"] == "image/png"
    assert final_response.headers["cache-control"] == "no-store"  # a browser must not keep it
    final = final_response.content

    mid_image, final_image = decoded_png(mid_run), decoded_png(final)
    assert mid_run != final
    assert mid_image.size != final_image.size or mid_image.tobytes() != final_image.tobytes()
    # Once finished the plot is stable: it comes from the stored curves.
    assert client.http.get(plot_url).content == final
    alignment = client.http.get(f"/v1/jobs/{job['id']}/plots/alignment.png")
    assert alignment.status_code == 200
    decoded_png(alignment.content)


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics keyed by (name, sorted labels); no API key is needed."""
    response = httpx.get(stack.client.base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def jobs_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _labels), v in samples.items() if name == "orca_jobs")


def test_metrics_counters_move_with_an_upload_a_job_and_a_prediction(
    stack: Stack, tmp_path: Path
) -> None:
    client = stack.client
    path = write_tiny_npz(tmp_path / "metrics.npz", seed=8)
    before = scrape(stack)

    dataset = client.upload(path, name="metrics")
    after_upload = scrape(stack)
    assert dataset["bytes"] == path.stat().st_size
    assert value(after_upload, "orca_upload_bytes_total") == value(
        before, "orca_upload_bytes_total"
    ) + float(dataset["bytes"])
    upload_route = {"method": "POST", "route": "/v1/datasets", "status": "201"}
    assert (
        value(after_upload, "orca_http_requests_total", **upload_route)
        == value(before, "orca_http_requests_total", **upload_route) + 1
    )

    job = client.create_job(tiny_spec(dataset["id"]))
    after_create = scrape(stack)
    assert jobs_total(after_create) == jobs_total(before) + 1  # one more job, in some state
    done = client.wait_for_status(job["id"], TERMINAL, timeout=300, service_logs=stack.logs)
    assert done["status"] == "succeeded", done
    after_job = scrape(stack)
    assert value(after_job, "orca_jobs", state="succeeded") >= (
        value(before, "orca_jobs", state="succeeded") + 1
    )
    assert jobs_total(after_job) == jobs_total(after_create)

    with np.load(path) as arrays:
        x_test = arrays["x_test"][:5]
    started = time.monotonic()
    response = client.http.post(
        f"/v1/models/{done['model_id']}/predict", json={"inputs": x_test.tolist()}
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    after_predict = scrape(stack)
    count_before = value(after_job, "orca_predict_seconds_count")
    assert value(after_predict, "orca_predict_seconds_count") == count_before + 1
    observed = value(after_predict, "orca_predict_seconds_sum") - value(
        after_job, "orca_predict_seconds_sum"
    )
    assert 0 < observed <= elapsed  # the histogram saw this request's latency
    assert value(after_predict, "orca_predict_batch_size_count") >= (
        value(after_job, "orca_predict_batch_size_count") + 1
    )
    assert value(after_predict, "orca_predict_batch_size_sum") >= value(
        after_job, "orca_predict_batch_size_sum"
    ) + len(x_test)
    predict_route = {
        "method": "POST",
        "route": "/v1/models/{model_id}/predict",
        "status": "200",
    }
    assert (
        value(after_predict, "orca_http_requests_total", **predict_route)
        == value(after_job, "orca_http_requests_total", **predict_route) + 1
    )
