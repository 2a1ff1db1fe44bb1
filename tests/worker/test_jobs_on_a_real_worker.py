"""Jobs created over HTTP and run by a real Celery worker on PostgreSQL + Redis."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from api.db import session_scope
from api.models import Job, JobEvent, Model
from tests.worker.conftest import LOST_AFTER_SECONDS, Stack
from tests.worker.harness import tiny_spec, wait_for, write_tiny_npz

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")


def job_row(stack: Stack, job_id: str) -> dict[str, Any]:
    with session_scope(stack.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return {
            "status": job.status,
            "stage": job.stage,
            "progress": job.progress,
            "attempts": job.attempts,
            "worker_id": job.worker_id,
            "error": job.error,
            "model_id": job.model_id,
            "metrics": job.metrics,
            "resolved_spec": job.resolved_spec,
            "eta_seconds": job.eta_seconds,
        }


def event_rows(stack: Stack, job_id: str) -> list[tuple[str, str]]:
    with session_scope(stack.database_url) as session:
        rows = session.execute(
            select(JobEvent.kind, JobEvent.message)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        )
        return [(kind, message) for kind, message in rows]


def upload_tiny(stack: Stack, tmp_path: Path, seed: int, **shape: int) -> str:
    path = write_tiny_npz(tmp_path / f"tiny-{seed}.npz", seed=seed, **shape)
    return str(stack.client.upload(path, name=f"tiny-{seed}")["id"])


def test_job_goes_queued_running_succeeded_and_idempotency_key_makes_one_job(
    stack: Stack, tmp_path: Path
) -> None:
    dataset_id = upload_tiny(stack, tmp_path, seed=1)
    spec = tiny_spec(dataset_id, finetune={"epochs": 4})
    first = stack.client.create_job(spec, idempotency_key="lifecycle-1")
    again = stack.client.create_job(spec, idempotency_key="lifecycle-1")
    assert again["id"] == first["id"]
    assert first["status"] == "queued"
    job_id = first["id"]

    seen: list[dict[str, Any]] = []

    def finished() -> bool:
        row = job_row(stack, job_id)
        seen.append(row)
        return row["status"] in TERMINAL

    wait_for(finished, timeout=240, interval=0.2, what=f"job {job_id} to finish\n{stack.logs()}")
    final = seen[-1]
    assert final["status"] == "succeeded", (final, stack.logs())
    assert any(row["status"] == "running" for row in seen), "never observed the job running"
    running_progress = [row["progress"] for row in seen if row["status"] == "running"]
    assert running_progress == sorted(running_progress), "progress went backwards"
    # A tiny job can pass a stage between two polls, so the stage order comes from the event log.
    stage_events = [
        message.split(":")[0] for kind, message in event_rows(stack, job_id) if kind == "stage"
    ]
    assert [s for s in stage_events if s in ("prepare", "refine", "evaluate", "export")] == [
        "prepare",
        "refine",
        "evaluate",
        "export",
    ], stage_events
    assert {row["stage"] for row in seen if row["stage"]} <= {
        "prepare",
        "align",
        "refine",
        "evaluate",
        "export",
    }
    assert final["progress"] == 1.0
    assert final["attempts"] == 1
    assert final["resolved_spec"]["backbone"] == "tiny-bert"
    assert 0.0 <= final["metrics"]["test"]["accuracy"] <= 1.0
    assert "accuracy" in final["metrics"]["val"]

    with session_scope(stack.database_url) as session:
        n_jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.idempotency_key == "lifecycle-1")
        )
        model = session.get(Model, final["model_id"])
        assert model is not None
        bundle = stack.storage_dir / model.storage_key
    assert n_jobs == 1
    assert (bundle / "config.json").is_file() and model.bytes > 0
    assert model.metrics["test"] == final["metrics"]["test"]

    kinds = [kind for kind, _ in event_rows(stack, job_id)]
    assert "choice" in kinds and "restart" not in kinds
    public = stack.client.job(job_id)
    assert public["status"] == "succeeded" and public["model_id"] == final["model_id"]


def test_cancel_stops_a_running_job_within_seconds_and_the_worker_takes_the_next(
    stack: Stack, tmp_path: Path
) -> None:
    dataset_id = upload_tiny(stack, tmp_path, seed=2)
    # Thousands of epochs and no early stopping: this job only ends when it is cancelled.
    long_job = stack.client.create_job(
        tiny_spec(dataset_id, finetune={"epochs": 5000, "early_stopping_patience": 0})
    )
    next_job = stack.client.create_job(tiny_spec(dataset_id, seed=1))

    wait_for(
        lambda: job_row(stack, long_job["id"])["stage"] == "refine",
        timeout=180,
        what=f"the long job to reach refine\n{stack.logs()}",
    )
    assert job_row(stack, next_job["id"])["status"] == "queued"  # one job at a time per worker

    response = stack.client.http.post(f"/v1/jobs/{long_job['id']}/cancel")
    assert response.status_code == 200, response.text
    asked = time.monotonic()
    wait_for(
        lambda: job_row(stack, long_job["id"])["status"] == "cancelled",
        timeout=30,
        interval=0.2,
        what=f"the job to be cancelled\n{stack.logs()}",
    )
    assert time.monotonic() - asked < 10, "cancellation took more than 10 s"
    cancelled = job_row(stack, long_job["id"])
    assert cancelled["model_id"] is None and cancelled["error"] is None

    done = stack.client.wait_for_status(
        next_job["id"], TERMINAL, timeout=240, service_logs=stack.logs
    )
    assert done["status"] == "succeeded", done


def test_job_whose_dataset_file_vanished_fails_with_an_actionable_error(
    stack: Stack, tmp_path: Path
) -> None:
    dataset = stack.client.upload(write_tiny_npz(tmp_path / "gone.npz", seed=3), name="gone")
    blob = next((stack.storage_dir / "datasets").rglob(f"{dataset['sha256']}.*"))
    blob.unlink()  # behind the API's back

    job = stack.client.create_job(tiny_spec(dataset["id"]))
    failed = stack.client.wait_for_status(job["id"], TERMINAL, timeout=120, service_logs=stack.logs)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "dataset_missing"
    assert dataset["id"] in failed["error"]["message"]
    assert "upload" in failed["error"]["message"]
    assert "Traceback" not in failed["error"]["message"]


def test_job_survives_its_worker_process_being_killed(stack: Stack, tmp_path: Path) -> None:
    dataset_id = upload_tiny(stack, tmp_path, seed=4)
    job = stack.client.create_job(tiny_spec(dataset_id, finetune={"epochs": 40}))
    wait_for(
        lambda: job_row(stack, job["id"])["stage"] == "refine",
        timeout=180,
        what=f"the job to reach refine\n{stack.logs()}",
    )
    worker_id = job_row(stack, job["id"])["worker_id"]
    pid = int(worker_id.rpartition(":")[2])
    os.kill(pid, signal.SIGKILL)  # the pool process dies mid-job, as on an OOM kill

    done = stack.client.wait_for_status(job["id"], TERMINAL, timeout=240, service_logs=stack.logs)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    events = event_rows(stack, job["id"])
    assert ("restart", "resuming from the last stage checkpoint") in events


def test_reaper_requeues_a_job_whose_worker_stopped_beating(stack: Stack, tmp_path: Path) -> None:
    dataset_id = upload_tiny(stack, tmp_path, seed=5)
    tenant_id = _tenant_of(stack, dataset_id)
    then = datetime.now(UTC) - timedelta(hours=1)
    with session_scope(stack.database_url) as session:
        ghost = Job(
            tenant_id=tenant_id,
            dataset_id=dataset_id,
            spec=tiny_spec(dataset_id),
            status="running",
            stage="refine",
            queue="cpu",
            attempts=1,
            worker_id="ghost-host:4242",
            heartbeat_at=then,
            started_at=then,
        )
        session.add(ghost)
        session.flush()
        job_id = ghost.id

    done = stack.client.wait_for_status(
        job_id, TERMINAL, timeout=LOST_AFTER_SECONDS * 3 + 180, service_logs=stack.logs
    )
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    events = event_rows(stack, job_id)
    assert ("status", "worker lost; requeued") in events
    assert ("restart", "resuming from the last stage checkpoint") in events


def _tenant_of(stack: Stack, dataset_id: str) -> str:
    from api.models import Dataset

    with session_scope(stack.database_url) as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        return dataset.tenant_id


def test_reap_lost_jobs_requeues_or_gives_up_and_leaves_live_jobs_alone() -> None:
    from api.config import Settings
    from tests.worker.harness import add_tenant_and_dataset, fresh_postgres_database
    from worker.heartbeat import reap_lost_jobs

    now = datetime.now(UTC)
    stale = now - timedelta(seconds=300)
    with fresh_postgres_database("orca_r") as url:
        settings = Settings(database_url=url, worker_lost_after_seconds=60, job_max_attempts=2)
        with session_scope(url) as session:
            tenant_id, dataset_id = add_tenant_and_dataset(session, "reaper")

            def job(**fields: Any) -> Job:
                row = Job(tenant_id=tenant_id, dataset_id=dataset_id, queue="gpu", **fields)
                session.add(row)
                return row

            lost_once = job(status="running", attempts=1, worker_id="a:1", heartbeat_at=stale)
            lost_too_often = job(status="running", attempts=2, worker_id="b:1", heartbeat_at=stale)
            lost_cancelling = job(
                status="cancelling", attempts=1, worker_id="c:1", heartbeat_at=stale
            )
            alive = job(status="running", attempts=1, worker_id="d:1", heartbeat_at=now)
            session.flush()
            ids = {
                j.id: name
                for j, name in [
                    (lost_once, "lost_once"),
                    (lost_too_often, "too_often"),
                    (lost_cancelling, "cancelling"),
                    (alive, "alive"),
                ]
            }

        sent: list[tuple[str, str]] = []
        with session_scope(url) as session:
            changed = reap_lost_jobs(
                session,
                now,
                settings=settings,
                enqueue=lambda job_id, queue: sent.append((job_id, queue)),
            )
        with session_scope(url) as session:
            status = {ids[j.id]: j for j in session.scalars(select(Job))}
            assert set(changed) == {lost_once.id, lost_too_often.id, lost_cancelling.id}
            assert sent == [(lost_once.id, "gpu")]
            assert status["lost_once"].status == "queued" and status["lost_once"].worker_id is None
            assert status["too_often"].status == "failed"
            assert status["too_often"].error["code"] == "too_many_attempts"
            assert status["cancelling"].status == "cancelled"
            assert status["alive"].status == "running"


def test_queued_jobs_whose_broker_message_is_gone_are_sent_again() -> None:
    """A restarted Redis without persistence forgets queued messages; the sweep sends those jobs
    again, once, and leaves alone a queue that still holds messages and jobs queued moments ago."""
    from api.config import Settings
    from tests.worker.harness import (
        add_tenant_and_dataset,
        dedicated_redis_db,
        fresh_postgres_database,
    )
    from worker.celery_app import TASK_RUN_JOB, create_celery_app
    from worker.heartbeat import broker_queue_size, resend_lost_messages

    now = datetime.now(UTC)
    long_ago = now - timedelta(seconds=600)
    with fresh_postgres_database("orca_q") as url, dedicated_redis_db(13) as broker_url:
        settings = Settings(database_url=url, broker_url=broker_url, queued_resend_after_seconds=60)
        app = create_celery_app(settings)
        with session_scope(url) as session:
            tenant_id, dataset_id = add_tenant_and_dataset(session, "sweep")

            def job(queue: str, **fields: Any) -> str:
                row = Job(tenant_id=tenant_id, dataset_id=dataset_id, queue=queue, **fields)
                session.add(row)
                session.flush()
                return row.id

            lost = job("cpu", status="queued", created_at=long_ago)
            just_created = job("cpu", status="queued", created_at=now)
            behind_a_backlog = job("gpu", status="queued", created_at=long_ago)
            running = job("cpu", status="running", created_at=long_ago, heartbeat_at=now)

        def send(job_id: str, queue: str) -> None:
            app.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)

        send(behind_a_backlog, "gpu")  # its message is still in the broker
        assert broker_queue_size(app, "cpu") == 0  # Redis keeps no empty list: "no queue" is 0
        assert broker_queue_size(app, "gpu") == 1

        def sweep() -> list[str]:
            with session_scope(url) as session:
                return resend_lost_messages(
                    session,
                    now,
                    settings=settings,
                    queue_size=lambda queue: broker_queue_size(app, queue),
                    enqueue=send,
                )

        assert sweep() == [lost]
        assert broker_queue_size(app, "cpu") == 1
        assert sweep() == []  # its message waits in the queue now: not sent twice
        with session_scope(url) as session:
            notes = session.scalars(select(JobEvent.message).where(JobEvent.job_id == lost)).all()
            assert [n for n in notes if "sent again" in n] == [
                "its message was no longer in the broker's 'cpu' queue; sent again"
            ]
            for other in (just_created, behind_a_backlog, running):
                assert (
                    session.scalar(
                        select(func.count()).select_from(JobEvent).where(JobEvent.job_id == other)
                    )
                    == 0
                )

    unreachable = create_celery_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    assert broker_queue_size(unreachable, "cpu") is None  # unknown: the sweep sends nothing
