"""The job's event log when the database drops the connection around a commit.

A commit can succeed on the server while the worker only sees the connection break (the answer
is lost): writing the batch again would log those events twice. Only the answer is faked here;
the database (SQLite, migrated like production) and the commit are real.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

import worker.reporting as reporting
from api.db import run_migrations, session_scope
from api.models import Job, JobEvent
from tests.worker.harness import add_tenant_and_dataset


def _job(url: str) -> str:
    with session_scope(url) as session:
        tenant_id, dataset_id = add_tenant_and_dataset(session, "events")
        job = Job(tenant_id=tenant_id, dataset_id=dataset_id, queue="cpu", status="running")
        session.add(job)
        session.flush()
        return str(job.id)


@pytest.mark.parametrize("committed", [True, False])
def test_events_are_written_once_whether_or_not_the_broken_commit_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    url = f"sqlite:///{tmp_path / 'orca.db'}"
    run_migrations(url)
    job_id = _job(url)
    broken = {"next": False}

    @contextmanager
    def scope_with_a_broken_connection() -> Iterator[object]:
        def lost() -> OperationalError:
            return OperationalError("COMMIT", {}, Exception("server closed the connection"))

        if broken["next"] and not committed:
            with session_scope(url) as session:
                yield session
                broken["next"] = False
                raise lost()  # inside the block: rolled back, nothing written
        with session_scope(url) as session:
            yield session
        if broken["next"]:
            broken["next"] = False
            raise lost()  # after the commit: written, but the worker never heard so

    monkeypatch.setattr(reporting, "session_scope", scope_with_a_broken_connection)
    callbacks = reporting.DbCallbacks(job_id)
    callbacks.event("epoch 1/3", kind="metric")
    broken["next"] = True
    callbacks.event("epoch 2/3", kind="metric")
    callbacks.event("epoch 3/3", kind="metric")

    with session_scope(url) as session:
        messages = session.execute(
            select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).scalars()
        assert list(messages) == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
