"""The Python client against a real service (uvicorn + Celery worker + PostgreSQL + Redis)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from orca_client import ApiError, Client, Event, Job, JobFailed
from tests.client.conftest import LABELS, TINY_SPEC, ClientStack, tiny_arrays
from tests.worker.harness import write_tiny_npz


@dataclass
class FollowedJob:
    """A job run to the end while a second thread followed its live event stream."""

    job: Job
    events: list[Event] = field(default_factory=list)
    status_when_first_stage_arrived: str | None = None
    seconds_to_finish: float = 0.0


@pytest.fixture(scope="module")
def followed_job(client_stack: ClientStack) -> Iterator[FollowedJob]:
    with client_stack.client() as orca:
        x, y = tiny_arrays(40)
        x_test, y_test = tiny_arrays(12, seed=1)
        dataset = orca.upload_dataset(x, y, x_test=x_test, y_test=y_test, name="waves")
        started = time.monotonic()
        job = orca.create_job(dataset.id, TINY_SPEC, name="followed")
        record = FollowedJob(job=job)

        def follow() -> None:
            with client_stack.client() as watcher:
                for event in watcher.events(job.id, follow=True):
                    record.events.append(event)
                    if event.kind == "stage" and record.status_when_first_stage_arrived is None:
                        record.status_when_first_stage_arrived = watcher.get_job(job.id).status

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            record.job = job.wait(progress=False, timeout=120, poll_seconds=0.5)
        except (JobFailed, TimeoutError) as problem:
            raise AssertionError(f"{problem}\n{client_stack.logs()}") from None
        record.seconds_to_finish = time.monotonic() - started
        follower.join(timeout=30)
        assert not follower.is_alive(), "the event stream did not end after the job finished"
        yield record


def test_upload_from_arrays_and_from_a_file(orca: Client, tmp_path: Path) -> None:
    x, y = tiny_arrays(30)
    from_arrays = orca.upload_dataset(x, y, name="from-arrays", progress=True)
    assert from_arrays.name == "from-arrays"
    assert from_arrays.input_kind == "seq1d" and from_arrays.sample_shape == (1, 32)
    assert from_arrays.task_type == "classification"
    assert from_arrays.classes == sorted(LABELS.tolist())
    assert from_arrays.splits["train"] == 30

    path = write_tiny_npz(tmp_path / "tiny.npz")
    from_file = orca.upload_dataset(path)
    assert from_file.filename == "tiny.npz"
    assert from_file.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert from_file.bytes == path.stat().st_size
    assert from_file.splits == {"train": 40, "val": 0, "test": 20}

    # Lazy pagination: one item per page still reaches both, newest first.
    listed = [d.id for d in orca.list_datasets(page_size=1)]
    assert listed.index(from_file.id) < listed.index(from_arrays.id)
    assert orca.get_dataset(from_file.id).sha256 == from_file.sha256

    orca.delete_dataset(from_file.id)
    with pytest.raises(ApiError) as missing:
        orca.get_dataset(from_file.id)
    assert missing.value.status == 404
    assert missing.value.code == "dataset_not_found"


def test_a_bad_upload_raises_api_error_with_the_full_report(orca: Client) -> None:
    x, y = tiny_arrays(20)
    x[3, 0, 5] = np.nan
    with pytest.raises(ApiError) as rejected:
        orca.upload_dataset(x, y[:-1])
    error = rejected.value
    assert error.status == 422 and error.code == "dataset_invalid"
    assert error.report is not None
    assert {issue["field"] for issue in error.report["errors"]} == {"x_train", "y_train"}
    assert "19" in error.message and "20" in error.message


def test_job_waits_to_succeeded_while_its_events_stream_live(followed_job: FollowedJob) -> None:
    job = followed_job.job
    assert job.status == "succeeded" and job.model_id is not None
    assert set(job.metrics["val"]) >= {"accuracy"} and "before" in job.metrics["alignment"]
    # Events arrived while the job was still running, not all at once at the end.
    assert followed_job.status_when_first_stage_arrived == "running"
    kinds = [event.kind for event in followed_job.events]
    assert {"stage", "metric", "choice"} <= set(kinds)
    ids = [event.id for event in followed_job.events]
    assert ids == sorted(set(ids)), "events repeated or out of order"
    final = followed_job.events[-1]
    assert final.kind == "status" and final.data is not None
    assert final.data["status"] == "succeeded"
    assert final.data["model_id"] == job.model_id


def test_predict_answers_in_the_original_label_space(
    orca: Client, followed_job: FollowedJob
) -> None:
    model = orca.get_model(followed_job.job.model_id or "")
    x, _ = tiny_arrays(5, seed=2)
    batch = model.predict(x)  # an array goes as an .npy body
    assert len(batch.predictions) == 5
    assert set(batch.predictions) <= set(LABELS.tolist())
    assert batch.probabilities is not None
    assert np.allclose(np.sum(batch.probabilities, axis=1), 1.0, atol=1e-4)
    one = orca.predict(model.id, x[0].tolist())  # a list goes as JSON: one sample
    assert one.predictions == batch.predictions[:1]


def test_download_writes_a_valid_bundle_zip(
    orca: Client, followed_job: FollowedJob, tmp_path: Path
) -> None:
    model_id = followed_job.job.model_id or ""
    written = orca.download_model(model_id, tmp_path)
    assert written == tmp_path / f"{model_id}.zip"
    with zipfile.ZipFile(written) as bundle:
        assert bundle.testzip() is None
        names = bundle.namelist()
    assert {"config.json", "metrics.json"} <= set(names)
    assert any(name.endswith(".safetensors") for name in names)


def test_cancelling_a_finished_job_is_a_409(orca: Client, followed_job: FollowedJob) -> None:
    with pytest.raises(ApiError) as conflict:
        orca.cancel_job(followed_job.job.id)
    assert conflict.value.status == 409 and conflict.value.code == "job_finished"


class StreamCuttingProxy:
    """A loopback TCP proxy to the API that drops the first event-stream response right after its
    first complete event, like a flaky network; it records each request it forwards."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.request_heads: list[str] = []
        self.cut_once = False
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(downstream,), daemon=True).start()

    def _relay(self, downstream: socket.socket) -> None:
        with downstream, socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = downstream.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.request_heads.append(head.decode("latin-1"))
            upstream.sendall(head)
            cut = not self.cut_once and b"text/event-stream" in head
            received = b""
            while True:
                data = upstream.recv(65536)
                if not data:
                    return
                if not cut:
                    downstream.sendall(data)
                    continue
                received += data
                body_start = received.find(b"\r\n\r\n") + 4
                first_event_end = received.find(b"\r\n\r\n", received.find(b"data:", body_start))
                if body_start >= 4 and first_event_end >= 0:
                    self.cut_once = True
                    downstream.sendall(received[: first_event_end + 4])
                    return  # closes both sockets mid-response


def test_follow_resumes_with_last_event_id_after_a_dropped_connection(
    client_stack: ClientStack, followed_job: FollowedJob
) -> None:
    job_id = followed_job.job.id
    proxy = StreamCuttingProxy(int(client_stack.url.rsplit(":", 1)[1]))
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", client_stack.api_key) as flaky:
            streamed = list(flaky.events(job_id, follow=True))
    finally:
        proxy.close()
    assert proxy.cut_once
    stream_requests = [h for h in proxy.request_heads if "text/event-stream" in h]
    assert len(stream_requests) >= 2
    first_id = followed_job.events[0].id
    assert f"last-event-id: {first_id}" in stream_requests[1].lower()
    # Nothing lost, nothing repeated.
    assert [e.id for e in streamed] == [e.id for e in followed_job.events]
