"""The ORCA HTTP client: datasets, jobs (with live progress), models and predictions.

Every call goes through :meth:`Client._request`, which turns transport failures into
:class:`ConnectionFailed` and non-2xx answers into :class:`ApiError` built from the service's
error envelope, so callers only ever see ``OrcaError`` subclasses.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from orca_client.errors import AnalysisFailed, ApiError, ConnectionFailed, JobFailed, OrcaError
from orca_client.progress import JobProgressDisplay, upload_progress
from orca_client.specs import deep_merge
from orca_client.sse import parse_sse
from orca_client.types import FAILED_STATUSES, Analysis, Dataset, Event, Job, Model, Prediction
from orca_client.uploads import (
    MultipartFileBody,
    array_to_npy_bytes,
    atomic_write_stream,
    temporary_directory,
    write_arrays_npz,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_SECONDS = 60.0
# Validating a large upload or streaming a bundle can take much longer than an ordinary call.
LONG_READ_TIMEOUT_SECONDS = 600.0
# The service pings an idle event stream every 15 s; a much longer silence means it is gone.
EVENT_STREAM_READ_TIMEOUT_SECONDS = 60.0
EVENT_STREAM_MAX_RECONNECTS = 5
# How long wait() rides out an unreachable service (a restart) before giving up.
WAIT_UNREACHABLE_GRACE_SECONDS = 60.0
PAGE_SIZE = 100
NPY_CONTENT_TYPE = "application/x-npy"

T = TypeVar("T")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def api_error_from_response(response: httpx.Response) -> ApiError:
    """An :class:`ApiError` from a non-2xx response (its body must have been read)."""
    retry_after: float | None = None
    header = response.headers.get("retry-after")
    if header:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = response.text.strip()[:500] or response.reason_phrase
        return ApiError(
            response.status_code, "http_error", text, retry_after=retry_after, body=None
        )
    return ApiError(
        response.status_code,
        str(error.get("code") or "error"),
        str(error.get("message") or response.reason_phrase),
        error.get("param"),
        error.get("report"),
        type=error.get("type"),
        details=error.get("details"),
        retry_after=retry_after,
        body=body,
    )


class Client:
    """A connection to one ORCA service for one API key.

    ``base_url`` and ``api_key`` default to ``ORCA_URL`` (else ``http://127.0.0.1:8000``) and
    ``ORCA_API_KEY``. ``timeout`` (seconds) applies to ordinary calls; uploads, downloads and event
    streams allow longer reads. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.base_url = (base_url or os.environ.get("ORCA_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("ORCA_API_KEY")
        if not key:
            raise OrcaError(
                "no API key: pass api_key=... or set ORCA_API_KEY "
                "(`orca serve` prints one; `orca keys create --tenant NAME` makes one)"
            )
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "orca-client"},
            timeout=timeout,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------------

    def _long_timeout(self, read: float = LONG_READ_TIMEOUT_SECONDS) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=max(read, self.timeout))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailed(self.base_url, str(exc) or type(exc).__name__) from exc
        if response.is_error:
            raise api_error_from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return dict(self._request(method, path, **kwargs).json())

    def _pages(
        self, path: str, build: Callable[[dict[str, Any]], T], page_size: int
    ) -> Iterator[T]:
        """Every item of a ``{"data", "has_more"}`` list, fetching the next page only when needed."""
        after: str | int | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after is not None:
                params["after"] = after
            page = self._json("GET", path, params=params)
            items = page.get("data") or []
            for item in items:
                yield build(item)
            if not page.get("has_more") or not items:
                return
            after = items[-1]["id"]

    # -- datasets -------------------------------------------------------------------------------

    def upload_dataset(
        self,
        data: str | os.PathLike[str] | np.ndarray,
        y_train: np.ndarray | None = None,
        *,
        x_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
        name: str | None = None,
        label_column: str | None = None,
        progress: bool = False,
    ) -> Dataset:
        """Upload a ``.npz`` / ``.csv`` / ``.parquet`` file, or arrays (``x_train, y_train`` and
        optional val/test splits, written to a temporary ``.npz`` first).

        The file is streamed, never read into memory; ``progress=True`` draws a byte progress bar
        on stderr. A rejected upload raises :class:`ApiError` whose ``report`` lists every problem.
        """
        if isinstance(data, np.ndarray):
            if y_train is None:
                raise ValueError("uploading arrays needs y_train as well as x_train")
            with temporary_directory() as directory:
                path = write_arrays_npz(
                    directory,
                    x_train=data,
                    y_train=y_train,
                    x_val=x_val,
                    y_val=y_val,
                    x_test=x_test,
                    y_test=y_test,
                )
                return self._upload_file(path, name, label_column, progress)
        if y_train is not None or any(a is not None for a in (x_val, y_val, x_test, y_test)):
            raise ValueError("give either a file path or arrays, not both")
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return self._upload_file(path, name, label_column, progress)

    def _upload_file(
        self, path: Path, name: str | None, label_column: str | None, progress: bool
    ) -> Dataset:
        fields = {"name": name} if name else {}
        if label_column:
            fields["label_column"] = label_column
        bar = upload_progress(path.stat().st_size, path.name) if progress else nullcontext(None)
        with bar as on_bytes:
            body = MultipartFileBody(path, filename=path.name, fields=fields, on_bytes=on_bytes)
            response = self._request(
                "POST",
                "/v1/datasets",
                content=iter(body),
                headers=body.headers(),
                timeout=self._long_timeout(),
            )
        return Dataset.from_api(response.json())

    def list_datasets(self, page_size: int = PAGE_SIZE) -> Iterator[Dataset]:
        """Every dataset, newest first; pages are fetched lazily as you iterate."""
        return self._pages("/v1/datasets", Dataset.from_api, page_size)

    def get_dataset(self, dataset_id: str) -> Dataset:
        """One dataset (404 ``ApiError`` if unknown or another tenant's)."""
        return Dataset.from_api(self._json("GET", f"/v1/datasets/{dataset_id}"))

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset and its file (409 ``ApiError`` while an unfinished job uses it)."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    def analyze_dataset(
        self,
        dataset_id: str,
        *,
        backbones: list[str] | None = None,
        sources: list[str] | None = None,
        wait: bool = False,
        timeout: float | None = None,
        **options: Any,
    ) -> Analysis:
        """Start a transferability analysis: which backbone and source proxy suit the dataset.

        ``backbones`` (default: every pretrained one the service has) and extra ``sources``
        (proxy names or your dataset ids) pick the candidates; ``options`` are the other request
        fields (``sample_size``, ``align_epochs``, ``distance``, ``seed``, ``allow_random_init``,
        ``queue``). Returns it queued, or finished with ``wait=True`` (:class:`AnalysisFailed`
        if it failed). Jobs with ``backbone: "auto"`` then take its best pair.
        """
        body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        if backbones is not None:
            body["backbones"] = list(backbones)
        if sources is not None:
            body["sources"] = list(sources)
        analysis = Analysis.from_api(
            self._json("POST", f"/v1/datasets/{dataset_id}/analyze", json=body), self
        )
        if wait:
            return self.wait_analysis(dataset_id, analysis_id=analysis.id, timeout=timeout)
        return analysis

    def get_analysis(self, dataset_id: str) -> Analysis:
        """The dataset's latest analysis (404 ``ApiError`` if it was never analysed)."""
        return Analysis.from_api(self._json("GET", f"/v1/datasets/{dataset_id}/analysis"), self)

    def wait_analysis(
        self,
        dataset_id: str,
        *,
        analysis_id: str | None = None,
        timeout: float | None = None,
        poll_seconds: float = 1.0,
    ) -> Analysis:
        """Poll until the dataset's latest analysis (or a newer one than ``analysis_id``) ends.

        Raises :class:`AnalysisFailed` when it failed, ``TimeoutError`` after ``timeout`` s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            analysis = self.get_analysis(dataset_id)
            current = analysis_id is None or analysis.id >= analysis_id
            if current and analysis.done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the analysis of {dataset_id} is still {analysis.status} after {timeout:g} s"
                )
            time.sleep(poll_seconds)
        if analysis.status == "failed":
            raise AnalysisFailed(analysis)
        return analysis

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(
        self,
        dataset_id: str,
        spec: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **overrides: Any,
    ) -> Job:
        """Start a fine-tuning job on ``dataset_id``.

        ``spec`` is a task spec (SPEC §4) and ``overrides`` are merged into it, nested dicts key by
        key: ``create_job(ds, backbone="tiny-bert", finetune={"epochs": 2})``. With an
        ``idempotency_key`` a retried call returns the job the first call made.
        """
        body = deep_merge(spec or {}, overrides)
        body["dataset_id"] = dataset_id
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.from_api(self._json("POST", "/v1/jobs", json=body, headers=headers), self)

    def get_job(self, job_id: str) -> Job:
        """A job's status, stage, progress, ETA, metrics, error and model id."""
        return Job.from_api(self._json("GET", f"/v1/jobs/{job_id}"), self)

    def list_jobs(self, page_size: int = PAGE_SIZE) -> Iterator[Job]:
        """Every job, newest first; pages are fetched lazily as you iterate."""
        return self._pages("/v1/jobs", lambda body: Job.from_api(body, self), page_size)

    def cancel_job(self, job_id: str) -> Job:
        """Ask a job to stop; it turns ``cancelling`` then ``cancelled`` (409 if it finished)."""
        return Job.from_api(self._json("POST", f"/v1/jobs/{job_id}/cancel"), self)

    def wait_job(
        self,
        job_id: str,
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_seconds: float = 1.0,
    ) -> Job:
        """Poll until the job finishes and return it.

        ``progress=True`` draws one row per stage (with its latest metrics) and an overall bar with
        the service's ETA on stderr. Raises :class:`JobFailed` (with the job's error code and
        message) when it fails or is cancelled, ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        display = JobProgressDisplay(job_id) if progress else None
        unreachable_since: float | None = None
        with display if display is not None else nullcontext():
            while True:
                try:
                    job = self.get_job(job_id)
                    unreachable_since = None
                except ConnectionFailed:
                    # Ride out a service restart instead of abandoning a long job.
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > WAIT_UNREACHABLE_GRACE_SECONDS:
                        raise
                    time.sleep(poll_seconds)
                    continue
                if display is not None:
                    display.update(job)
                if job.done:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"job {job_id} is still {job.status} after {timeout:g} s "
                        f"(stage {job.stage}, {job.progress:.0%})"
                    )
                time.sleep(poll_seconds)
        if job.status in FAILED_STATUSES:
            raise JobFailed(job)
        return job

    def events(self, job_id: str, follow: bool = False, after: int = 0) -> Iterator[Event]:
        """The job's event log after event id ``after``, oldest first.

        ``follow=False`` pages through what is recorded now. ``follow=True`` streams live
        (``Accept: text/event-stream``) until the job ends; a dropped connection is resumed with
        ``Last-Event-ID`` so no event is lost or repeated.
        """
        if follow:
            return self._follow_events(job_id, after)
        return self._event_pages(job_id, after)

    def _event_pages(self, job_id: str, after: int) -> Iterator[Event]:
        last_id = after
        while True:
            page = self._json(
                "GET", f"/v1/jobs/{job_id}/events", params={"limit": PAGE_SIZE, "after": last_id}
            )
            items = page.get("data") or []
            for item in items:
                event = Event.from_api(item)
                last_id = event.id
                yield event
            if not page.get("has_more") or not items:
                return

    def _follow_events(self, job_id: str, after: int) -> Iterator[Event]:
        last_id = after
        failures = 0
        timeout = httpx.Timeout(self.timeout, read=EVENT_STREAM_READ_TIMEOUT_SECONDS)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = str(last_id)
            received = False
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if response.is_error:
                        response.read()
                        raise api_error_from_response(response)
                    for message in parse_sse(response.iter_lines()):
                        if message.event == "end":
                            return
                        if not message.data:
                            continue
                        event = Event.from_api(json.loads(message.data))
                        if event.id <= last_id:
                            continue
                        last_id, received, failures = event.id, True, 0
                        yield event
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
            else:
                reason = "the event stream closed before the job ended"
            failures = 0 if received else failures + 1
            if failures > EVENT_STREAM_MAX_RECONNECTS:
                raise ConnectionFailed(self.base_url, reason)
            logger.info("event stream of %s interrupted (%s); resuming", job_id, reason)
            time.sleep(min(0.25 * 2**failures, 5.0))

    # -- models ---------------------------------------------------------------------------------

    def list_models(self, page_size: int = PAGE_SIZE) -> Iterator[Model]:
        """Every fine-tuned model, newest first; pages are fetched lazily as you iterate."""
        return self._pages("/v1/models", lambda body: Model.from_api(body, self), page_size)

    def get_model(self, model_id: str) -> Model:
        """One model with its resolved task spec and metrics."""
        return Model.from_api(self._json("GET", f"/v1/models/{model_id}"), self)

    def delete_model(self, model_id: str) -> None:
        """Delete a model and its files."""
        self._request("DELETE", f"/v1/models/{model_id}")

    def download_model(self, model_id: str, path: str | os.PathLike[str]) -> Path:
        """Save the checkpoint bundle (.zip of safetensors + config.json + metrics.json) to
        ``path``, or to ``<path>/<model_id>.zip`` when ``path`` is a directory. Written atomically."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{model_id}.zip"
        try:
            with self._http.stream(
                "GET", f"/v1/models/{model_id}/download", timeout=self._long_timeout()
            ) as response:
                if response.is_error:
                    response.read()
                    raise api_error_from_response(response)
                atomic_write_stream(target, response.iter_bytes())
        except httpx.TransportError as exc:
            raise ConnectionFailed(self.base_url, str(exc) or type(exc).__name__) from exc
        return target

    def predict(self, model_id: str, x: np.ndarray | list[Any]) -> Prediction:
        """Predictions (and class probabilities) in the upload's own label space.

        A numpy array is sent as an ``.npy`` body and must be a batch (one leading axis more than a
        training sample); a list is sent as JSON and may be one sample or a batch.
        """
        path = f"/v1/models/{model_id}/predict"
        if isinstance(x, np.ndarray):
            body = self._json(
                "POST",
                path,
                content=array_to_npy_bytes(x),
                headers={"Content-Type": NPY_CONTENT_TYPE},
            )
        else:
            body = self._json(
                "POST",
                path,
                content=json.dumps({"inputs": x}, default=_json_default).encode(),
                headers={"Content-Type": "application/json"},
            )
        return Prediction.from_api(body)
