"""Worker faults on a real stack (PostgreSQL, Redis, uvicorn, a prefork Celery worker).

* A worker SIGKILLed mid-refine: the job is redelivered, resumes from the stage checkpoint and
  ends with metrics *equal* to those of an uninterrupted job with the same spec and dataset.
* A job whose worker keeps dying: bounded retries, then ``failed`` with ``too_many_attempts``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from api.db import session_scope
from api.models import JobEvent, Model
from tests.reliability.conftest import MAX_ATTEMPTS, FaultStack
from tests.worker.harness import tiny_spec, wait_for, write_tiny_npz

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")
# Enough refine epochs that the kill lands mid-refine; no early stopping so both runs do them all.
REFINE = {"epochs": 25, "early_stopping_patience": 0}


def _kill_job_worker(stack: FaultStack, job_id: str) -> str:
    worker_id = stack.job_row(job_id)["worker_id"]
    assert worker_id, stack.job_row(job_id)
    os.kill(int(worker_id.rpartition(":")[2]), signal.SIGKILL)  # as an OOM kill would
    return str(worker_id)


def _event_kinds(stack: FaultStack, job_id: str) -> list[tuple[str, str]]:
    with session_scope(stack.database_url) as session:
        rows = session.execute(
            select(JobEvent.kind, JobEvent.message)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        )
        return [(kind, message) for kind, message in rows]


def test_killed_mid_refine_resumes_and_matches_an_uninterrupted_run(
    fault_stack: FaultStack, tmp_path: Path
) -> None:
    stack = fault_stack
    dataset = stack.client.upload(write_tiny_npz(tmp_path / "resume.npz", seed=7), name="resume")
    spec = tiny_spec(dataset["id"], finetune=REFINE, seed=3)

    interrupted = stack.client.create_job(spec)
    # A small set refines a cross-fitted ensemble: each member checkpoints in member-<i>/.
    workdir = stack.storage_dir / "jobs" / interrupted["id"]
    wait_for(
        lambda: any(workdir.rglob("refine_state.pt")),
        timeout=240,
        interval=0.1,
        what=f"a refine checkpoint\n{stack.logs()}",
    )
    # While it runs, its dataset cannot be deleted.
    busy = stack.client.http.delete(f"/v1/datasets/{dataset['id']}")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use"
    killed = _kill_job_worker(stack, interrupted["id"])

    resumed = stack.client.wait_for_status(
        interrupted["id"], TERMINAL, timeout=300, service_logs=stack.logs
    )
    assert resumed["status"] == "succeeded", (resumed, stack.logs())
    assert resumed["attempts"] == 2
    row = stack.job_row(interrupted["id"])
    assert row["worker_id"] != killed
    events = _event_kinds(stack, interrupted["id"])
    assert ("restart", "resuming from the last stage checkpoint") in events, events

    uninterrupted = stack.client.create_job(spec)
    twin = stack.client.wait_for_status(
        uninterrupted["id"], TERMINAL, timeout=300, service_logs=stack.logs
    )
    assert twin["status"] == "succeeded" and twin["attempts"] == 1, twin
    for part in ("val", "test", "alignment"):
        assert resumed["metrics"][part] == twin["metrics"][part], (
            part,
            resumed["metrics"],
            twin["metrics"],
        )
    assert resumed["metrics"]["val"], resumed["metrics"]

    # Crash safety: the model row exists only with a complete bundle, and no half-written
    # bundle or work dir of the killed attempt is left behind.
    with session_scope(stack.database_url) as session:
        model = session.get(Model, resumed["model_id"])
        assert model is not None
        bundle = stack.storage_dir / model.storage_key
    assert {"config.json", "metrics.json"} <= {p.name for p in bundle.iterdir()}
    assert any(p.suffix == ".safetensors" for p in bundle.iterdir())
    assert not (stack.storage_dir / "jobs" / interrupted["id"]).exists()
    model_dirs = {p.name for p in (stack.storage_dir / "models").iterdir()}
    assert model_dirs == {resumed["model_id"], twin["model_id"]}, model_dirs


def test_a_job_that_keeps_losing_its_worker_fails_with_too_many_attempts(
    fault_stack: FaultStack, tmp_path: Path
) -> None:
    stack = fault_stack
    dataset = stack.client.upload(write_tiny_npz(tmp_path / "doomed.npz", seed=8), name="doomed")
    job = stack.client.create_job(
        tiny_spec(dataset["id"], finetune={"epochs": 5000, "early_stopping_patience": 0})
    )
    killed: list[str] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):

        def started(n: int = attempt) -> bool:
            row = stack.job_row(job["id"])
            return (
                row["status"] == "running"
                and row["attempts"] == n
                and (row["worker_id"] not in killed)
            )

        wait_for(started, timeout=180, interval=0.1, what=f"attempt {attempt}\n{stack.logs()}")
        killed.append(_kill_job_worker(stack, job["id"]))

    failed = stack.client.wait_for_status(job["id"], TERMINAL, timeout=180, service_logs=stack.logs)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "too_many_attempts"
    assert str(MAX_ATTEMPTS) in failed["error"]["message"]
    assert failed["model_id"] is None
    # The worker itself survived (Celery replaced its pool process) and takes new work.
    assert stack.worker.alive(), stack.logs()
