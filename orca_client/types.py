"""Typed views of the service's JSON objects.

Each object keeps the JSON it was built from (``to_dict()``), so machine output shows exactly what
the service said, fields this client does not know yet included. Objects fetched through a
:class:`~orca_client.Client` remember it, which is what makes ``job.wait()`` and
``model.predict(x)`` work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from orca_client.client import Client

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
FAILED_STATUSES = frozenset({"failed", "cancelled"})
ANALYSIS_TERMINAL_STATUSES = frozenset({"succeeded", "failed"})


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def _required_time(value: Any) -> datetime:
    parsed = _time(value)
    if parsed is None:
        raise ValueError(f"expected a timestamp, got {value!r}")
    return parsed


@dataclass(frozen=True)
class _ApiObject:
    raw: dict[str, Any] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as the service returned it."""
        return dict(self.raw)


@dataclass(frozen=True)
class Dataset(_ApiObject):
    """An uploaded dataset: what the service inferred from it and its validation report."""

    id: str
    name: str
    filename: str
    format: str
    sha256: str
    bytes: int
    input_kind: str | None
    sample_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    splits: dict[str, int]
    task_type: str | None
    n_classes: int | None
    classes: list[Any] | None
    label_column: str | None
    report: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Dataset:
        shapes = body.get("shapes") or {}
        return cls(
            raw=body,
            id=body["id"],
            name=body.get("name", ""),
            filename=body.get("filename", ""),
            format=body.get("format", ""),
            sha256=body.get("sha256", ""),
            bytes=int(body.get("bytes", 0)),
            input_kind=body.get("input_kind"),
            sample_shape=tuple(shapes.get("sample_shape") or ()),
            label_shape=tuple(shapes.get("label_shape") or ()),
            splits=dict(body.get("splits") or {}),
            task_type=body.get("task_type"),
            n_classes=body.get("n_classes"),
            classes=body.get("classes"),
            label_column=body.get("label_column"),
            report=dict(body.get("report") or {"errors": [], "warnings": []}),
            created_at=_required_time(body.get("created_at")),
        )

    @property
    def warnings(self) -> list[dict[str, str]]:
        """The validation report's warnings (an accepted upload has no errors)."""
        return list(self.report.get("warnings") or [])


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable ``code`` and a message a user can act on."""

    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class Job(_ApiObject):
    """A fine-tuning job as last fetched; ``refresh()`` / ``wait()`` return newer snapshots."""

    id: str
    name: str | None
    dataset_id: str
    status: str
    stage: str | None
    progress: float
    eta_seconds: float | None
    metrics: dict[str, Any]
    error: JobError | None
    model_id: str | None
    queue: str
    attempts: int
    spec: dict[str, Any]
    resolved_spec: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_api(cls, body: dict[str, Any], client: Client | None = None) -> Job:
        error = body.get("error")
        return cls(
            raw=body,
            id=body["id"],
            name=body.get("name"),
            dataset_id=body.get("dataset_id", ""),
            status=body["status"],
            stage=body.get("stage"),
            progress=float(body.get("progress") or 0.0),
            eta_seconds=body.get("eta_seconds"),
            metrics=dict(body.get("metrics") or {}),
            error=JobError(
                code=str(error.get("code", "error")),
                message=str(error.get("message", "")),
                param=error.get("param"),
            )
            if isinstance(error, dict)
            else None,
            model_id=body.get("model_id"),
            queue=body.get("queue", ""),
            attempts=int(body.get("attempts") or 0),
            spec=dict(body.get("spec") or {}),
            resolved_spec=body.get("resolved_spec"),
            created_at=_required_time(body.get("created_at")),
            started_at=_time(body.get("started_at")),
            finished_at=_time(body.get("finished_at")),
            client=client,
        )

    @property
    def done(self) -> bool:
        """True once the job reached succeeded, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    def _bound(self) -> Client:
        if self.client is None:
            raise RuntimeError("this Job was not fetched through a Client")
        return self.client

    def refresh(self) -> Job:
        """The job as the service sees it now."""
        return self._bound().get_job(self.id)

    def wait(
        self, progress: bool = True, timeout: float | None = None, poll_seconds: float = 1.0
    ) -> Job:
        """Block until the job finishes; see :meth:`Client.wait_job`."""
        return self._bound().wait_job(
            self.id, progress=progress, timeout=timeout, poll_seconds=poll_seconds
        )

    def cancel(self) -> Job:
        """Ask the service to stop the job (409 ``ApiError`` if it already finished)."""
        return self._bound().cancel_job(self.id)

    def events(self, follow: bool = False) -> Iterator[Event]:
        """The job's event log; ``follow=True`` streams it live until the job ends."""
        return self._bound().events(self.id, follow=follow)

    def model(self) -> Model:
        """The model this job produced (``ValueError`` while it has none)."""
        if self.model_id is None:
            raise ValueError(f"job {self.id} has no model (status {self.status})")
        return self._bound().get_model(self.model_id)


@dataclass(frozen=True)
class Event(_ApiObject):
    """One line of a job's event log; ``kind`` is log, stage, progress, metric, choice, error or status."""

    id: int
    job_id: str
    created_at: datetime
    kind: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Event:
        return cls(
            raw=body,
            id=int(body["id"]),
            job_id=body.get("job_id", ""),
            created_at=_required_time(body.get("created_at")),
            kind=body.get("kind", "log"),
            message=body.get("message", ""),
            data=body.get("data"),
        )


@dataclass(frozen=True)
class Prediction(_ApiObject):
    """A batched answer: one prediction per input sample, in the upload's own label space."""

    model_id: str
    predictions: list[Any]
    probabilities: list[list[float]] | None

    @classmethod
    def from_api(cls, body: dict[str, Any]) -> Prediction:
        return cls(
            raw=body,
            model_id=body.get("model_id", ""),
            predictions=list(body.get("predictions") or []),
            probabilities=body.get("probabilities"),
        )


@dataclass(frozen=True)
class Model(_ApiObject):
    """A fine-tuned model with the resolved spec it was trained with and its metrics."""

    id: str
    name: str | None
    job_id: str
    dataset_id: str
    bytes: int
    task_spec: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime
    client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_api(cls, body: dict[str, Any], client: Client | None = None) -> Model:
        return cls(
            raw=body,
            id=body["id"],
            name=body.get("name"),
            job_id=body.get("job_id", ""),
            dataset_id=body.get("dataset_id", ""),
            bytes=int(body.get("bytes") or 0),
            task_spec=dict(body.get("task_spec") or {}),
            metrics=dict(body.get("metrics") or {}),
            created_at=_required_time(body.get("created_at")),
            client=client,
        )

    def _bound(self) -> Client:
        if self.client is None:
            raise RuntimeError("this Model was not fetched through a Client")
        return self.client

    def predict(self, x: np.ndarray | list[Any]) -> Prediction:
        """Predict with this model; see :meth:`Client.predict`."""
        return self._bound().predict(self.id, x)

    def download(self, path: str | Path) -> Path:
        """Save the checkpoint bundle as a .zip; see :meth:`Client.download_model`."""
        return self._bound().download_model(self.id, path)


@dataclass(frozen=True)
class Analysis(_ApiObject):
    """A transferability analysis of a dataset: candidate backbone/source pairs, best first.

    Each ``ranking`` entry has ``rank``, ``backbone``, ``source``, ``status`` (``ok`` or
    ``skipped``), the distance ``before``/``after`` a short alignment, ``score`` (the aligned
    distance in units of the proxy's own spread; lower is better), ``seconds`` and, when skipped,
    ``reason``.
    """

    id: str
    dataset_id: str
    status: str
    params: dict[str, Any]
    best: dict[str, Any] | None
    ranking: list[dict[str, Any]]
    error: JobError | None
    seconds: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_api(cls, body: dict[str, Any], client: Client | None = None) -> Analysis:
        error = body.get("error")
        return cls(
            raw=body,
            id=body["id"],
            dataset_id=body.get("dataset_id", ""),
            status=body["status"],
            params=dict(body.get("params") or {}),
            best=body.get("best"),
            ranking=list(body.get("ranking") or []),
            error=JobError(
                code=str(error.get("code", "error")),
                message=str(error.get("message", "")),
                param=error.get("param"),
            )
            if isinstance(error, dict)
            else None,
            seconds=body.get("seconds"),
            created_at=_required_time(body.get("created_at")),
            started_at=_time(body.get("started_at")),
            finished_at=_time(body.get("finished_at")),
            client=client,
        )

    @property
    def done(self) -> bool:
        """True once the analysis succeeded or failed."""
        return self.status in ANALYSIS_TERMINAL_STATUSES

    def wait(self, timeout: float | None = None, poll_seconds: float = 1.0) -> Analysis:
        """Block until this analysis finishes; see :meth:`Client.wait_analysis`."""
        if self.client is None:
            raise RuntimeError("this Analysis was not fetched through a Client")
        return self.client.wait_analysis(
            self.dataset_id, analysis_id=self.id, timeout=timeout, poll_seconds=poll_seconds
        )
