"""Prediction and upload load against a real uvicorn process (loopback only).

    .venv/bin/python -m bench.load_predict            # 64 clients x 30 s, 10 x 200 MB uploads
    .venv/bin/python -m bench.load_predict --quick    # 16 clients x 10 s, 10 x 20 MB uploads

Sets up an embedded service in a temp dir (SQLite database, SQLite broker, no worker), trains a
small model on the real MiniLM backbone with the engine (1 epoch, no alignment), installs it the
way the worker does, then:

1. ``clients`` concurrent httpx clients call ``POST /v1/models/{id}/predict`` for ``seconds``:
   errors, p50/p99 latency, throughput, server RSS before/after.
2. ``uploads`` concurrent uploads of random float32 ``.npz`` files of ``upload_mb`` each
   (generated on disk in the temp dir, deleted after): server RSS growth.

Prints a table and replaces the "Prediction load" section of docs/BENCHMARKS.md
(:func:`bench.sections.replace_section`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.sections import BENCHMARKS_MD, bench_command, machine_line, replace_section

logger = logging.getLogger("bench.load_predict")

REPO_ROOT = Path(__file__).resolve().parents[1]
TITLE = "Prediction load"
SAMPLE_SHAPE = (1, 32)


@dataclass
class PredictResult:
    clients: int
    seconds: float
    requests: int
    errors: int
    error_kinds: dict[str, int]
    p50_ms: float
    p99_ms: float
    throughput: float
    rss_before_mb: float
    rss_after_mb: float


@dataclass
class UploadResult:
    uploads: int
    size_mb: float
    succeeded: int
    seconds: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    anon_before_mb: float = 0.0
    anon_peak_mb: float = 0.0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MiB from /proc (``VmRSS`` total, or ``RssAnon``: heap
    only, without page-cache pages of files the process has mapped)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_dataset(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, *SAMPLE_SHAPE)).astype(np.float32)
    x[y == 1] += 1.0
    np.savez(path, x_train=x, y_train=y)
    return path


def train_minilm_bundle(dataset: Path, workdir: Path) -> Path:
    """A real MiniLM-backed bundle from the engine, as cheap as the engine allows."""
    from orca_engine.pipeline import run_job

    spec = {
        "dataset_id": "ds_bench",
        "backbone": "minilm-l6",
        "alignment": {"distance": "none", "epochs": 0, "max_samples": 64},
        "finetune": {"epochs": 1, "batch_size": 32},
        "seed": 0,
    }
    result = run_job(spec, dataset, workdir / "work", bundle_dir=workdir / "bundle", device="cpu")
    return Path(result.bundle_dir)


def install_model(env: dict[str, str], api: str, key: str, dataset: Path, bundle: Path) -> str:
    """Upload + job over HTTP, then finish the job the way the worker does (no worker runs)."""
    from api.config import Settings
    from api.db import session_scope
    from api.models import Job, Model
    from api.storage import LocalStorage

    headers = {"Authorization": f"Bearer {key}"}
    with dataset.open("rb") as handle:
        uploaded = httpx.post(
            f"{api}/v1/datasets", headers=headers, files={"file": (dataset.name, handle)}
        )
    uploaded.raise_for_status()
    job = httpx.post(
        f"{api}/v1/jobs", headers=headers, json={"dataset_id": uploaded.json()["id"]}, timeout=30
    )
    job.raise_for_status()
    settings = Settings(_env_file=None, data_dir=Path(env["ORCA_DATA_DIR"]))  # type: ignore[call-arg]
    storage = LocalStorage(settings.resolved_storage_dir)
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Job, job.json()["id"])
        assert row is not None
        model = Model(
            tenant_id=row.tenant_id,
            job_id=row.id,
            dataset_id=row.dataset_id,
            storage_key="",
            task_spec={},
            metrics={},
        )
        session.add(model)
        session.flush()
        model.storage_key = storage.model_key(model.id)
        shutil.copytree(bundle, storage.model_dir(model.id))
        row.status, row.model_id, row.progress = "succeeded", model.id, 1.0
        return str(model.id)


async def predict_load(
    api: str,
    key: str,
    model_id: str,
    *,
    clients: int,
    seconds: float,
    server_pid: int,
    sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
) -> PredictResult:
    """``clients`` concurrent clients, each sending one sample per request for ``seconds``."""
    rng = np.random.default_rng(1)
    body = {"inputs": rng.normal(size=sample_shape).astype(np.float32).tolist()}
    url = f"{api}/v1/models/{model_id}/predict"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=60
    ) as http:
        warm = await http.post(url, json=body)  # load the model once before measuring
        warm.raise_for_status()
        rss_before = rss_mb(server_pid)
        deadline = time.perf_counter() + seconds

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await http.post(url, json=body)
                    kind = None if response.status_code == 200 else str(response.status_code)
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                latencies.append(time.perf_counter() - started)
                if kind is not None:
                    errors[kind] = errors.get(kind, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return PredictResult(
        clients=clients,
        seconds=elapsed,
        requests=len(latencies),
        errors=sum(errors.values()),
        error_kinds=errors,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=quantiles[98] * 1000,
        throughput=len(latencies) / elapsed,
        rss_before_mb=rss_before,
        rss_after_mb=rss_mb(server_pid),
    )


def write_random_npz(path: Path, megabytes: float, seed: int) -> Path:
    """A float32 ``x_train`` of about ``megabytes`` MB (+ labels), written without a big buffer."""
    columns = 256
    rows = max(2, int(megabytes * 1e6 / (4 * columns)))
    rng = np.random.default_rng(seed)
    x = np.lib.format.open_memmap(
        path.with_suffix(".x.npy"), mode="w+", dtype=np.float32, shape=(rows, columns)
    )
    for start in range(0, rows, 16384):
        stop = min(rows, start + 16384)
        x[start:stop] = rng.standard_normal((stop - start, columns), dtype=np.float32)
    x.flush()
    np.savez(path, x_train=x, y_train=(np.arange(rows) % 2).astype(np.int64))
    del x
    path.with_suffix(".x.npy").unlink()
    return path


async def upload_load(
    api: str, key: str, files: list[Path], *, server_pid: int
) -> tuple[int, float, float, float, float]:
    """Upload ``files`` concurrently; (succeeded, seconds, peak RSS, peak anon RSS, RSS after)."""
    peak = [rss_mb(server_pid), rss_mb(server_pid, "RssAnon")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_mb(server_pid))
            peak[1] = max(peak[1], rss_mb(server_pid, "RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def one(http: httpx.AsyncClient, path: Path) -> bool:
        async def chunks() -> Any:
            with path.open("rb") as handle:
                while block := handle.read(1024 * 1024):
                    yield block

        boundary = f"bench{path.stem}"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> Any:
            yield head
            async for block in chunks():
                yield block
            yield tail

        response = await http.post(
            f"{api}/v1/datasets",
            content=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(head) + path.stat().st_size + len(tail)),
            },
        )
        if response.status_code != 201:
            logger.warning("upload of %s: %s %s", path.name, response.status_code, response.text)
        return response.status_code == 201

    started = time.perf_counter()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        results = await asyncio.gather(*(one(http, path) for path in files))
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    return sum(results), elapsed, peak[0], peak[1], rss_mb(server_pid)


def markdown(
    args: argparse.Namespace, predict: PredictResult, uploads: UploadResult, command: str
) -> str:
    growth = uploads.rss_peak_mb - uploads.rss_before_mb
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(predict.error_kinds.items())) or "none"
    return "\n".join(
        [
            "CPU shared with other work; API = one uvicorn process on 127.0.0.1 (SQLite embedded "
            "mode, prediction on CPU), model = MiniLM-L6 backbone on (1, 32) inputs."
            + (
                " **Quick run** (`--quick`: fewer clients, shorter, 20 MB files)."
                if args.quick
                else ""
            ),
            "",
            "| predict | value |",
            "|---|---|",
            f"| concurrent clients | {predict.clients} |",
            f"| duration | {predict.seconds:.1f} s |",
            f"| requests | {predict.requests} |",
            f"| errors | {predict.errors} ({errors}) |",
            f"| latency p50 / p99 | {predict.p50_ms:.0f} ms / {predict.p99_ms:.0f} ms |",
            f"| throughput | {predict.throughput:.1f} req/s |",
            f"| server RSS before / after | {predict.rss_before_mb:.0f} MB / "
            f"{predict.rss_after_mb:.0f} MB |",
            "",
            "| uploads | value |",
            "|---|---|",
            f"| concurrent uploads | {uploads.uploads} x {uploads.size_mb:.0f} MB "
            "(random float32 .npz) |",
            f"| accepted | {uploads.succeeded} / {uploads.uploads} |",
            f"| wall time | {uploads.seconds:.1f} s |",
            f"| server RSS before / peak / after | {uploads.rss_before_mb:.0f} / "
            f"{uploads.rss_peak_mb:.0f} / {uploads.rss_after_mb:.0f} MB |",
            f"| RSS growth at peak | {growth:.0f} MB (target < 100 MB) |",
            f"| of which heap (RssAnon) | {uploads.anon_peak_mb - uploads.anon_before_mb:.0f} MB; "
            "the rest is page cache of files the validator maps |",
            "",
            machine_line(command, device="cpu"),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 clients, 10 s, 20 MB uploads")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--upload-mb", type=float, default=None)
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    clients = args.clients or (16 if args.quick else 64)
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    upload_mb = args.upload_mb or (20.0 if args.quick else 200.0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="orca-load-"))
    server: subprocess.Popen[bytes] | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCA_")}
        env.update(
            {
                "ORCA_DATA_DIR": str(root / "var"),
                "ORCA_PREDICT_RATE_PER_MINUTE": "100000000",
                "ORCA_MAX_CONCURRENT_JOBS_PER_TENANT": "100",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(REPO_ROOT),
            }
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith("ORCA_")})
        from api.config import get_settings
        from api.db import run_migrations, session_scope
        from api.security import create_key

        get_settings.cache_clear()
        run_migrations()
        with session_scope() as session:
            key = create_key(session, "load")

        dataset = write_dataset(root / "small.npz")
        logger.info("training a MiniLM bundle (1 epoch, no alignment)...")
        bundle = train_minilm_bundle(dataset, root)

        port = free_port()
        api = f"http://127.0.0.1:{port}"
        log = (root / "api.log").open("wb")
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)),
                *("--host", "127.0.0.1", "--log-level", "warning"),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the API did not start; see {root / 'api.log'}")
            time.sleep(0.3)

        model_id = install_model(env, api, key, dataset, bundle)
        logger.info("predict: %d clients for %.0f s...", clients, seconds)
        predict = asyncio.run(
            predict_load(
                api, key, model_id, clients=clients, seconds=seconds, server_pid=server.pid
            )
        )

        files_dir = root / "uploads"
        files_dir.mkdir()
        logger.info("writing %d x %.0f MB upload files...", args.uploads, upload_mb)
        files = [
            write_random_npz(files_dir / f"up{i}.npz", upload_mb, seed=i)
            for i in range(args.uploads)
        ]
        before = rss_mb(server.pid)
        anon_before = rss_mb(server.pid, "RssAnon")
        logger.info("uploading them concurrently...")
        ok, elapsed, peak, anon_peak, after = asyncio.run(
            upload_load(api, key, files, server_pid=server.pid)
        )
        uploads = UploadResult(
            uploads=len(files),
            size_mb=files[0].stat().st_size / 1e6,
            succeeded=ok,
            seconds=elapsed,
            rss_before_mb=before,
            rss_peak_mb=peak,
            rss_after_mb=after,
            anon_before_mb=anon_before,
            anon_peak_mb=anon_peak,
        )
        shutil.rmtree(files_dir, ignore_errors=True)

        command = bench_command("bench.load_predict", argv)
        section = markdown(args, predict, uploads, command)
        print(section)
        if not args.no_doc:
            replace_section(BENCHMARKS_MD, TITLE, section)
            logger.info("updated %s", BENCHMARKS_MD)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
