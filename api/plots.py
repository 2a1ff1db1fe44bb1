"""PNG plots of a job's curves: the alignment distance per embedder epoch, and training loss plus
the validation metric per refinement epoch.

The curves come from the finished bundle (``curves.json``) or ``job.metrics["curves"]`` when
present, otherwise from the job's ``metric`` events, so a running job is plotted live.
matplotlib is used through its object API with the Agg canvas (no pyplot global state, so it
is safe in the threadpool).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.models import Job, JobEvent, Model
from api.storage import LocalStorage

logger = logging.getLogger(__name__)

PLOT_NAMES = ("alignment", "training")
CURVES_FILE = "curves.json"
_NOT_VALUES = {"epoch", "seconds", "lr", "stage", "step", "total", "member", "members"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _stored_curves(*, db_session: Session, storage: LocalStorage, job: Job) -> dict[str, Any]:
    curves = (job.metrics or {}).get("curves")
    if isinstance(curves, dict) and curves:
        return curves
    if job.model_id:
        model = db_session.get(Model, job.model_id)
        if model is not None:
            path = storage.path_for(model.storage_key) / CURVES_FILE
            try:
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    return loaded
            except (OSError, ValueError):
                logger.info("no readable curves for model %s", model.id)
    return {}


def _metric_events(*, db_session: Session, job_id: str, stage: str) -> list[dict[str, Any]]:
    events = db_session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "metric")
        .order_by(JobEvent.id)
    )
    return [dict(event.data) for event in events if event.data and event.data.get("stage") == stage]


def alignment_points(
    curves: Mapping[str, Any], events: Iterable[Mapping[str, Any]]
) -> list[tuple[float, float]]:
    """(epoch, distance) pairs from the stored curve, else from alignment metric events."""
    curve = curves.get("alignment")
    points: list[tuple[float, float]] = []
    if isinstance(curve, list) and curve:
        for index, entry in enumerate(curve):
            if isinstance(entry, Mapping):
                value = _number(entry.get("distance", entry.get("value")))
                epoch = _number(entry.get("epoch"))
                epoch = float(index) if epoch is None else epoch
            else:
                value, epoch = _number(entry), float(index)
            if value is not None:
                points.append((epoch, value))
        return points
    for index, data in enumerate(events):
        if "distance" not in data and "value" not in data and ("before" in data or "after" in data):
            continue  # the run's summary (before -> after), not an epoch of the curve
        value = _number(data.get("distance", data.get("value")))
        if value is None:  # the first numeric field that is not bookkeeping
            value = next(
                (
                    v
                    for k, v in ((k, _number(v)) for k, v in data.items())
                    if k not in _NOT_VALUES and v is not None
                ),
                None,
            )
        if value is not None:
            # Epochs are 0-based like the stored curve; `or` would fold epoch 0 into epoch 1.
            epoch = _number(data.get("epoch"))
            points.append((float(index) if epoch is None else epoch, value))
    return points


def training_records(
    curves: Mapping[str, Any], events: Iterable[Mapping[str, Any]]
) -> list[dict[str, float]]:
    """Per-epoch records with ``train_loss``, ``val_loss`` and ``val_<metric>`` values."""
    history = curves.get("refine")
    source: Iterable[Mapping[str, Any]] = (
        history if isinstance(history, list) and history else events
    )
    records: list[dict[str, float]] = []
    # An ensemble's members train in turn, each from epoch 1: they are drawn one after another
    # (epochs offset by the earlier members'), and its closing summary is not an epoch.
    member, offset, last_epoch = None, 0.0, 0.0
    for index, entry in enumerate(source):
        if not isinstance(entry, Mapping):
            continue
        if "members" in entry and entry.get("epoch") is None:
            continue
        if entry.get("member") != member:
            member, offset = entry.get("member"), offset + last_epoch
        epoch = _number(entry.get("epoch")) or float(index + 1)
        last_epoch = epoch
        record: dict[str, float] = {"epoch": offset + epoch}
        for key, value in entry.items():
            if key == "val" and isinstance(value, Mapping):
                for metric, metric_value in value.items():
                    if (number := _number(metric_value)) is not None:
                        record[f"val_{metric}"] = number
            elif key not in _NOT_VALUES and (number := _number(value)) is not None:
                record[key] = number
        if len(record) > 1:
            records.append(record)
    return records


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def render_alignment(points: list[tuple[float, float]], *, title: str) -> bytes:
    """Line plot of the dataset distance per embedder epoch."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    axes.set_xlabel("embedder epoch")
    axes.set_ylabel("distance to source proxy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return _png(figure)


def render_training(records: list[dict[str, float]], *, title: str) -> bytes:
    """Loss curves (left axis) and validation metrics (right axis) per refinement epoch."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    loss_axes = figure.add_subplot()
    keys = sorted({key for record in records for key in record if key != "epoch"})
    loss_keys = [key for key in keys if "loss" in key]
    metric_keys = [key for key in keys if key.startswith("val_") and "loss" not in key]
    for key in loss_keys:
        rows = [r for r in records if key in r]
        loss_axes.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker=".", label=key)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    handles, labels = loss_axes.get_legend_handles_labels()
    if metric_keys:
        metric_axes = loss_axes.twinx()
        for key in metric_keys:
            rows = [r for r in records if key in r]
            metric_axes.plot(
                [r["epoch"] for r in rows], [r[key] for r in rows], linestyle="--", label=key
            )
        metric_axes.set_ylabel("validation metric")
        more_handles, more_labels = metric_axes.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        loss_axes.legend(handles, labels, loc="best", fontsize="small")
    loss_axes.set_title(title)
    loss_axes.grid(alpha=0.3)
    return _png(figure)


def job_plot(*, db_session: Session, storage: LocalStorage, job: Job, name: str) -> bytes:
    """The PNG named ``name`` for ``job``; 404 for unknown names or when there is no data yet."""
    if name not in PLOT_NAMES:
        raise ApiError(
            404,
            "plot_not_found",
            f"unknown plot {name!r}; available: {', '.join(PLOT_NAMES)}",
            param="name",
        )
    curves = _stored_curves(db_session=db_session, storage=storage, job=job)
    if name == "alignment":
        events = (
            []
            if curves.get("alignment")
            else _metric_events(db_session=db_session, job_id=job.id, stage="align")
        )
        points = alignment_points(curves, events)
        if not points:
            raise ApiError(
                404, "plot_not_ready", "no alignment distances recorded yet", param="name"
            )
        distance = (job.resolved_spec or {}).get("distance") or (job.spec or {}).get(
            "alignment", {}
        ).get("distance", "distance")
        return render_alignment(points, title=f"{job.id}: {distance} during embedder learning")
    events = (
        []
        if curves.get("refine")
        else _metric_events(db_session=db_session, job_id=job.id, stage="refine")
    )
    records = training_records(curves, events)
    if not records:
        raise ApiError(404, "plot_not_ready", "no training epochs recorded yet", param="name")
    return render_training(records, title=f"{job.id}: refinement")
