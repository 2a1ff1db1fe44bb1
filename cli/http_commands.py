"""The ``orca`` commands that talk to a running service over HTTP, built on :mod:`orca_client`.

``orca datasets upload|ls|show|rm|analyze|analysis``, ``orca jobs create|ls|show|wait|cancel|events``,
``orca models ls|show|download|rm`` and ``orca predict``. The service and key come from
``--url`` / ``--api-key`` or ``ORCA_URL`` / ``ORCA_API_KEY``. Every command takes ``--json``
(the service's JSON on stdout; errors as the service's error envelope). Progress bars go to
stderr. Exit codes: 0 ok, 1 API or user error, 2 usage error, 3 job failed or cancelled.

``orca_client`` (and numpy) are imported when a command runs, not when ``orca`` starts, so the
operator commands (``serve``, ``worker``, ``migrate``, ...) never depend on the client package.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import numpy as np

    from orca_client import Analysis, Client, Dataset, Event, Job, Model

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3
EXIT_INTERRUPTED = 130

console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)

datasets_app = typer.Typer(help="Upload and manage datasets (over HTTP).", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, follow and cancel fine-tuning jobs.", no_args_is_help=True)
models_app = typer.Typer(help="List, download and delete fine-tuned models.", no_args_is_help=True)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="service URL [env ORCA_URL; default http://127.0.0.1:8000]"),
]
ApiKeyOption = Annotated[str | None, typer.Option("--api-key", help="API key [env ORCA_API_KEY]")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the service's JSON on stdout")]
LimitOption = Annotated[
    int, typer.Option("--limit", min=0, help="show at most this many, newest first (0: all)")
]


def register_http_commands(app: typer.Typer) -> None:
    """Hang the HTTP sub-commands off the main ``orca`` app."""
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")
    app.command("predict")(predict)


# -- plumbing -----------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    """JSON on stdout, unstyled (rich would wrap and colour it)."""
    typer.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def report_table(report: dict[str, Any]) -> Table | None:
    """The upload validation report as a table (None when it is empty)."""
    rows = [("error", issue) for issue in report.get("errors") or []]
    rows += [("warning", issue) for issue in report.get("warnings") or []]
    if not rows:
        return None
    table = Table(title="validation report", title_justify="left")
    table.add_column("level")
    table.add_column("field", style="bold")
    table.add_column("message")
    for level, issue in rows:
        colour = "red" if level == "error" else "yellow"
        table.add_row(
            f"[{colour}]{level}[/{colour}]", str(issue.get("field", "")), issue.get("message", "")
        )
    return table


def show_report(report: dict[str, Any], target: Console) -> None:
    table = report_table(report)
    if table is None:
        target.print("validation report: no problems found")
    else:
        target.print(table)


@contextmanager
def api_errors(json_output: bool) -> Iterator[None]:
    """Turn client errors into messages and exit codes (1 API/user error, 3 job or analysis
    failed)."""
    from orca_client import AnalysisFailed, ApiError, JobFailed, OrcaError

    try:
        yield
    except AnalysisFailed as failure:
        if json_output:
            print_json(failure.analysis.to_dict())
        else:
            error_console.print(
                f"[red]analysis {failure.analysis.id} failed[/red]: {failure.code}: "
                f"{failure.message}"
            )
        raise typer.Exit(EXIT_JOB_FAILED) from None
    except JobFailed as failure:
        if json_output:
            print_json(failure.job.to_dict())
        else:
            error_console.print(
                f"[red]job {failure.job.id} {failure.status}[/red]: {failure.code}: {failure.message}"
            )
        raise typer.Exit(EXIT_JOB_FAILED) from None
    except ApiError as error:
        if json_output:
            print_json(error.to_dict())
        else:
            where = f" (param {error.param})" if error.param else ""
            error_console.print(
                f"[red]error {error.status} {error.code}[/red]: {error.message}{where}"
            )
            if error.report is not None:
                show_report(error.report, error_console)
            if error.retry_after is not None:
                error_console.print(f"retry after {error.retry_after:g} s")
        raise typer.Exit(EXIT_ERROR) from None
    except OrcaError as error:
        if json_output:
            print_json(
                {"error": {"type": "client_error", "code": "client_error", "message": str(error)}}
            )
        else:
            error_console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(EXIT_ERROR) from None


@contextmanager
def connect(url: str | None, api_key: str | None, json_output: bool) -> Iterator[Client]:
    """A client for this command, with its errors turned into exit codes."""
    from orca_client import Client

    with api_errors(json_output):
        client = Client(url, api_key)
        with client:
            yield client


def list_table(*columns: str) -> Table:
    """A listing whose first column, the id, is never shortened (it is what users copy)."""
    table = Table()
    table.add_column(columns[0], no_wrap=True, min_width=28)
    for column in columns[1:]:
        table.add_column(column)
    return table


def _first(items: Iterable[Any], limit: int) -> list[Any]:
    return list(itertools.islice(items, limit)) if limit else list(items)


def _shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _when(value: Any, short: bool = False) -> str:
    if value is None:
        return "-"
    return value.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S %Z")


def _details(rows: list[tuple[str, Any]]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, "-" if value is None or value == "" else str(value))
    return table


def _metric_groups(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    from orca_client.progress import format_metrics

    rows: list[tuple[str, Any]] = []
    for group in ("val", "test"):
        if metrics.get(group):
            rows.append((f"{group} metrics", format_metrics(metrics[group], limit=8)))
    alignment = metrics.get("alignment") or {}
    if "before" in alignment:
        after = alignment.get("after")
        shown = f"{alignment['before']:.4g} → {after:.4g}" if after is not None else "-"
        rows.append(
            ("alignment distance", f"{alignment['before']:.4g}" if after is None else shown)
        )
    return rows


# -- datasets -----------------------------------------------------------------------------------


def dataset_details(dataset: Dataset) -> Table:
    classes = dataset.classes
    shown_classes = None
    if classes is not None:
        shown_classes = ", ".join(str(c) for c in classes[:10]) + (
            " ..." if len(classes) > 10 else ""
        )
    return _details(
        [
            ("id", dataset.id),
            ("name", dataset.name),
            ("file", f"{dataset.filename} ({dataset.format}, {dataset.bytes} bytes)"),
            ("sha256", dataset.sha256),
            ("input", f"{dataset.input_kind} {_shape(dataset.sample_shape)}"),
            ("labels", f"{_shape(dataset.label_shape)}"),
            ("task type", dataset.task_type),
            ("classes", shown_classes),
            ("splits", ", ".join(f"{k} {v}" for k, v in dataset.splits.items())),
            ("label column", dataset.label_column),
            ("created", _when(dataset.created_at)),
        ]
    )


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help=".npz, .csv or .parquet")
    ],
    name: Annotated[str | None, typer.Option(help="display name (default: the file name)")] = None,
    label_column: Annotated[
        str | None, typer.Option(help="label column of a .csv/.parquet (default: label)")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload a dataset; prints what the service inferred and its validation report."""
    with connect(url, api_key, json_output) as client:
        dataset = client.upload_dataset(
            file, name=name, label_column=label_column, progress=not json_output
        )
    if json_output:
        print_json(dataset.to_dict())
        return
    console.print(dataset_details(dataset))
    show_report(dataset.report, console)


@datasets_app.command("ls")
def datasets_ls(
    limit: LimitOption = 20,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """List datasets, newest first."""
    with connect(url, api_key, json_output) as client:
        datasets = _first(client.list_datasets(page_size=min(limit or 100, 100)), limit)
    if json_output:
        print_json([d.to_dict() for d in datasets])
        return
    table = list_table("id", "name", "input", "task", "train/val/test", "created")
    for d in datasets:
        table.add_row(
            d.id,
            d.name,
            f"{d.input_kind} {_shape(d.sample_shape)}",
            d.task_type or "-",
            "/".join(str(d.splits.get(split, 0)) for split in ("train", "val", "test")),
            _when(d.created_at, short=True),
        )
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="dataset id (ds_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show one dataset and its validation report."""
    with connect(url, api_key, json_output) as client:
        dataset = client.get_dataset(dataset_id)
    if json_output:
        print_json(dataset.to_dict())
        return
    console.print(dataset_details(dataset))
    show_report(dataset.report, console)


@datasets_app.command("rm")
def datasets_rm(
    dataset_id: Annotated[str, typer.Argument(help="dataset id (ds_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete a dataset (refused while an unfinished job uses it)."""
    with connect(url, api_key, json_output) as client:
        client.delete_dataset(dataset_id)
    if json_output:
        print_json({"id": dataset_id, "deleted": True})
    else:
        console.print(f"deleted dataset {dataset_id}")


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def analysis_table(analysis: Analysis) -> Table:
    """The ranking: one row per candidate pair, best first, skipped ones last with the reason."""
    distance = analysis.params.get("distance", "")
    table = Table(
        title=f"transferability of {analysis.dataset_id} ({distance}, lower score is better)",
        title_justify="left",
    )
    table.add_column("rank", justify="right")
    table.add_column("backbone", style="bold")
    table.add_column("source")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("score", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("note")
    for row in analysis.ranking:
        best = row.get("rank") == 1
        table.add_row(
            str(row.get("rank") or "-"),
            str(row.get("backbone", "")),
            str(row.get("source", "")),
            _number(row.get("before")),
            _number(row.get("after")),
            f"[green]{_number(row.get('score'))}[/green]" if best else _number(row.get("score")),
            "-" if row.get("seconds") is None else f"{row['seconds']:.1f}",
            str(row.get("reason") or ("best" if best else "")),
        )
    return table


def show_analysis(analysis: Analysis) -> None:
    console.print(
        _details(
            [
                ("analysis", analysis.id),
                ("dataset", analysis.dataset_id),
                ("status", analysis.status),
                ("seconds", _number(analysis.seconds)),
                (
                    "best",
                    f"{analysis.best['backbone']} + {analysis.best['source']}"
                    if analysis.best
                    else None,
                ),
            ]
        )
    )
    if analysis.ranking:
        console.print(analysis_table(analysis))
    if analysis.best:
        console.print("jobs with backbone 'auto' / alignment.source 'auto' now use the best pair")


@datasets_app.command("analyze")
def datasets_analyze(
    dataset_id: Annotated[str, typer.Argument(help="dataset id (ds_...)")],
    backbones: Annotated[
        list[str] | None,
        typer.Option("--backbone", help="a backbone to compare (repeat; default: all installed)"),
    ] = None,
    sources: Annotated[
        list[str] | None,
        typer.Option("--source", help="an extra source proxy: a proxy name or a dataset id"),
    ] = None,
    sample_size: Annotated[
        int | None, typer.Option(min=2, max=500, help="rows of the dataset embedded [256]")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=0, max=20, help="alignment epochs [10]")
    ] = None,
    distance: Annotated[str | None, typer.Option(help="dataset distance [otdd]")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="random seed [0]")] = None,
    allow_random_init: Annotated[
        bool, typer.Option("--allow-random-init", help="also try the tiny random test backbones")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the ranking; exit 3 if it fails")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Rank backbone/source pairs for a dataset (a short alignment each, seconds to a minute)."""
    with connect(url, api_key, json_output) as client:
        analysis = client.analyze_dataset(
            dataset_id,
            backbones=backbones or None,
            sources=sources or None,
            sample_size=sample_size,
            align_epochs=epochs,
            distance=distance,
            seed=seed,
            allow_random_init=allow_random_init or None,
        )
        if wait:
            if not json_output:
                with error_console.status(f"analysing {dataset_id} ({analysis.id})"):
                    analysis = client.wait_analysis(dataset_id, analysis_id=analysis.id)
            else:
                analysis = client.wait_analysis(dataset_id, analysis_id=analysis.id)
    if json_output:
        print_json(analysis.to_dict())
    elif wait:
        show_analysis(analysis)
    else:
        console.print(
            f"analysis {analysis.id} is {analysis.status}; "
            f"`orca datasets analysis {dataset_id}` shows the ranking"
        )


@datasets_app.command("analysis")
def datasets_analysis(
    dataset_id: Annotated[str, typer.Argument(help="dataset id (ds_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the latest transferability analysis of a dataset and its ranking."""
    with connect(url, api_key, json_output) as client:
        analysis = client.get_analysis(dataset_id)
    if json_output:
        print_json(analysis.to_dict())
    else:
        show_analysis(analysis)


# -- jobs ---------------------------------------------------------------------------------------


def job_details(job: Job) -> Table:
    from orca_client.progress import format_seconds

    rows: list[tuple[str, Any]] = [
        ("id", job.id),
        ("name", job.name),
        ("status", job.status),
        ("stage", job.stage),
        ("progress", f"{job.progress:.0%}"),
    ]
    if not job.done:
        rows.append(("ETA", format_seconds(job.eta_seconds)))
    rows += [
        ("dataset", job.dataset_id),
        ("queue", job.queue),
        ("model", job.model_id),
        *_metric_groups(job.metrics),
    ]
    if job.error is not None:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    rows += [
        ("created", _when(job.created_at)),
        ("finished", _when(job.finished_at)),
    ]
    return _details(rows)


def _read_spec(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as problem:
        raise typer.BadParameter(f"cannot read {path}: {problem}", param_hint="--spec") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object", param_hint="--spec")
    return spec


@jobs_app.command("create")
def jobs_create(
    dataset: Annotated[str, typer.Option("--dataset", help="dataset id (ds_...)")],
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", exists=True, dir_okay=False, help="task spec JSON (SPEC §4)"),
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="override one spec field: key.path=value (value parsed as JSON when it can be), "
            "e.g. --set finetune.epochs=5 --set backbone=minilm-l6",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="job name")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="a retried create with the same key returns the same job")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow it to the end; exit 3 if it fails")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a fine-tuning job from a spec file and/or --set overrides."""
    from orca_client.specs import apply_assignments

    spec = _read_spec(spec_file)
    try:
        spec = apply_assignments(spec, assignments or [])
    except ValueError as problem:
        raise typer.BadParameter(str(problem), param_hint="--set") from None
    if name is not None:
        spec["name"] = name
    with connect(url, api_key, json_output) as client:
        job = client.create_job(dataset, spec, idempotency_key=idempotency_key)
        if wait:
            if not json_output:
                error_console.print(
                    f"job {job.id} {job.status}; following it (Ctrl-C stops waiting)"
                )
            job = _wait(client, job.id, progress=not json_output)
    if json_output:
        print_json(job.to_dict())
    else:
        console.print(job_details(job))


def _wait(client: Client, job_id: str, *, progress: bool) -> Job:
    try:
        return client.wait_job(job_id, progress=progress)
    except KeyboardInterrupt:
        error_console.print(
            f"stopped waiting; job {job_id} goes on (`orca jobs cancel {job_id}` stops it)"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


@jobs_app.command("wait")
def jobs_wait(
    job_id: Annotated[str, typer.Argument(help="job id (job_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Follow a job with a progress bar until it ends; exit 3 if it failed or was cancelled."""
    with connect(url, api_key, json_output) as client:
        job = _wait(client, job_id, progress=not json_output)
    if json_output:
        print_json(job.to_dict())
    else:
        console.print(job_details(job))


@jobs_app.command("ls")
def jobs_ls(
    limit: LimitOption = 20,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    with connect(url, api_key, json_output) as client:
        jobs = _first(client.list_jobs(page_size=min(limit or 100, 100)), limit)
    if json_output:
        print_json([j.to_dict() for j in jobs])
        return
    table = list_table("id", "name", "status", "stage", "progress", "model", "created")
    for j in jobs:
        table.add_row(
            j.id,
            j.name or "-",
            j.status,
            j.stage or "-",
            f"{j.progress:.0%}",
            j.model_id or "-",
            _when(j.created_at, short=True),
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="job id (job_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show a job: status, stage, progress, ETA, metrics, error, model."""
    with connect(url, api_key, json_output) as client:
        job = client.get_job(job_id)
    if json_output:
        print_json(job.to_dict())
    else:
        console.print(job_details(job))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="job id (job_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Cancel a job (exit 1 with the service's 409 if it already finished)."""
    with connect(url, api_key, json_output) as client:
        job = client.cancel_job(job_id)
    if json_output:
        print_json(job.to_dict())
    else:
        console.print(f"job {job.id} is {job.status}")


def _event_line(event: Event) -> str:
    return f"{event.created_at:%H:%M:%S} {event.kind:<7} {event.message}"


@jobs_app.command("events")
def jobs_events(
    job_id: Annotated[str, typer.Argument(help="job id (job_...)")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="stream live until the job ends")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Print a job's event log; with --follow, stream it live (--json: one object per line)."""
    with connect(url, api_key, json_output) as client:
        try:
            for event in client.events(job_id, follow=follow):
                if json_output:
                    typer.echo(json.dumps(event.to_dict(), ensure_ascii=False))
                else:
                    console.print(_event_line(event), markup=False, highlight=False)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


# -- models -------------------------------------------------------------------------------------


def model_details(model: Model) -> Table:
    spec = model.task_spec
    return _details(
        [
            ("id", model.id),
            ("name", model.name),
            ("job", model.job_id),
            ("dataset", model.dataset_id),
            ("size", f"{model.bytes} bytes"),
            ("task", f"{spec.get('task_type', '-')} ({spec.get('metric', '-')})"),
            ("backbone", spec.get("backbone")),
            ("distance", spec.get("distance")),
            ("finetune", spec.get("finetune_mode")),
            *_metric_groups(model.metrics),
            ("created", _when(model.created_at)),
        ]
    )


@models_app.command("ls")
def models_ls(
    limit: LimitOption = 20,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """List fine-tuned models, newest first."""
    from orca_client.progress import format_metrics

    with connect(url, api_key, json_output) as client:
        models = _first(client.list_models(page_size=min(limit or 100, 100)), limit)
    if json_output:
        print_json([m.to_dict() for m in models])
        return
    table = list_table("id", "name", "task", "backbone", "test", "created")
    for m in models:
        table.add_row(
            m.id,
            m.name or "-",
            str(m.task_spec.get("task_type", "-")),
            str(m.task_spec.get("backbone", "-")),
            format_metrics(m.metrics.get("test"), limit=1) or "-",
            _when(m.created_at, short=True),
        )
    console.print(table)


@models_app.command("show")
def models_show(
    model_id: Annotated[str, typer.Argument(help="model id (mdl_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show a model: the resolved spec it was trained with and its metrics."""
    with connect(url, api_key, json_output) as client:
        model = client.get_model(model_id)
    if json_output:
        print_json(model.to_dict())
    else:
        console.print(model_details(model))


@models_app.command("download")
def models_download(
    model_id: Annotated[str, typer.Argument(help="model id (mdl_...)")],
    path: Annotated[
        Path, typer.Argument(help="file to write, or a directory for <model id>.zip")
    ] = Path("."),
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Download the checkpoint bundle (.zip: safetensors + config.json + metrics.json)."""
    with connect(url, api_key, json_output) as client:
        written = client.download_model(model_id, path)
    size = written.stat().st_size
    if json_output:
        print_json({"id": model_id, "path": str(written), "bytes": size})
    else:
        console.print(f"wrote {written} ({size} bytes)")


@models_app.command("rm")
def models_rm(
    model_id: Annotated[str, typer.Argument(help="model id (mdl_...)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete a model and its files."""
    with connect(url, api_key, json_output) as client:
        client.delete_model(model_id)
    if json_output:
        print_json({"id": model_id, "deleted": True})
    else:
        console.print(f"deleted model {model_id}")


# -- predict ------------------------------------------------------------------------------------


def read_inputs(path: Path, label_column: str) -> np.ndarray:
    """A batch of samples from ``.npy`` (any shape) or ``.csv`` (one row per sample, numeric
    columns; ``label_column`` is dropped when present, as at upload)."""
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    if suffix == ".csv":
        import pandas as pd

        table = pd.read_csv(path)
        table = table.drop(columns=[label_column], errors="ignore")
        return table.to_numpy(dtype=np.float32)
    raise ValueError(f"unsupported input file {path.name!r}: give a .npy batch or a .csv table")


@contextmanager
def _user_errors(json_output: bool) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as problem:
        if json_output:
            print_json(
                {
                    "error": {
                        "type": "client_error",
                        "code": "invalid_input",
                        "message": str(problem),
                    }
                }
            )
        else:
            error_console.print(f"[red]error[/red]: {problem}")
        raise typer.Exit(EXIT_ERROR) from None


def predict(
    model_id: Annotated[str, typer.Argument(help="model id (mdl_...)")],
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help=".npy batch or .csv rows of features"),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="also write the answer as JSON to this file")
    ] = None,
    label_column: Annotated[
        str, typer.Option(help="CSV column dropped before predicting, if present")
    ] = "label",
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Predict with a fine-tuned model; labels come back in the upload's own label space."""
    with _user_errors(json_output):
        inputs = read_inputs(file, label_column)
    with connect(url, api_key, json_output) as client:
        answer = client.predict(model_id, inputs)
    if out is not None:
        with _user_errors(json_output):
            out.write_text(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if json_output:
        print_json(answer.to_dict())
        return
    table = Table("#", "prediction", "probability")
    for index, prediction in enumerate(answer.predictions):
        probability = "-"
        if answer.probabilities is not None:
            probability = f"{max(answer.probabilities[index]):.3f}"
        table.add_row(str(index), json.dumps(prediction, ensure_ascii=False), probability)
    console.print(table)
    if out is not None:
        console.print(f"wrote {out}")
