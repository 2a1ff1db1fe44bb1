"""``queue: auto`` routing against a real worker that reads the ``gpu`` queue without a GPU."""

from __future__ import annotations

import pytest
import torch

from api.config import Settings
from api.queue import DEVICES_COMMAND, JobQueue
from orca_client import Client
from tests.client.conftest import TINY_SPEC, ClientStack, tiny_arrays

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() > 0, reason="checks the routing of a machine without a GPU"
)


def test_a_gpu_queue_worker_without_a_gpu_reports_none_and_auto_jobs_go_to_cpu(
    client_stack: ClientStack, orca: Client
) -> None:
    # The stack's worker consumes both queues, as the embedded one does.
    queue = JobQueue(
        Settings(broker_url=client_stack.broker_url, queue_inspect_timeout_seconds=2.0)
    )
    replies = queue.celery_app.control.broadcast(DEVICES_COMMAND, reply=True, timeout=2.0)
    answers = [answer for reply in replies for answer in reply.values()]
    assert answers == [{"cuda_devices": 0}], client_stack.logs()
    # It does listen on "gpu" (the old check counted exactly that) ...
    listening = queue.celery_app.control.inspect(timeout=2.0).active_queues() or {}
    assert any(q["name"] == "gpu" for queues in listening.values() for q in queues)
    # ... but no worker has a GPU, so queue "auto" is not sent there.
    assert queue.gpu_workers_available() is False

    x, y = tiny_arrays(24)
    dataset = orca.upload_dataset(x, y, name="routing")
    job = orca.create_job(dataset.id, {**TINY_SPEC, "queue": "auto"}, name="auto-routed")
    assert job.queue == "cpu"
    done = job.wait(progress=False, timeout=120, poll_seconds=0.5)
    assert done.status == "succeeded", client_stack.logs()
