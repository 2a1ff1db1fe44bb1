"""The ``orca`` command line.

Operator commands: ``orca serve`` (the whole service on one machine: API + an embedded worker),
``orca worker --gpu N | --cpu`` (one Celery worker), ``orca migrate``, ``orca keys create|revoke``,
``orca export-example NAME OUT.npz``, ``orca reap`` (requeue jobs whose worker vanished).
Client commands (``datasets``, ``jobs``, ``models``, ``predict``) talk to a running service over
HTTP through :mod:`orca_client`; they live in :mod:`cli.http_commands` and hang off the same app.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console

from cli.http_commands import register_http_commands

app = typer.Typer(
    name="orca",
    help="ORCA: adapt pretrained transformers to new modalities (align, then refine).",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Create and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)

LOCAL_TENANT = "local"
LOCAL_KEY_FILE = "local-api-key"
# How long `serve` gives the API and the worker to exit after Ctrl-C / SIGTERM before killing them.
SHUTDOWN_GRACE_SECONDS = 20.0

# aeon loaders for `orca export-example`, by the short names the README uses.
EXAMPLES: dict[str, str] = {
    "gunpoint": "load_gunpoint",
    "arrowhead": "load_arrow_head",
    "italypower": "load_italy_power_demand",
    "basicmotions": "load_basic_motions",
}


def _settings(data_dir: Path | None = None) -> Any:
    """Settings for this command; ``--data-dir`` overrides ORCA_DATA_DIR for it and its children."""
    from api.config import get_settings

    if data_dir is not None:
        os.environ["ORCA_DATA_DIR"] = str(data_dir.resolve())
        get_settings.cache_clear()
    return get_settings()


# -- database and keys -------------------------------------------------------------------------


@app.command()
def migrate(
    data_dir: Annotated[
        Path | None, typer.Option(help="root of local state (ORCA_DATA_DIR)")
    ] = None,
) -> None:
    """Bring the database schema to the latest version (alembic upgrade head)."""
    from api.db import run_migrations

    settings = _settings(data_dir)
    run_migrations(settings.resolved_database_url)
    console.print("[green]database is up to date[/green]")


def _issue_key(tenant_name: str) -> tuple[str, str]:
    """Create tenant ``tenant_name`` if needed and a new key for it; returns (key, prefix)."""
    from api.db import session_scope
    from api.security import KEY_DISPLAY_CHARS, create_key

    with session_scope() as session:
        plaintext = create_key(session, tenant_name)
    return plaintext, plaintext[:KEY_DISPLAY_CHARS]


def _key_is_valid(plaintext: str) -> bool:
    """True when ``plaintext`` is a known, unrevoked key."""
    from sqlalchemy import select

    from api.db import session_scope
    from api.models import ApiKey
    from api.security import hash_key

    with session_scope() as session:
        row = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(plaintext))).scalar()
        return row is not None and row.revoked_at is None


def ensure_local_key(data_dir: Path) -> str:
    """The embedded deployment's key for tenant ``local``: reused from ``<data_dir>/local-api-key``.

    The file is written with mode 0600 so repeated ``orca serve`` runs show the same key; a missing,
    revoked or unknown key is replaced by a new one.
    """
    key_file = data_dir / LOCAL_KEY_FILE
    if key_file.is_file():
        existing = key_file.read_text().strip()
        if existing and _key_is_valid(existing):
            return existing
    plaintext, _ = _issue_key(LOCAL_TENANT)
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(plaintext + "\n")
    os.chmod(key_file, 0o600)
    return plaintext


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to (created if new)")],
) -> None:
    """Create an API key and print it. It is shown this once: only its hash is stored."""
    plaintext, prefix = _issue_key(tenant)
    console.print(f"new key for tenant [bold]{tenant}[/bold] (prefix {prefix}); store it now:")
    typer.echo(plaintext)


@keys_app.command("revoke")
def keys_revoke(
    key_prefix: Annotated[str, typer.Argument(help="the key's prefix (as shown) or its id")],
) -> None:
    """Revoke the key whose prefix (as shown at creation) or id is given."""
    from api.db import session_scope
    from api.security import revoke_key

    try:
        with session_scope() as session:
            revoked = [key.prefix for key in revoke_key(session, key_prefix)]
    except (LookupError, ValueError) as problem:
        error_console.print(f"[red]{problem}[/red]")
        raise typer.Exit(1) from None
    console.print(f"revoked key {', '.join(revoked)}")


@app.command()
def reap() -> None:
    """Requeue (or fail) running jobs whose worker stopped sending heartbeats."""
    from api.db import session_scope
    from worker.heartbeat import reap_lost_jobs

    with session_scope() as session:
        changed = reap_lost_jobs(session)
    console.print(
        f"{len(changed)} lost job(s) handled" + (f": {', '.join(changed)}" if changed else "")
    )


# -- examples ------------------------------------------------------------------------------------


def export_example_npz(name: str, out: Path) -> Path:
    """Write an aeon UCR/UEA dataset as an upload-ready .npz (x_train, y_train, x_test, y_test)."""
    import numpy as np
    from aeon import datasets

    loader = getattr(datasets, EXAMPLES[name])
    x_train, y_train = loader(split="train")
    x_test, y_test = loader(split="test")

    def labels(y: Any) -> Any:
        values = np.asarray(y)
        try:
            return values.astype(np.int64)
        except ValueError:
            return values.astype(str)  # named classes stay names (unicode, no pickle needed)

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        np.savez(
            handle,
            x_train=np.asarray(x_train, dtype=np.float32),
            y_train=labels(y_train),
            x_test=np.asarray(x_test, dtype=np.float32),
            y_test=labels(y_test),
        )
    return out


@app.command("export-example")
def export_example(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(EXAMPLES)}")],
    out: Annotated[Path, typer.Argument(help="the .npz file to write")],
) -> None:
    """Export a small UCR/UEA time-series dataset (from aeon) as an .npz ready to upload."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in EXAMPLES:
        error_console.print(
            f"[red]unknown example {name!r}; choose one of {', '.join(EXAMPLES)}[/red]"
        )
        raise typer.Exit(2)
    path = export_example_npz(key, out)
    console.print(f"wrote {path} ({path.stat().st_size} bytes)")


# -- running the service -------------------------------------------------------------------------


def celery_worker_command(
    *, queues: list[str], concurrency: int, node_name: str, loglevel: str = "INFO"
) -> list[str]:
    """The ``celery worker`` command line every ORCA worker runs (one job at a time per process)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--pool",
        "prefork",
        "-n",
        node_name,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


@app.command()
def worker(
    gpu: Annotated[int | None, typer.Option(help="pin this worker to GPU N (queue 'gpu')")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="a CPU-only worker (queue 'cpu')")] = False,
    concurrency: Annotated[int, typer.Option(help="jobs at once (keep 1 per GPU)")] = 1,
    loglevel: Annotated[str, typer.Option(help="celery log level")] = "INFO",
) -> None:
    """Run one Celery worker: pinned to one GPU, or a CPU worker."""
    if (gpu is None) == (not cpu):
        error_console.print("[red]give exactly one of --gpu N or --cpu[/red]")
        raise typer.Exit(2)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        command = celery_worker_command(
            queues=["gpu"], concurrency=concurrency, node_name=f"gpu{gpu}@%h", loglevel=loglevel
        )
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker never grabs a GPU by accident
        command = celery_worker_command(
            queues=["cpu"], concurrency=concurrency, node_name="cpu@%h", loglevel=loglevel
        )
    os.execve(command[0], command, env)


#: prctl(2) option: the signal a child gets when the process that started it dies (Linux)
PR_SET_PDEATHSIG = 1


def _ended_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent`` dies, however it dies.

    ``orca serve`` stops its API and worker itself on Ctrl-C or SIGTERM, but a SIGKILL (an OOM
    kill, ``kill -9``) gives it no chance: without this the two children, in sessions of their
    own, would keep the port and the queue. Linux only; elsewhere a no-op.
    """

    def set_up() -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return set_up


def _wait_until_live(url: str, process: subprocess.Popen[bytes], timeout_seconds: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/livez", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each child's main process (a warm shutdown), then SIGKILL its group after a grace period.

    Only the main processes get SIGTERM: the Celery worker then stops its pool itself. A job still
    running when the grace period ends is killed; it resumes from its last stage checkpoint later.
    """
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its group
        process.wait()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address the API listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port the API listens on")] = 8000,
    workers_cpu: Annotated[int, typer.Option(help="jobs the embedded worker runs at once")] = 1,
    data_dir: Annotated[
        Path | None, typer.Option(help="root of local state (ORCA_DATA_DIR)")
    ] = None,
) -> None:
    """Run the whole service on this machine: migrations, a local API key, the API and a worker.

    With no ORCA_DATABASE_URL / ORCA_BROKER_URL this is the embedded default: a SQLite database and
    a SQLite-file Celery broker under the data dir, no servers needed. The embedded worker consumes
    both queues so GPU jobs run (on the CPU) even where there is no GPU.
    """
    settings = _settings(data_dir)
    from api.db import run_migrations

    data_root = settings.data_dir.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.resolved_database_url)
    api_key = ensure_local_key(data_root)

    env = dict(os.environ)
    env["ORCA_DATA_DIR"] = str(data_root)
    worker_process = subprocess.Popen(
        celery_worker_command(
            queues=["cpu", "gpu"], concurrency=max(workers_cpu, 1), node_name="embedded@%h"
        ),
        env=env,
        start_new_session=True,
        preexec_fn=_ended_with(os.getpid()),
    )
    api_process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            "info",
        ],
        env=env,
        start_new_session=True,
        preexec_fn=_ended_with(os.getpid()),
    )
    children = [api_process, worker_process]
    stopping = False

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous_handlers = {
        sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    try:
        if _wait_until_live(url, api_process, timeout_seconds=120.0):
            console.print(f"[bold green]ORCA is serving[/bold green] at {url} (docs: {url}/docs)")
            console.print(f"API key (tenant '{LOCAL_TENANT}'): [bold]{api_key}[/bold]")
            console.print(f"data dir: {data_root}; press Ctrl-C to stop")
        while not stopping:
            exited = [p for p in children if p.poll() is not None]
            if exited:
                name = "API" if exited[0] is api_process else "worker"
                error_console.print(
                    f"[red]the {name} exited with code {exited[0].returncode}; stopping[/red]"
                )
                break
            time.sleep(0.5)
    finally:
        console.print("stopping the API and the worker ...")
        _stop(children)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if not stopping:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the installed version."""
    from orca_engine import __version__

    typer.echo(__version__)


# Client commands over HTTP (datasets, jobs, models, predict), listed after the operator commands.
register_http_commands(app)

if __name__ == "__main__":
    app()
