"""Engine callbacks that write a running job's events and progress to the database.

Each write is its own short transaction so the API sees progress live, and writes are throttled
(progress to about two per second, cancellation checks to one per second) so a fast training loop
never turns into a database load test.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from api.db import session_scope
from api.models import Job, JobEvent
from orca_engine.pipeline import PREPARE_FILE, STAGE_WEIGHTS, overall_progress
from orca_engine.progress import STAGES, Callbacks

logger = logging.getLogger("orca.worker")


def _weight_after(stage: str, weights: dict[str, float]) -> float:
    if stage not in STAGES:
        return 0.0
    return sum(weights.get(name, 0.0) for name in STAGES[STAGES.index(stage) + 1 :])


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON: numpy/torch scalars become floats, NaN/inf become None.

    PostgreSQL's JSON type rejects NaN, and a metric can be NaN (e.g. AUROC of a one-class split).
    """
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


class DbCallbacks(Callbacks):
    """Record a job's events and progress in the database; stop it when the user cancels.

    ``ownership_lost`` (set by the heartbeat when the job was taken away from this worker) makes
    :meth:`cancelled` answer True so the run stops without writing results.
    """

    def __init__(
        self,
        job_id: str,
        *,
        progress_interval_seconds: float = 0.5,
        cancel_check_interval_seconds: float = 1.0,
        workdir: Path | None = None,
        ownership_lost: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id = job_id
        self.workdir = workdir
        self.resolved_spec: dict[str, Any] | None = None
        self.progress_interval_seconds = progress_interval_seconds
        self.cancel_check_interval_seconds = cancel_check_interval_seconds
        self.ownership_lost = ownership_lost or threading.Event()
        self._clock = clock
        self._last_progress_write = -float("inf")
        self._last_cancel_check = -float("inf")
        self._cancel_requested = False
        self._stage: str | None = None
        self._stage_started = clock()
        self._latest_metrics: dict[str, dict[str, Any]] = {}
        self._pending_events: list[dict[str, Any]] = []
        #: leading pending events whose last write failed at commit: the database may have
        #: committed them and lost only the answer, so the next write checks before repeating
        self._uncertain_events = 0
        self._resolved_spec_unsaved = False

    # -- events -----------------------------------------------------------------------------
    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        """Append a line to the job's event log (and pick up the resolved spec when announced).

        Events are queued in memory first and written in order; if the database is unreachable
        they stay queued and go out with the next successful write, so a short outage loses
        none and does not stop the job.
        """
        resolved = (data or {}).get("resolved_spec")
        if isinstance(resolved, dict):
            self.record_resolved_spec(resolved)
        elif kind == "choice":
            self._pick_up_resolved_spec()
        self._pending_events.append(
            {"kind": kind[:16], "message": message, "data": json_safe(data) or None}
        )
        self.flush()
        logger.info("job %s %s: %s", self.job_id, kind, message)

    def flush(self) -> bool:
        """Write queued events (and a resolved spec not yet stored); False if the DB is down."""
        if not self._pending_events and not self._resolved_spec_unsaved:
            return True
        committing = 0
        try:
            with session_scope() as session:
                if self._uncertain_events:
                    written = self._already_written(session, self._uncertain_events)
                    del self._pending_events[:written]
                    self._uncertain_events = 0
                if self._resolved_spec_unsaved and self.resolved_spec is not None:
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id)
                        .values(resolved_spec=json_safe(self.resolved_spec))
                    )
                for pending in self._pending_events:
                    session.add(JobEvent(job_id=self.job_id, **pending))
                committing = len(self._pending_events)
        except DBAPIError as exc:
            self._uncertain_events = max(self._uncertain_events, committing)
            logger.warning(
                "job %s: database unreachable, %d event(s) kept for the next write (%s)",
                self.job_id,
                len(self._pending_events),
                type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__,
            )
            return False
        self._pending_events.clear()
        self._resolved_spec_unsaved = False
        return True

    def _already_written(self, session: Any, count: int) -> int:
        """How many of the first ``count`` pending events a failed commit did write (all or 0).

        A transaction is all or nothing, so the batch is either among the job's latest rows, in
        order, or absent. (Another writer's event may have landed after it, hence the margin.)
        """
        batch = [(e["kind"], e["message"]) for e in self._pending_events[:count]]
        rows = session.execute(
            select(JobEvent.kind, JobEvent.message)
            .where(JobEvent.job_id == self.job_id)
            .order_by(JobEvent.id.desc())
            .limit(count + 20)
        ).all()
        recent = [(kind, message) for kind, message in reversed(rows)]
        for start in range(len(recent) - count + 1):
            if recent[start : start + count] == batch:
                logger.info(
                    "job %s: %d event(s) had been written before the outage", self.job_id, count
                )
                return count
        return 0

    def record_resolved_spec(self, resolved_spec: dict[str, Any]) -> None:
        """Store the fully resolved spec on the job as soon as the engine knows it."""
        self.resolved_spec = resolved_spec
        self._resolved_spec_unsaved = True
        self.flush()

    def _pick_up_resolved_spec(self) -> None:
        """The pipeline writes the resolved spec to ``prepare.json`` before announcing choices."""
        if self.resolved_spec is not None or self.workdir is None:
            return
        try:
            prepared = json.loads((self.workdir / PREPARE_FILE).read_text())
        except (OSError, ValueError):
            return
        resolved = prepared.get("resolved_spec")
        if isinstance(resolved, dict):
            self.record_resolved_spec(resolved)

    @property
    def align_enabled(self) -> bool:
        """Whether the alignment stage runs (its share of the progress bar goes to refine if not)."""
        if self.resolved_spec is None:
            return True
        return (
            self.resolved_spec.get("distance") != "none"
            and int(self.resolved_spec.get("align_epochs") or 0) > 0
        )

    # -- progress ---------------------------------------------------------------------------
    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        """Update stage, overall progress, ETA and latest metrics (at most ~2 writes a second)."""
        now = self._clock()
        if stage == "prepare" and total > 0 and step >= total:
            self._pick_up_resolved_spec()
        stage_changed = stage != self._stage
        if stage_changed:
            self._stage = stage
            self._stage_started = now
        if metrics:
            self._latest_metrics[stage] = json_safe(metrics)
        finished_stage = total > 0 and step >= total
        if not (
            stage_changed
            or finished_stage
            or now - self._last_progress_write >= self.progress_interval_seconds
        ):
            return
        self._last_progress_write = now
        fraction = overall_progress(stage, step, total, self.align_enabled)
        eta = self._eta_seconds(stage, step, total, now)
        if not self.flush():
            return  # the database is down: progress is a snapshot, the next write catches up
        try:
            with session_scope() as session:
                job = session.get(Job, self.job_id)
                if job is None:
                    return
                values: dict[str, Any] = {"stage": stage, "progress": fraction, "eta_seconds": eta}
                if self._latest_metrics:
                    current = dict(job.metrics or {})
                    current["train"] = {name: dict(m) for name, m in self._latest_metrics.items()}
                    values["metrics"] = current
                session.execute(update(Job).where(Job.id == self.job_id).values(**values))
        except DBAPIError:
            logger.warning("job %s: database unreachable, progress not recorded", self.job_id)

    def _eta_seconds(self, stage: str, step: int, total: int, now: float) -> float | None:
        """Remaining time: this stage from its measured seconds per step, later stages by weight."""
        if total <= 0 or step <= 0:
            return None
        elapsed = now - self._stage_started
        seconds_per_step = elapsed / step
        remaining_here = max(total - step, 0) * seconds_per_step
        weights = dict(STAGE_WEIGHTS)
        if not self.align_enabled:
            weights["refine"] += weights.pop("align")
        weight = weights.get(stage, 0.0)
        if weight <= 0:
            return remaining_here
        stage_seconds = seconds_per_step * total
        return remaining_here + stage_seconds * _weight_after(stage, weights) / weight

    # -- cancellation -----------------------------------------------------------------------
    def cancelled(self) -> bool:
        """True once the user asked to cancel (checked against the database at most once a second)."""
        if self._cancel_requested or self.ownership_lost.is_set():
            return True
        now = self._clock()
        if now - self._last_cancel_check < self.cancel_check_interval_seconds:
            return False
        self._last_cancel_check = now
        try:
            with session_scope() as session:
                status = session.execute(select(Job.status).where(Job.id == self.job_id)).scalar()
        except DBAPIError:
            # Unreachable database: keep running (a cancel is seen once it is back).
            logger.warning("job %s: database unreachable, cancel check skipped", self.job_id)
            return False
        # A job deleted or moved out of "running" by someone else must stop as well.
        self._cancel_requested = status != "running"
        return self._cancel_requested
