"""Terminal progress for uploads and for a running job (rich, on stderr so stdout stays clean)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from orca_client.types import FAILED_STATUSES, Job

#: The stages of every job, in order (SPEC §3).
STAGES = ("prepare", "align", "refine", "evaluate", "export")

_stderr_console: Console | None = None


def stderr_console() -> Console:
    """The console progress is drawn on (stderr, created on first use)."""
    global _stderr_console
    if _stderr_console is None:
        _stderr_console = Console(stderr=True)
    return _stderr_console


@contextmanager
def upload_progress(
    total_bytes: int, label: str, console: Console | None = None
) -> Iterator[Callable[[int], None]]:
    """A byte-count progress bar; yields the callback that advances it."""
    progress = Progress(
        TextColumn("[bold]upload[/bold] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or stderr_console(),
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=total_bytes)
        yield lambda n: progress.advance(task, n)


def format_seconds(seconds: float | None) -> str:
    """``0:01:05`` style, or ``-`` when unknown."""
    if seconds is None:
        return "-"
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def format_metrics(metrics: dict[str, Any] | None, limit: int = 4) -> str:
    """``train_loss 0.612 · val_accuracy 0.83`` for the first ``limit`` numeric metrics."""
    parts = []
    for name, value in (metrics or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{name} {value:.4g}")
        if len(parts) == limit:
            break
    return " · ".join(parts)


class JobProgressDisplay:
    """One row per stage (done / running with its latest metrics / waiting) and an overall bar
    with the service's ETA. Feed it job snapshots with :meth:`update`."""

    def __init__(self, job_id: str, console: Console | None = None) -> None:
        self.job_id = job_id
        self.progress = Progress(
            SpinnerColumn(finished_text=" "),
            TextColumn("{task.fields[mark]} {task.description:<9}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[info]}"),
            console=console or stderr_console(),
            transient=False,
        )
        self.stage_tasks: dict[str, TaskID] = {}
        self.stage_started: dict[str, float] = {}
        self.stage_seconds: dict[str, float] = {}
        self.overall: TaskID | None = None

    def __enter__(self) -> JobProgressDisplay:
        self.progress.start()
        for stage in STAGES:
            self.stage_tasks[stage] = self.progress.add_task(
                stage, total=1, mark=" ", info="[dim]waiting[/dim]", start=False
            )
        self.overall = self.progress.add_task(
            "overall", total=1.0, mark=" ", info=f"{self.job_id} queued"
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def update(self, job: Job) -> None:
        """Redraw from a job snapshot."""
        now = time.monotonic()
        current = job.stage if job.stage in STAGES else None
        current_index = STAGES.index(current) if current else -1
        if job.status == "succeeded":
            current_index = len(STAGES)
        train_metrics = job.metrics.get("train") or {}
        for index, stage in enumerate(STAGES):
            task = self.stage_tasks[stage]
            metrics_text = format_metrics(train_metrics.get(stage))
            if index < current_index:
                if stage in self.stage_started and stage not in self.stage_seconds:
                    self.stage_seconds[stage] = now - self.stage_started[stage]
                took = self.stage_seconds.get(stage)
                info = f"done in {format_seconds(took)}" if took is not None else "done"
                self.progress.start_task(task)  # rich only marks started tasks finished
                self.progress.update(
                    task,
                    total=1,
                    completed=1,
                    mark="[green]✓[/green]",
                    info=f"{info}  {metrics_text}".rstrip(),
                )
                self.progress.stop_task(task)
            elif index == current_index:
                self.stage_started.setdefault(stage, now)
                if job.status in FAILED_STATUSES:
                    self.progress.update(
                        task, total=1, mark="[red]✗[/red]", info=f"[red]{job.status}[/red]"
                    )
                    self.progress.stop_task(task)
                    continue
                self.progress.start_task(task)
                elapsed = format_seconds(now - self.stage_started[stage])
                self.progress.update(
                    task, total=None, mark="[cyan]▸[/cyan]", info=f"{elapsed}  {metrics_text}"
                )
        if self.overall is not None:
            status = job.status
            if job.status in FAILED_STATUSES:
                status = f"[red]{job.status}[/red]"
            elif job.status == "succeeded":
                status = "[green]succeeded[/green]"
            eta = "" if job.done else f" · ETA {format_seconds(job.eta_seconds)}"
            self.progress.update(
                self.overall,
                completed=1.0 if job.status == "succeeded" else job.progress,
                info=f"{job.progress:4.0%}{eta} · {status}",
            )
            if job.done:
                self.progress.stop_task(self.overall)
        self.progress.refresh()
