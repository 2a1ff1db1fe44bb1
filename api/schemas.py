"""Request and response schemas, in families per resource (``XPublic`` / ``XsPublic``).

Lists are ``{"data": [...], "has_more": bool}``, newest first, paged with ``?limit=&after=``.
The job-creation body is the engine's own :class:`orca_engine.specs.JobSpec` so the API and the
engine can never disagree about what a spec is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.models import Dataset, DatasetAnalysis, Job, JobEvent, Model
from orca_engine.specs import JobSpec, ResolvedSpec

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

JobCreate = JobSpec

JOB_CREATE_EXAMPLES: dict[str, dict[str, Any]] = {
    "defaults": {
        "summary": "Everything automatic",
        "value": {"dataset_id": "ds_0193a5b2c4d1e2f3a4b5c6d7"},
    },
    "explicit": {
        "summary": "Explicit choices",
        "value": {
            "dataset_id": "ds_0193a5b2c4d1e2f3a4b5c6d7",
            "name": "gunpoint-otdd",
            "task": {"type": "classification", "metric": "accuracy"},
            "backbone": "minilm-l6",
            "alignment": {"distance": "otdd", "source": "auto", "epochs": 20, "max_samples": 2000},
            "finetune": {
                "mode": "full",
                "epochs": 50,
                "lr": 1e-4,
                "batch_size": 32,
                "optimizer": "adamw",
                "early_stopping_patience": 10,
            },
            "seed": 0,
        },
    },
}


class _Page(BaseModel):
    has_more: bool = Field(
        description="true when another page follows; pass the last id as `after`"
    )


class Shapes(BaseModel):
    sample_shape: list[int] = Field(description="shape of one x sample", examples=[[1, 150]])
    label_shape: list[int] = Field(
        description="shape of one y sample; [] for class ids", examples=[[]]
    )


class DatasetPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ds_0193a5b2c4d1e2f3a4b5c6d7",
                    "object": "dataset",
                    "name": "gunpoint",
                    "filename": "gunpoint.npz",
                    "format": "npz",
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "bytes": 242_112,
                    "input_kind": "seq1d",
                    "shapes": {"sample_shape": [1, 150], "label_shape": []},
                    "splits": {"train": 50, "val": 0, "test": 150},
                    "task_type": "classification",
                    "n_classes": 2,
                    "classes": [1, 2],
                    "label_column": None,
                    "report": {"errors": [], "warnings": []},
                    "created_at": "2025-11-23T18:00:00Z",
                }
            ]
        }
    )

    id: str
    object: str = "dataset"
    name: str
    filename: str
    format: str = Field(description="npz | csv | parquet")
    sha256: str = Field(description="sha256 of the uploaded bytes")
    bytes: int
    input_kind: str | None = Field(description="tabular | seq1d | image2d")
    shapes: Shapes
    splits: dict[str, int] = Field(
        description="rows per split as uploaded (no val → split at train time)"
    )
    task_type: str | None = Field(description="inferred task type")
    n_classes: int | None
    classes: list[Any] | None
    label_column: str | None
    report: dict[str, Any] = Field(description='{"errors": [], "warnings": [{"field", "message"}]}')
    created_at: datetime

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetPublic:
        info = row.info or {}
        return cls(
            id=row.id,
            name=row.name,
            filename=row.filename,
            format=row.format,
            sha256=row.sha256,
            bytes=row.bytes,
            input_kind=info.get("input_kind"),
            shapes=Shapes(
                sample_shape=list(info.get("sample_shape") or []),
                label_shape=list(info.get("label_shape") or []),
            ),
            splits=dict(info.get("splits") or {}),
            task_type=info.get("task_type"),
            n_classes=info.get("n_classes"),
            classes=info.get("classes"),
            label_column=row.label_column,
            report=row.report or {"errors": [], "warnings": []},
            created_at=row.created_at,
        )


class DatasetsPublic(_Page):
    data: list[DatasetPublic]


class JobMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    val: dict[str, float] = Field(default_factory=dict, examples=[{"accuracy": 0.97}])
    test: dict[str, float] = Field(default_factory=dict, examples=[{"accuracy": 0.96}])
    alignment: dict[str, Any] = Field(
        default_factory=dict,
        description="dataset distance before and after embedder learning",
        examples=[{"before": 1.83, "after": 0.41}],
    )


class JobError(BaseModel):
    code: str = Field(examples=["out_of_memory"])
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job_0193a5b2c4d1e2f3a4b5c6d7",
                    "object": "job",
                    "name": "gunpoint-otdd",
                    "dataset_id": "ds_0193a5b2c4d1e2f3a4b5c6d7",
                    "status": "running",
                    "stage": "align",
                    "progress": 0.35,
                    "eta_seconds": 42.0,
                    "metrics": {"val": {}, "test": {}, "alignment": {"before": 1.83}},
                    "error": None,
                    "model_id": None,
                    "queue": "gpu",
                    "attempts": 1,
                    "spec": {"dataset_id": "ds_0193a5b2c4d1e2f3a4b5c6d7"},
                    "resolved_spec": None,
                    "created_at": "2025-11-23T18:00:00Z",
                    "started_at": "2025-11-23T18:00:02Z",
                    "finished_at": None,
                }
            ]
        }
    )

    id: str
    object: str = "job"
    name: str | None
    dataset_id: str
    status: str = Field(
        description="queued | running | cancelling | succeeded | failed | cancelled"
    )
    stage: str | None = Field(description="prepare | align | refine | evaluate | export")
    progress: float = Field(ge=0, le=1)
    eta_seconds: float | None
    metrics: JobMetrics
    error: JobError | None
    model_id: str | None
    queue: str
    attempts: int
    spec: dict[str, Any] = Field(description="the task spec as submitted (validated)")
    resolved_spec: dict[str, Any] | None = Field(
        description="every `auto` made concrete by the engine (set when the job starts); "
        "`reasons` holds one line per value the engine chose",
        # the stored dict is returned as is (a job resolved by an older engine keeps its
        # fields), but the schema names the fields a current job carries
        json_schema_extra={"properties": ResolvedSpec.model_json_schema()["properties"]},
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Job) -> JobPublic:
        raw_metrics = {k: v for k, v in (row.metrics or {}).items() if k != "curves"}
        error = None
        if row.error:
            error = JobError(
                code=str(row.error.get("code", "error")),
                message=str(row.error.get("message", "")),
                param=row.error.get("param"),
            )
        return cls(
            id=row.id,
            name=row.name,
            dataset_id=row.dataset_id,
            status=row.status,
            stage=row.stage,
            progress=min(1.0, max(0.0, float(row.progress or 0.0))),
            eta_seconds=row.eta_seconds,
            metrics=JobMetrics.model_validate(raw_metrics),
            error=error,
            model_id=row.model_id,
            queue=row.queue,
            attempts=row.attempts,
            spec=row.spec or {},
            resolved_spec=row.resolved_spec,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobsPublic(_Page):
    data: list[JobPublic]


class JobEventPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 17,
                    "job_id": "job_0193a5b2c4d1e2f3a4b5c6d7",
                    "created_at": "2025-11-23T18:00:05Z",
                    "kind": "metric",
                    "message": "align epoch 3/20: otdd 0.92",
                    "data": {"stage": "align", "epoch": 3, "distance": 0.92},
                }
            ]
        }
    )

    id: int = Field(description="increasing; the SSE event id and the `after` cursor")
    job_id: str
    created_at: datetime
    kind: str = Field(description="log | stage | progress | metric | choice | error | status")
    message: str
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: JobEvent) -> JobEventPublic:
        return cls(
            id=row.id,
            job_id=row.job_id,
            created_at=row.created_at,
            kind=row.kind,
            message=row.message,
            data=row.data,
        )


class JobEventsPublic(_Page):
    data: list[JobEventPublic]


class ModelPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "mdl_0193a5b2c4d1e2f3a4b5c6d7",
                    "object": "model",
                    "name": "gunpoint-otdd",
                    "job_id": "job_0193a5b2c4d1e2f3a4b5c6d7",
                    "dataset_id": "ds_0193a5b2c4d1e2f3a4b5c6d7",
                    "bytes": 91_234_567,
                    "task_spec": {"task_type": "classification", "backbone": "minilm-l6"},
                    "metrics": {"val": {"accuracy": 0.97}, "test": {"accuracy": 0.96}},
                    "created_at": "2025-11-23T18:05:00Z",
                }
            ]
        }
    )

    id: str
    object: str = "model"
    name: str | None
    job_id: str
    dataset_id: str
    bytes: int
    task_spec: dict[str, Any] = Field(description="the resolved spec the model was trained with")
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: Model) -> ModelPublic:
        return cls(
            id=row.id,
            name=row.name,
            job_id=row.job_id,
            dataset_id=row.dataset_id,
            bytes=row.bytes,
            task_spec=row.task_spec or {},
            metrics={k: v for k, v in (row.metrics or {}).items() if k != "curves"},
            created_at=row.created_at,
        )


class ModelsPublic(_Page):
    data: list[ModelPublic]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [[[0.1, 0.2, 0.3]]]}]},
    )

    inputs: Any = Field(
        description="one sample (the shape of one training x) or a batch (one more leading axis)"
    )


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "mdl_0193a5b2c4d1e2f3a4b5c6d7",
                    "predictions": [2],
                    "probabilities": [[0.1, 0.9]],
                }
            ]
        }
    )

    model_id: str
    predictions: list[Any] = Field(description="one per input sample, in the upload's label space")
    probabilities: list[list[float]] | None = Field(
        description="class / label probabilities for classification and multilabel; null otherwise"
    )


class HealthStatus(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(default_factory=dict, examples=[{"database": "ok"}])


class ErrorDetail(BaseModel):
    """The ``error`` object of every non-2xx answer (extra keys: ``report``, ``details``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["invalid_request_error"])
    code: str = Field(examples=["invalid_value"])
    message: str
    param: str | None = Field(default=None, description="the field the error is about")


class ErrorEnvelope(BaseModel):
    """``{"error": {"type", "code", "message", "param"}}``."""

    error: ErrorDetail


ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "missing, invalid or revoked API key",
    404: "unknown id, or an object of another tenant",
    409: "state conflict",
    413: "request body or upload over a size limit",
    415: "unsupported content type",
    422: "invalid request; `param` names the field",
    429: "over a rate or concurrency limit; see Retry-After",
    503: "a dependency (database, broker) is unavailable; retry shortly",
}
_RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}


def error_responses(
    *statuses: int, descriptions: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, each carrying the envelope schema."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": ErrorEnvelope,
            "description": (descriptions or {}).get(status, ERROR_DESCRIPTIONS[status]),
        }
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER_HEADER
        responses[status] = entry
    return responses


# Every /v1 route: no or bad key, unknown id (or another tenant's), invalid parameters.
COMMON_ERROR_RESPONSES = error_responses(401, 404, 422)


# -- dataset transferability analysis -----------------------------------------------------------

#: bounds of the analysis request (the engine enforces the same: orca_engine.analyze)
ANALYSIS_MAX_SAMPLE_SIZE = 500
ANALYSIS_MAX_ALIGN_EPOCHS = 20
ANALYSIS_MAX_CANDIDATES = 10


class AnalysisCreate(BaseModel):
    """Body of ``POST /v1/datasets/{id}/analyze`` (every field optional)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"sample_size": 256, "align_epochs": 10, "distance": "otdd"}]
        },
    )

    backbones: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        default=None,
        max_length=ANALYSIS_MAX_CANDIDATES,
        description="backbone ids to compare (default: every pretrained backbone installed)",
    )
    sources: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        max_length=ANALYSIS_MAX_CANDIDATES,
        description="extra source proxies besides each backbone's own (english-text, "
        "natural-images) -- a proxy name or one of your dataset ids",
    )
    distance: Literal["otdd", "otdd_gaussian", "ot", "mmd", "l2", "cosine"] = "otdd"
    sample_size: Annotated[int, Field(ge=2, le=ANALYSIS_MAX_SAMPLE_SIZE, strict=True)] = 256
    align_epochs: Annotated[int, Field(ge=0, le=ANALYSIS_MAX_ALIGN_EPOCHS, strict=True)] = 10
    seed: Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)] = 0
    allow_random_init: Annotated[bool, Field(strict=True)] = False
    queue: Literal["auto", "gpu", "cpu"] = "auto"


class AnalysisPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "an_0193a5b2c4d1e2f3a4b5c6d7",
                    "object": "analysis",
                    "dataset_id": "ds_0193a5b2c4d1e2f3a4b5c6d7",
                    "status": "succeeded",
                    "params": {"distance": "otdd", "sample_size": 256, "align_epochs": 10},
                    "best": {"backbone": "minilm-l6", "source": "english-text"},
                    "ranking": [
                        {
                            "rank": 1,
                            "backbone": "minilm-l6",
                            "source": "english-text",
                            "status": "ok",
                            "before": 1.83,
                            "after": 0.41,
                            "score": 0.12,
                            "seconds": 2.1,
                        }
                    ],
                    "error": None,
                    "seconds": 4.2,
                    "created_at": "2025-11-23T18:00:00Z",
                    "started_at": "2025-11-23T18:00:01Z",
                    "finished_at": "2025-11-23T18:00:05Z",
                }
            ]
        }
    )

    id: str
    object: str = "analysis"
    dataset_id: str
    status: str = Field(description="queued | running | succeeded | failed")
    params: dict[str, Any] = Field(description="the request as validated")
    best: dict[str, Any] | None = Field(
        description="the top-ranked {backbone, source} pair, once succeeded"
    )
    ranking: list[dict[str, Any]] = Field(
        description="every candidate, best first: distance before/after the short alignment, "
        "score (aligned distance / the proxy's own spread: lower is better), seconds; skipped "
        "candidates last with a reason"
    )
    error: JobError | None
    seconds: float | None = Field(description="wall time of the whole analysis")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: DatasetAnalysis) -> AnalysisPublic:
        result = row.result or {}
        error = None
        if row.error:
            error = JobError(
                code=str(row.error.get("code", "error")),
                message=str(row.error.get("message", "")),
                param=row.error.get("param"),
            )
        return cls(
            id=row.id,
            dataset_id=row.dataset_id,
            status=row.status,
            params=row.params or {},
            best=result.get("best"),
            ranking=[
                {k: v for k, v in candidate.items() if k != "curve"}
                for candidate in result.get("candidates") or []
            ],
            error=error,
            seconds=result.get("seconds"),
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
