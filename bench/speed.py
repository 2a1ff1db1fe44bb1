"""Speed suite: each cost of the service next to the baseline it is judged against, in one run.

    python -m bench.speed --quick            # about 3-5 minutes on a 2-core CPU
    python -m bench.speed                    # more sizes, longer runs, more repeats
    python -m bench.speed --device cuda      # the same on a GPU (bf16 autocast, GPU memory)

Four measurements, each a ratio taken side by side on the same machine in the same run:

1. **Alignment step** vs the recompute-everything baseline (``bench.align_speed``'s child
   processes; ``--quick`` measures fewer target sizes and only ``otdd``).
2. **Refine throughput**: the engine's training loop (:func:`orca_engine.refine.refine`) vs a
   bare PyTorch loop over the same model (MiniLM on aeon GunPoint), the same batches in the same
   order, the same optimizer groups, loss, gradient clipping and autocast. Only the training
   phase of each epoch is timed on both sides (the engine's per-epoch validation is excluded via
   the step timestamps its progress callbacks give), the first epoch is a warm-up, variants run in
   alternating order and the median of paired ratios is reported.
3. **Prediction**: HTTP throughput and p50/p99 latency of ``POST /v1/models/{id}/predict`` on a
   real uvicorn process (one sample per request; sequential, then 32 concurrent clients) vs the
   bare in-process ``Predictor.predict`` of the same downloaded bundle at batch 1, at the batch
   size the micro-batcher formed (read from the API's ``/metrics`` histogram) and at the batch
   the concurrent clients allow (32).
4. **Job overhead**: ``POST /v1/jobs`` to the worker's first optimizer step on an idle, warm
   Celery worker (the job's stage turns ``refine`` with the first step's progress report), plus
   where the time goes, from the job's own timestamps (created, claimed, stage events).

The service is the embedded default (SQLite database, kombu's SQLite broker, one worker process)
in a temporary directory; the model it serves comes from a real job on that worker. Progress
goes to stderr; the table goes to stdout and to the "Speed" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import io
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.sections import BENCHMARKS_MD, bench_command, machine_line, replace_section
from orca_engine.progress import Callbacks

logger = logging.getLogger("bench.speed")

TITLE = "Speed"
REPO_ROOT = Path(__file__).resolve().parent.parent
PARTS = ("align", "refine", "predict", "job")

#: targets from issue 6
REFINE_OVERHEAD_TARGET = 0.10
HTTP_RATIO_TARGET = 0.70
JOB_OVERHEAD_TARGET_SECONDS = 2.0

CONCURRENT_CLIENTS = 32
#: how often the job-overhead probe asks for the job's stage (its time resolution)
JOB_POLL_SECONDS = 0.025
#: the worker sits idle this long before each job-overhead probe
IDLE_BEFORE_JOB_SECONDS = 1.5


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does (``--quick`` or full)."""

    align_sizes: tuple[int, ...]
    align_repeats: int
    align_methods: tuple[str, ...]
    refine_epochs: int
    refine_repeats: int
    predict_sequential_seconds: float
    predict_concurrent_seconds: float
    bare_seconds: float
    bare_batch_sizes: tuple[int, ...]
    job_repeats: int


QUICK = Plan(
    align_sizes=(500, 1000),
    align_repeats=3,
    align_methods=("otdd",),
    refine_epochs=2,
    refine_repeats=3,
    predict_sequential_seconds=6.0,
    predict_concurrent_seconds=12.0,
    bare_seconds=3.0,
    bare_batch_sizes=(1, 32),
    job_repeats=3,
)
FULL = Plan(
    align_sizes=(250, 500, 1000, 2000, 4000),
    align_repeats=5,
    align_methods=("otdd",),
    refine_epochs=4,
    refine_repeats=5,
    predict_sequential_seconds=20.0,
    predict_concurrent_seconds=30.0,
    bare_seconds=8.0,
    bare_batch_sizes=(1, 4, 8, 16, 32, 64),
    job_repeats=7,
)


# --- shared set-up ---------------------------------------------------------------------------


def gunpoint_npz(directory: Path) -> Path:
    """aeon's GunPoint as an upload-ready .npz (what ``orca export-example gunpoint`` writes)."""
    from cli.main import export_example_npz

    return export_example_npz("gunpoint", directory / "gunpoint.npz")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --- 1. alignment step -----------------------------------------------------------------------


def measure_alignment(plan: Plan, device: str, threads: int) -> list[dict[str, Any]]:
    """Our otdd step vs ``otdd_reference`` per target size (child processes, fresh each)."""
    from bench import align_speed

    return align_speed.run(
        list(plan.align_sizes), plan.align_repeats, device, threads, methods=plan.align_methods
    )


def alignment_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target rows | ours (otdd) s/step | baseline s/step | baseline / ours | value diff |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours = row["otdd"]["seconds"]
        ref = row.get("reference")
        if ref is None:
            lines.append(f"| {row['rows']} | {ours:.3f} | skipped | - | - |")
            continue
        lines.append(
            f"| {row['rows']} | {ours:.3f} | {ref['seconds']:.2f} | "
            f"{ref['seconds'] / ours:.1f}x | {ref['rel_diff']:.1e} |"
        )
    return "\n".join(lines)


# --- 2. refine throughput --------------------------------------------------------------------


@dataclass
class TrainRun:
    """One timed training run: the training phase of its epochs, without validation."""

    variant: str
    seconds: float
    samples: int
    peak_gpu_mib: float | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds


@dataclass
class RefineSetup:
    """Everything both loops share: data, spec, model and its initial weights, batch order."""

    dataset: Any
    rspec: Any
    recipe_spec: Any
    preprocessing: Any
    model: Any
    initial_state: dict[str, Any]
    device: Any
    n_train: int
    batch_size: int
    steps_per_epoch: int


class StepClock(Callbacks):
    """Engine callbacks that timestamp each training step and nothing else.

    The refine loop calls ``check_cancelled`` first thing for every batch and ``progress`` right
    after the optimizer step (every step while a run has fewer than 200 steps), so the span from
    an epoch's first ``check_cancelled`` to its last step's ``progress`` is that epoch's training
    phase without its validation pass.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.batch_starts: list[float] = []
        self.step_ends: list[tuple[int, float]] = []

    def check_cancelled(self) -> None:
        self.batch_starts.append(time.perf_counter())

    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        # The end-of-epoch report repeats the last step's number: not a new step.
        if stage == "refine" and (not self.step_ends or self.step_ends[-1][0] != step):
            synchronize(self.device)
            self.step_ends.append((step, time.perf_counter()))

    def training_seconds(self, steps_per_epoch: int, epochs: int) -> float:
        """Summed training-phase time of all ``epochs``."""
        expected = steps_per_epoch * epochs
        if len(self.batch_starts) != expected or len(self.step_ends) != expected:
            raise RuntimeError(
                f"the refine loop reported {len(self.batch_starts)} batch starts and "
                f"{len(self.step_ends)} steps; expected {expected} of each (did its progress "
                "reporting change?)"
            )
        total = 0.0
        for epoch in range(epochs):
            begin = self.batch_starts[epoch * steps_per_epoch]
            end = self.step_ends[(epoch + 1) * steps_per_epoch - 1][1]
            total += end - begin
        return total


def prepare_refine(plan: Plan, backbone: str, device_name: str, workdir: Path) -> RefineSetup:
    """GunPoint, its resolved spec (no alignment, no early stop) and a fresh model."""
    from orca_engine.backbones import create_backbone
    from orca_engine.data import load_dataset
    from orca_engine.device import resolve_device, seed_everything
    from orca_engine.model import build_model
    from orca_engine.refine import PROGRESS_REPORTS, fit_preprocessing
    from orca_engine.specs import ResolvedSpec, resolve_spec

    device = resolve_device(device_name)
    dataset = load_dataset(gunpoint_npz(workdir), seed=0)
    spec = {
        "dataset_id": "bench-speed",
        "backbone": backbone,
        "allow_random_init": backbone.startswith("tiny-"),
        "alignment": {"distance": "none"},
        "finetune": {"epochs": plan.refine_epochs, "early_stopping_patience": 0},
        "seed": 0,
    }
    recipe_spec = resolve_spec(spec, dataset.info, device=device.type)
    # The bare loop has no input augmentation and no weight average; the engine is compared
    # with them off. The default recipe is timed too, as its own row.
    extras = {"augment": False, "ema_decay": 0.0}
    values = recipe_spec.to_dict()
    rspec = ResolvedSpec.from_dict(
        {**values, **{key: value for key, value in extras.items() if key in values}}
    )
    n_train = len(dataset.x_train)
    batch_size = max(1, min(int(rspec.batch_size), n_train))
    steps_per_epoch = math.ceil(n_train / batch_size)
    if steps_per_epoch * plan.refine_epochs >= 2 * PROGRESS_REPORTS:
        raise ValueError("too many steps: the refine loop would not report every step")
    seed_everything(0)
    model = build_model(
        info=dataset.info,
        task_type=rspec.task_type,
        out_dim=dataset.info.out_dim,
        backbone=create_backbone(rspec.backbone, allow_random_init=rspec.allow_random_init),
        token_budget=rspec.token_budget,
    ).to(device)
    initial_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return RefineSetup(
        dataset=dataset,
        rspec=rspec,
        recipe_spec=recipe_spec,
        preprocessing=fit_preprocessing(dataset, rspec.task_type),
        model=model,
        initial_state=initial_state,
        device=device,
        n_train=n_train,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
    )


def _reset_model(setup: RefineSetup) -> None:
    import torch

    setup.model.load_state_dict(setup.initial_state)
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)


def _peak_gpu_mib(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return float(torch.cuda.max_memory_allocated(device)) / 2**20


def engine_run(setup: RefineSetup, plan: Plan, variant: str, rspec: Any) -> TrainRun:
    """The engine's own loop (validation after each epoch runs but is not timed)."""
    from orca_engine.refine import refine

    _reset_model(setup)
    clock = StepClock(setup.device)
    refine(
        setup.model,
        setup.dataset,
        rspec,
        device=setup.device,
        callbacks=clock,
        preprocessing=setup.preprocessing,
    )
    seconds = clock.training_seconds(setup.steps_per_epoch, plan.refine_epochs)
    samples = setup.n_train * plan.refine_epochs
    return TrainRun(variant, seconds, samples, _peak_gpu_mib(setup.device))


def bare_run(setup: RefineSetup, plan: Plan, *, epochs: int | None = None) -> TrainRun:
    """A plain PyTorch loop: same model, batches, optimizer groups, loss, clipping, autocast.

    Batches are normalised and on the device before timing starts; no learning-rate schedule,
    no progress reports, no cancellation checks, no loss read back per step.
    """
    import torch

    from orca_engine.device import autocast, seed_everything
    from orca_engine.model import set_trainable

    # The engine's batch order (private helper, used so "same batches" stays true if it changes).
    from orca_engine.refine import (
        GRAD_CLIP_NORM,
        _epoch_batches,
        build_optimizer,
        targets_tensor,
        task_loss,
    )

    rspec, device = setup.rspec, setup.device
    _reset_model(setup)
    set_trainable(setup.model, rspec.finetune_mode)
    optimizer = build_optimizer(setup.model, rspec)
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    seed_everything(int(rspec.seed))
    generator = torch.Generator().manual_seed(int(rspec.seed))
    normalise = setup.preprocessing.normaliser.transform
    y_all = targets_tensor(
        rspec.task_type, setup.dataset.y_train, setup.preprocessing.target_scaler
    )
    epochs_of_batches = [
        [
            (
                torch.from_numpy(normalise(np.asarray(setup.dataset.x_train[indices]))).to(device),
                y_all[torch.from_numpy(indices)].to(device),
            )
            for indices in _epoch_batches(setup.n_train, setup.batch_size, generator)
        ]
        for _ in range(epochs or plan.refine_epochs)
    ]
    smoothing = float(getattr(rspec, "label_smoothing", 0.0))
    setup.model.train()
    seconds = 0.0
    for batches in epochs_of_batches:
        synchronize(device)
        began = time.perf_counter()
        for inputs, targets in batches:
            with autocast(device):
                outputs = setup.model(inputs)
            loss = task_loss(rspec.task_type, outputs, targets, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP_NORM)
            optimizer.step()
        synchronize(device)
        seconds += time.perf_counter() - began
    samples = setup.n_train * len(epochs_of_batches)
    return TrainRun("bare", seconds, samples, _peak_gpu_mib(device))


@dataclass
class RefineResult:
    runs: dict[str, list[TrainRun]]
    backbone: str
    batch_size: int
    steps_per_epoch: int
    n_train: int
    token_budget: int
    recipe: str
    #: variant -> median over repeats of (variant time / bare time in the same repeat) - 1
    overhead: dict[str, float] = field(default_factory=dict)


def measure_refine(plan: Plan, backbone: str, device: str, workdir: Path) -> RefineResult:
    setup = prepare_refine(plan, backbone, device, workdir)
    variants: dict[str, Any] = {"bare": None, "engine": setup.rspec}
    recipe_values, plain_values = setup.recipe_spec.to_dict(), setup.rspec.to_dict()
    recipe_changes = {
        key: recipe_values[key]
        for key in ("augment", "ema_decay")
        if key in recipe_values and recipe_values[key] != plain_values[key]
    }
    if recipe_changes:
        variants["engine, default recipe"] = setup.recipe_spec
    runs: dict[str, list[TrainRun]] = {name: [] for name in variants}
    # One untimed epoch first: lazy allocations and kernel choices happen before any timed run.
    bare_run(setup, plan, epochs=1)
    for repeat in range(plan.refine_repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            run = (
                bare_run(setup, plan)
                if name == "bare"
                else engine_run(setup, plan, name, variants[name])
            )
            runs[name].append(run)
            logger.info(
                "refine repeat %d/%d %-24s %6.1f samples/s",
                repeat + 1,
                plan.refine_repeats,
                name,
                run.samples_per_second,
            )
    overhead = {
        name: statistics.median(
            mine.seconds / bare.seconds - 1.0
            for mine, bare in zip(runs[name], runs["bare"], strict=True)
        )
        for name in variants
        if name != "bare"
    }
    recipe = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe_changes.items()
    )
    return RefineResult(
        runs=runs,
        backbone=backbone,
        batch_size=setup.batch_size,
        steps_per_epoch=setup.steps_per_epoch,
        n_train=setup.n_train,
        token_budget=int(setup.rspec.token_budget),
        recipe=recipe,
        overhead=overhead,
    )


def refine_table(result: RefineResult) -> str:
    lines = [
        "| loop | samples/s (median) | runs (samples/s) | time vs bare (median of pairs) "
        "| peak GPU MiB |",
        "|---|---:|---|---:|---:|",
    ]
    for name, runs in result.runs.items():
        rates = [run.samples_per_second for run in runs]
        vs_bare = "-" if name == "bare" else f"{100 * result.overhead[name]:+.1f}%"
        peaks = [run.peak_gpu_mib for run in runs if run.peak_gpu_mib is not None]
        peak = f"{max(peaks):.0f}" if peaks else "-"
        lines.append(
            f"| {name} | {statistics.median(rates):.1f} | "
            f"{', '.join(f'{rate:.1f}' for rate in rates)} | {vs_bare} | {peak} |"
        )
    return "\n".join(lines)


# --- the service (for 3 and 4) ---------------------------------------------------------------


@dataclass
class Service:
    """An embedded ORCA service in a temporary directory: uvicorn + one Celery worker."""

    root: Path
    url: str
    key: str
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    http: httpx.Client

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_env(root: Path, device: str, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCA_")}
    env.update(
        {
            "ORCA_DATA_DIR": str(root / "var"),
            "ORCA_PREDICT_RATE_PER_MINUTE": "100000000",
            "ORCA_MAX_CONCURRENT_JOBS_PER_TENANT": "100",
            "ORCA_PREDICT_DEVICE": "cuda" if device.startswith("cuda") else "cpu",
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a grace period, then SIGKILL for the whole process group (pool children)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _wait_until(condition: Any, *, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def embedded_service(device: str, threads: int) -> Iterator[Service]:
    """Migrated SQLite database, an API key, a ready worker and a live API; all gone after."""
    from api.db import dispose_engines, run_migrations, session_scope
    from api.security import create_key
    from cli.main import celery_worker_command

    root = Path(tempfile.mkdtemp(prefix="orca-speed-"))
    env = _service_env(root, device, threads)
    database_url = f"sqlite:///{(root / 'var' / 'orca.db').resolve()}"
    (root / "var").mkdir()
    run_migrations(database_url)
    with session_scope(database_url) as session:
        key = create_key(session, "bench-speed")
    dispose_engines()

    port = _free_port()
    worker = _spawn(
        celery_worker_command(
            queues=["cpu", "gpu"], concurrency=1, node_name=f"speed-{uuid.uuid4().hex[:6]}@%h"
        ),
        env,
        root / "worker.log",
    )
    api = _spawn(
        [
            *(sys.executable, "-m", "uvicorn", "api.main:app"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ],
        env,
        root / "api.log",
    )
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    service = Service(root=root, url=url, key=key, api=api, worker=worker, http=http)
    try:

        def api_live() -> bool:
            if api.poll() is not None:
                raise RuntimeError(f"the API exited:\n{service.log('api')}")
            try:
                return httpx.get(f"{url}/livez", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        def worker_ready() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{service.log('worker')}")
            return " ready." in service.log("worker")

        _wait_until(api_live, timeout=120, what="the API")
        _wait_until(worker_ready, timeout=120, what="the Celery worker")
        yield service
    finally:
        http.close()
        _stop(api)
        _stop(worker)
        shutil.rmtree(root, ignore_errors=True)


def job_spec(dataset_id: str, backbone: str, device: str, epochs: int) -> dict[str, Any]:
    """A real job without alignment (its cost is measured in part 1)."""
    return {
        "dataset_id": dataset_id,
        "name": "bench-speed",
        "backbone": backbone,
        "allow_random_init": backbone.startswith("tiny-"),
        "queue": "gpu" if device.startswith("cuda") else "cpu",
        "alignment": {"distance": "none"},
        "finetune": {"epochs": epochs, "early_stopping_patience": 0},
        "seed": 0,
    }


def _post(service: Service, path: str, **kwargs: Any) -> dict[str, Any]:
    response = service.http.post(path, **kwargs)
    if response.status_code not in (200, 201, 202):
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text}")
    return dict(response.json())


def _job(service: Service, job_id: str) -> dict[str, Any]:
    response = service.http.get(f"/v1/jobs/{job_id}")
    response.raise_for_status()
    return dict(response.json())


TERMINAL = ("succeeded", "failed", "cancelled")


def wait_for_job(service: Service, job_id: str, *, timeout: float) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = _job(service, job_id)
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = _wait_until(finished, timeout=timeout, what=f"job {job_id}")
    return job


def train_model(service: Service, dataset_id: str, backbone: str, device: str) -> str:
    """A real one-epoch job on the worker; returns its model id (the worker is warm after)."""
    job = _post(service, "/v1/jobs", json=job_spec(dataset_id, backbone, device, epochs=1))
    done = wait_for_job(service, job["id"], timeout=900)
    if done["status"] != "succeeded":
        raise RuntimeError(f"the training job ended {done['status']}: {done.get('error')}")
    return str(done["model_id"])


# --- 3. prediction ---------------------------------------------------------------------------


@dataclass
class PredictResult:
    sequential: Any
    concurrent: Any
    mean_batch: float
    bare: dict[int, dict[str, float]]
    #: the mean batch rounded: what the server's forward passes actually saw
    formed_batch: int
    sample_shape: tuple[int, ...]

    def ratio_at(self, batch: int) -> float:
        """HTTP samples/s under concurrency / bare samples/s at ``batch``."""
        return float(self.concurrent.throughput / self.bare[batch]["samples_per_second"])


def _batch_histogram(service: Service) -> tuple[float, float]:
    """(sum, count) of the API's ``orca_predict_batch_size`` histogram."""
    response = httpx.get(f"{service.url}/metrics", timeout=10)
    response.raise_for_status()
    text = response.text

    def value(name: str) -> float:
        match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, flags=re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return value("orca_predict_batch_size_sum"), value("orca_predict_batch_size_count")


def download_bundle(service: Service, model_id: str, directory: Path) -> Path:
    """The model's checkpoint bundle, exactly as a user downloads it."""
    response = service.http.get(f"/v1/models/{model_id}/download")
    response.raise_for_status()
    target = directory / "bundle"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(target)
    configs = list(target.rglob("config.json"))
    if not configs:
        raise RuntimeError("the downloaded bundle has no config.json")
    return configs[0].parent


def bare_forward(
    bundle: Path, device: str, sample: np.ndarray, batch_sizes: Sequence[int], seconds: float
) -> dict[int, dict[str, float]]:
    """``Predictor.predict`` in this process: samples/s and latency per call at each batch size."""
    from orca_engine.predict import load_model

    predictor = load_model(bundle, device=device)
    results: dict[int, dict[str, float]] = {}
    for size in batch_sizes:
        batch = np.repeat(sample[np.newaxis], size, axis=0)
        for _ in range(2):
            predictor.predict(batch)  # warm-up
        latencies: list[float] = []
        began = time.perf_counter()
        while time.perf_counter() - began < seconds or len(latencies) < 5:
            started = time.perf_counter()
            predictor.predict(batch)
            latencies.append(time.perf_counter() - started)
        results[size] = {
            "samples_per_second": size * len(latencies) / sum(latencies),
            "p50_ms": 1000 * percentile(latencies, 50),
            "p99_ms": 1000 * percentile(latencies, 99),
            "calls": float(len(latencies)),
        }
        logger.info(
            "bare predict batch %3d: %7.1f samples/s, p50 %.1f ms",
            size,
            results[size]["samples_per_second"],
            results[size]["p50_ms"],
        )
    return results


def measure_predict(
    service: Service, model_id: str, plan: Plan, device: str, sample: np.ndarray, workdir: Path
) -> PredictResult:
    from bench.load_predict import predict_load

    shape = tuple(int(d) for d in sample.shape)
    server_pid = service.api.pid
    logger.info("HTTP predict: 1 client for %.0f s", plan.predict_sequential_seconds)
    sequential = asyncio.run(
        predict_load(
            service.url,
            service.key,
            model_id,
            clients=1,
            seconds=plan.predict_sequential_seconds,
            server_pid=server_pid,
            sample_shape=shape,
        )
    )
    before = _batch_histogram(service)
    logger.info(
        "HTTP predict: %d clients for %.0f s", CONCURRENT_CLIENTS, plan.predict_concurrent_seconds
    )
    concurrent = asyncio.run(
        predict_load(
            service.url,
            service.key,
            model_id,
            clients=CONCURRENT_CLIENTS,
            seconds=plan.predict_concurrent_seconds,
            server_pid=server_pid,
            sample_shape=shape,
        )
    )
    after = _batch_histogram(service)
    # One warm-up request of predict_load falls in the window too; it is one small batch.
    forward_passes = after[1] - before[1]
    if forward_passes <= 0:
        logger.warning("/metrics has no orca_predict_batch_size samples; batch size unknown")
        mean_batch, formed = math.nan, 1
    else:
        mean_batch = (after[0] - before[0]) / forward_passes
        formed = max(1, round(mean_batch))
    # Bare at batch 1, at what the batcher formed, and at what the clients allow it to form.
    sizes = sorted({*plan.bare_batch_sizes, 1, formed, CONCURRENT_CLIENTS})
    bundle = download_bundle(service, model_id, workdir)
    bare = bare_forward(bundle, device, sample, sizes, plan.bare_seconds)
    return PredictResult(
        sequential=sequential,
        concurrent=concurrent,
        mean_batch=mean_batch,
        bare=bare,
        formed_batch=formed,
        sample_shape=shape,
    )


def predict_reading(result: PredictResult) -> list[str]:
    """Observations that follow from this run's numbers (empty when there is nothing to flag)."""
    notes = []
    if result.mean_batch < CONCURRENT_CLIENTS / 4:
        notes.append(
            f"With {CONCURRENT_CLIENTS} requests in flight the micro-batcher formed batches of "
            f"{result.mean_batch:.1f} samples on average, so the server ran many small forward "
            "passes instead of few large ones (bare batch "
            f"{CONCURRENT_CLIENTS}: {result.bare[CONCURRENT_CLIENTS]['samples_per_second']:.1f} "
            f"samples/s vs batch 1: {result.bare[1]['samples_per_second']:.1f}). In "
            "`api/predict_service.py` a batch is closed `predict_batch_window_ms` after its "
            "first request whether or not the single forward thread is free, and closed batches "
            "queue on that thread."
        )
    if result.concurrent.errors or result.sequential.errors:
        notes.append(
            f"Errors: {result.sequential.errors} sequential, {result.concurrent.errors} "
            f"concurrent ({result.concurrent.error_kinds})."
        )
    return [line for note in notes for line in ("", note)]


def predict_table(result: PredictResult) -> str:
    seq, conc = result.sequential, result.concurrent
    lines = [
        "| path | clients | batch per forward pass | samples/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| HTTP | 1 | 1 | {seq.throughput:.1f} | {seq.p50_ms:.1f} | {seq.p99_ms:.1f} | "
        f"{seq.errors} |",
        f"| HTTP | {conc.clients} | {result.mean_batch:.1f} (mean, micro-batcher) | "
        f"{conc.throughput:.1f} | {conc.p50_ms:.1f} | {conc.p99_ms:.1f} | {conc.errors} |",
    ]
    for size, numbers in result.bare.items():
        lines.append(
            f"| bare `Predictor.predict` | - | {size} | {numbers['samples_per_second']:.1f} | "
            f"{numbers['p50_ms']:.1f} | {numbers['p99_ms']:.1f} | - |"
        )
    return "\n".join(lines)


# --- 4. job overhead -------------------------------------------------------------------------


def _timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def measure_job_overhead(
    service: Service, dataset_id: str, backbone: str, device: str, repeats: int
) -> list[dict[str, float]]:
    """Per probe: seconds from POST to claim, to the refine stage event, to the first step."""
    probes: list[dict[str, float]] = []
    for probe in range(repeats):
        time.sleep(IDLE_BEFORE_JOB_SECONDS)
        posted = time.time()
        job = _post(service, "/v1/jobs", json=job_spec(dataset_id, backbone, device, epochs=5))
        first_step: float | None = None
        while first_step is None:
            state = _job(service, job["id"])
            if state["stage"] in ("refine", "evaluate", "export") or state["status"] in TERMINAL:
                first_step = time.time()
                break
            if time.time() - posted > 300:
                raise RuntimeError(f"job {job['id']} never started: {state}")
            time.sleep(JOB_POLL_SECONDS)
        if state["status"] not in TERMINAL:
            _post(service, f"/v1/jobs/{job['id']}/cancel")
        done = wait_for_job(service, job["id"], timeout=300)
        if done["status"] == "failed":
            raise RuntimeError(f"probe job failed: {done.get('error')}")
        events = service.http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 100})
        events.raise_for_status()
        stage_at = {
            (event.get("data") or {}).get("stage"): _timestamp(event["created_at"])
            for event in reversed(events.json()["data"])
            if event["kind"] == "stage"
        }
        created = _timestamp(done["created_at"])
        record = {
            "post_to_first_step": first_step - posted,
            "created_to_claimed": _timestamp(done["started_at"]) - created,
            "created_to_prepare": stage_at.get("prepare", math.nan) - created,
            "created_to_refine_event": stage_at.get("refine", math.nan) - created,
        }
        probes.append(record)
        logger.info(
            "job overhead probe %d/%d: first step after %.2f s (claimed %.2f s, refine ready "
            "%.2f s)",
            probe + 1,
            repeats,
            record["post_to_first_step"],
            record["created_to_claimed"],
            record["created_to_refine_event"],
        )
    return probes


def first_step_note(refine: RefineResult | None) -> str:
    """How much of "first step seen" is the step itself (from the refine measurement)."""
    if refine is None:
        return ""
    rate = statistics.median(run.samples_per_second for run in refine.runs["engine"])
    return (
        f" The last span includes the first step's own compute: about "
        f"{refine.batch_size / rate:.2f} s for a batch of {refine.batch_size} at the engine's "
        "measured rate above."
    )


def job_table(probes: list[dict[str, float]]) -> str:
    names = {
        "created_to_claimed": "POST -> worker claims the job (queue + broker)",
        "created_to_prepare": "POST -> prepare starts",
        "created_to_refine_event": "POST -> model built, refine starts",
        "post_to_first_step": "POST -> first optimizer step seen over HTTP",
    }
    lines = ["| span | median s | runs (s) |", "|---|---:|---|"]
    for key, label in names.items():
        values = [probe[key] for probe in probes]
        lines.append(
            f"| {label} | {statistics.median(values):.2f} | "
            f"{', '.join(f'{v:.2f}' for v in values)} |"
        )
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def summary_table(results: dict[str, Any], device: str) -> str:
    lines = [
        f"| measure (device: {device}) | ORCA | baseline | ratio | target | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    align = results.get("align")
    if align:
        compared = [row for row in align if "reference" in row]
        if compared:
            row = compared[-1]
            ours, ref = row["otdd"]["seconds"], row["reference"]["seconds"]
            lines.append(
                f"| alignment step, {row['rows']} target rows (s/step) | {ours:.3f} | "
                f"{ref:.2f} (recompute everything) | {ref / ours:.1f}x faster | - | |"
            )
    refine: RefineResult | None = results.get("refine")
    if refine:
        bare = statistics.median(r.samples_per_second for r in refine.runs["bare"])
        engine = statistics.median(r.samples_per_second for r in refine.runs["engine"])
        overhead = refine.overhead["engine"]
        lines.append(
            f"| refine throughput (samples/s) | {engine:.1f} | {bare:.1f} (bare loop) | "
            f"{100 * overhead:+.1f}% time | <= +{100 * REFINE_OVERHEAD_TARGET:.0f}% | "
            f"{verdict(overhead <= REFINE_OVERHEAD_TARGET)} |"
        )
        if "engine, default recipe" in refine.overhead:
            recipe = statistics.median(
                r.samples_per_second for r in refine.runs["engine, default recipe"]
            )
            lines.append(
                f"| refine, default recipe ({refine.recipe}) | {recipe:.1f} | {bare:.1f} | "
                f"{100 * refine.overhead['engine, default recipe']:+.1f}% time | - | |"
            )
    predict: PredictResult | None = results.get("predict")
    if predict:
        clients = predict.concurrent.clients
        full = predict.ratio_at(CONCURRENT_CLIENTS)
        lines.append(
            f"| predict, {clients} concurrent clients (samples/s) | "
            f"{predict.concurrent.throughput:.1f} | "
            f"{predict.bare[CONCURRENT_CLIENTS]['samples_per_second']:.1f} (bare, batch "
            f"{CONCURRENT_CLIENTS}: all requests in flight) | {100 * full:.0f}% | "
            f">= {100 * HTTP_RATIO_TARGET:.0f}% | {verdict(full >= HTTP_RATIO_TARGET)} |"
        )
        lines.append(
            f"| same, vs the batch the micro-batcher formed (mean {predict.mean_batch:.1f}) | "
            f"{predict.concurrent.throughput:.1f} | "
            f"{predict.bare[predict.formed_batch]['samples_per_second']:.1f} (bare, batch "
            f"{predict.formed_batch}) | {100 * predict.ratio_at(predict.formed_batch):.0f}% | "
            "- | |"
        )
        bare_one = predict.bare[1]
        lines.append(
            f"| predict, 1 client, p50 / p99 ms | {predict.sequential.p50_ms:.1f} / "
            f"{predict.sequential.p99_ms:.1f} | {bare_one['p50_ms']:.1f} / "
            f"{bare_one['p99_ms']:.1f} (bare, batch 1) | "
            f"{100 * predict.sequential.throughput / bare_one['samples_per_second']:.0f}% "
            "throughput | - | |"
        )
    probes = results.get("job")
    if probes:
        median = statistics.median(p["post_to_first_step"] for p in probes)
        lines.append(
            f"| job overhead: POST -> first step (s, median of {len(probes)}) | {median:.2f} | - "
            f"| - | < {JOB_OVERHEAD_TARGET_SECONDS:.0f} s | "
            f"{verdict(median < JOB_OVERHEAD_TARGET_SECONDS)} |"
        )
    return "\n".join(lines)


def render(results: dict[str, Any], args: argparse.Namespace, plan: Plan, command: str) -> str:
    produced = machine_line(command, device=args.device, notes=f"torch threads: {args.threads}")
    parts = [
        "Each ratio below is measured side by side in one run of the command under the table "
        "(nothing is carried over from other runs)."
        + (" **Quick run**: fewer sizes, shorter runs, fewer repeats." if args.quick else ""),
        "",
        summary_table(results, args.device),
        "",
        produced,
    ]
    if "align" in results:
        parts += [
            "",
            "### Alignment step vs recompute-everything",
            "",
            f"One embedder-learning step (384x384 linear embedder, OTDD to 5,000 source rows, "
            f"backward, Adam) per target size; ours is the median of {plan.align_repeats} "
            "steady-state steps after a warm-up, the baseline (`otdd_reference`) one cold step; "
            "each in a fresh process. The full table with the other distances and memory is "
            'the "Alignment step speed" section (`python -m bench.align_speed`).',
            "",
            alignment_table(results["align"]),
            "",
            produced,
        ]
    refine: RefineResult | None = results.get("refine")
    if refine:
        parts += [
            "",
            "### Refine loop vs a bare PyTorch loop",
            "",
            f"Backbone `{refine.backbone}` on aeon GunPoint ({refine.n_train} training series "
            f"after the validation hold-out, batch {refine.batch_size}, {refine.steps_per_epoch} "
            f"steps per epoch, {refine.token_budget} tokens), full fine-tuning, AdamW groups "
            "from `build_optimizer`, gradient clip 1.0, the engine's autocast (bf16 on CUDA, "
            "none on CPU). One untimed bare epoch warms up before all runs; each run then "
            f"trains {plan.refine_epochs} epochs and the training phase of each is timed (the "
            "engine's validation pass after each epoch is excluded via its step timestamps; "
            "the bare loop has none). "
            f'{plan.refine_repeats} repeats, order alternating; "time vs bare" is the median of '
            "per-repeat ratios. The bare loop's batches are prepared (normalised, on the device) "
            "before timing and it has no schedule, no progress reports, no cancel checks and no "
            "per-step loss read-back, so the difference is everything the engine's loop does "
            "per step beyond the arithmetic. `engine` runs with input augmentation and the "
            "weight average off, as the bare loop does; `engine, default recipe` is what a job "
            "runs by default.",
            "",
            refine_table(refine),
            "",
            produced,
        ]
    predict: PredictResult | None = results.get("predict")
    if predict:
        parts += [
            "",
            "### Prediction over HTTP vs the bare forward pass",
            "",
            "One uvicorn process (embedded mode, SQLite) serving the model trained by a real "
            f"one-epoch job on the worker (same backbone, GunPoint); every request carries one "
            f"sample of shape {list(predict.sample_shape)} as JSON. Sequential: 1 client for "
            f"{plan.predict_sequential_seconds:.0f} s; concurrent: {CONCURRENT_CLIENTS} clients "
            f"for {plan.predict_concurrent_seconds:.0f} s (httpx, in the benchmark process on "
            "the same machine, so the clients compete with the server for the CPU). Batch per "
            "forward pass under concurrency: the API's `orca_predict_batch_size` histogram. "
            "Bare: `orca_engine.predict.load_model` on the downloaded bundle, `predict()` on a "
            f"ready batch, {plan.bare_seconds:.0f} s per batch size, same torch thread count as "
            "the server. The target's ratio: HTTP samples/s with "
            f"{CONCURRENT_CLIENTS} clients / bare samples/s at batch {CONCURRENT_CLIENTS}, the "
            "batch the micro-batcher could form with every request in flight; the summary also "
            "gives the ratio at the batch it did form.",
            "",
            predict_table(predict),
            "",
            produced,
            *predict_reading(predict),
        ]
    probes = results.get("job")
    if probes:
        parts += [
            "",
            "### Job overhead on an idle, warm worker",
            "",
            f"{len(probes)} jobs, one at a time, each posted after the worker had been idle "
            f"{IDLE_BEFORE_JOB_SECONDS:.1f} s (it has already run the training job above, so "
            "torch and the backbone's code are imported). Each job is cancelled once its first "
            'step is seen. "First step": the job\'s `stage` turns `refine`, which the worker '
            "writes with the first optimizer step's progress report; polled every "
            f"{1000 * JOB_POLL_SECONDS:.0f} ms. The other spans come from the job's own "
            "timestamps (created, claimed = `started_at`, stage events). The embedded broker is "
            "kombu's SQLite transport, which polls for new messages once a second."
            + first_step_note(results.get("refine")),
            "",
            job_table(probes),
            "",
            produced,
        ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter, fewer repeats")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads here and in the service (1: repeatable on a shared CPU)",
    )
    parser.add_argument("--backbone", default="minilm-l6", help="registry backbone (minilm-l6)")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error("--device is cpu or cuda")
    logging.basicConfig(level=logging.INFO, format="[speed] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("orca_engine").setLevel(logging.WARNING)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.error("--device %s asked for, but torch sees no CUDA device", args.device)
        return 2
    set_threads(args.threads)
    plan = QUICK if args.quick else FULL
    results: dict[str, Any] = {}
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="orca-speed-bench-"))
    try:
        if "align" in parts:
            logger.info("1/4 alignment step vs recompute-everything, sizes %s", plan.align_sizes)
            results["align"] = measure_alignment(plan, args.device, args.threads)
        if "refine" in parts:
            logger.info("2/4 refine loop vs bare loop (%s)", args.backbone)
            results["refine"] = measure_refine(plan, args.backbone, args.device, workdir)
        if "predict" in parts or "job" in parts:
            logger.info("starting the embedded service")
            with embedded_service(args.device, args.threads) as service:
                npz = gunpoint_npz(workdir)
                with npz.open("rb") as handle:
                    dataset = _post(
                        service,
                        "/v1/datasets",
                        files={"file": (npz.name, handle, "application/octet-stream")},
                        data={"name": "gunpoint"},
                    )
                logger.info("training the served model with a real job (1 epoch)")
                model_id = train_model(service, dataset["id"], args.backbone, args.device)
                if "predict" in parts:
                    logger.info("3/4 prediction over HTTP vs bare forward pass")
                    with np.load(npz) as arrays:
                        sample = np.asarray(arrays["x_test"][0], dtype=np.float32)
                    results["predict"] = measure_predict(
                        service, model_id, plan, args.device, sample, workdir
                    )
                if "job" in parts:
                    logger.info("4/4 job overhead, %d probes", plan.job_repeats)
                    results["job"] = measure_job_overhead(
                        service, dataset["id"], args.backbone, args.device, plan.job_repeats
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info("done in %.0f s", time.monotonic() - began)
    command = bench_command("bench.speed", argv)
    body = render(results, args, plan, command)
    print(body)
    if not args.no_write:
        replace_section(BENCHMARKS_MD, TITLE, body)
        logger.info("wrote the %r section of %s", TITLE, BENCHMARKS_MD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
