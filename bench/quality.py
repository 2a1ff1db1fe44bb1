"""Quality: ORCA against its ablations, a from-scratch model and classical peers on real data.

Every neural method uses the same backbone architecture (MiniLM-L6), the same splits and the same
fine-tuning budget: the epochs the engine's ``auto`` recipe resolves for ``orca`` on the dataset,
passed explicitly to every other neural method (and to the small CNN peer). Methods:

========== ===================================================================================
orca        the engine's default recipe, everything ``auto``: OTDD alignment that hands on only
            an embedder keeping the classes at least as far apart as they began
            (``keep_separation``), then LayerNorm-only fine-tuning below 2,000 training rows and
            full fine-tuning from 2,000 on
orca-unguarded  the default with ``alignment.keep_separation: false`` (the last embedder of
            alignment handed on whatever it did to the classes: the default until session 25)
orca-output  the default with ``alignment.scope: output`` (alignment moves only the embedder's
            positions and output LayerNorm)
orca-full   OTDD alignment without the separation guard + full fine-tuning at any size (the
            paper's ORCA)
orca-mmd    orca-full with ``alignment.distance: mmd``
orca-gaussian  orca-full with ``alignment.distance: otdd_gaussian``
orca-noalign  the default recipe with ``alignment.distance: none`` and nothing else changed (the
            ablation that says whether alignment earns its place in the default)
naive-ft    no alignment (``distance: none``), full fine-tuning
fpt         no alignment, LayerNorm-only fine-tuning (Lu et al.'s frozen pretrained transformer)
scratch     no alignment, full fine-tuning of ``minilm-l6-scratch`` (MiniLM's architecture with
            random weights)
peers       see :mod:`bench.peers` (MiniRocket, 1-NN, HistGradientBoosting, linear, small CNN)
========== ===================================================================================

Each neural run goes through :func:`orca_engine.pipeline.run_job` in its own process (spawned,
``torch.set_num_threads``), peers run in this process. One JSON per (dataset, method, seed) lands
in ``bench/.cache/results/``, keyed by a hash of the job spec, the spec the engine resolves from
it and the dataset file: a rerun skips what is cached (resume), and a change to the ``auto``
recipe that changes resolved values reruns by itself (``--fresh`` reruns everything, e.g. after
a code-only change to the training loop).

Run ``python -m bench.quality [--quick] [--datasets ...] [--methods ...] [--seeds 0 1 2]``; it
prints the tables and writes the section "Quality" of docs/BENCHMARKS.md plus two plots in
docs/img/. :func:`evaluate_recipe` runs one recipe variant (spec overrides) over datasets and
seeds through the same cache, for experiments on the default recipe.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import datasets as bench_datasets
from bench import peers as bench_peers
from bench.sections import bench_command, machine_line, replace_section

logger = logging.getLogger("bench.quality")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
DOC = ROOT / "docs" / "BENCHMARKS.md"
IMG_DIR = ROOT / "docs" / "img"
SECTION_TITLE = "Quality"
BACKBONE = "minilm-l6"
SCRATCH_BACKBONE = "minilm-l6-scratch"
RESULT_VERSION = 1
#: resolved fields added after results were cached: at their default (what jobs did before the
#: field existed) they stay out of a result's key, so those results are still found
KEYED_WITHOUT_DEFAULT = ("align_scope", "align_keep_separation")
#: hidden first argument that makes this module run one neural job (the worker side)
CHILD_FLAG = "--run-one-job"

#: JobSpec overrides per neural method (deep-merged into the base spec)
NN_METHODS: dict[str, dict[str, Any]] = {
    "orca": {},
    "orca-unguarded": {"alignment": {"keep_separation": False}},
    "orca-output": {"alignment": {"scope": "output"}},
    "orca-full": {"alignment": {"keep_separation": False}, "finetune": {"mode": "full"}},
    "orca-mmd": {
        "alignment": {"distance": "mmd", "keep_separation": False},
        "finetune": {"mode": "full"},
    },
    "orca-gaussian": {
        "alignment": {"distance": "otdd_gaussian", "keep_separation": False},
        "finetune": {"mode": "full"},
    },
    "orca-noalign": {"alignment": {"distance": "none"}},
    "naive-ft": {"alignment": {"distance": "none"}, "finetune": {"mode": "full"}},
    "fpt": {"alignment": {"distance": "none"}, "finetune": {"mode": "layernorm"}},
    "scratch": {
        "backbone": SCRATCH_BACKBONE,
        "allow_random_init": True,
        "alignment": {"distance": "none"},
        "finetune": {"mode": "full"},
    },
}
#: the paper's ablation: aligned runs compared with naive-ft, all fine-tuning every weight
ALIGNED_METHODS = ("orca-full", "orca-mmd", "orca-gaussian")
#: every method that learns an embedder against a proxy (the distance table)
DISTANCE_METHODS = ("orca", *ALIGNED_METHODS)
#: the performance profile's line for "the strong classical peer of this kind of data"
PEER_LINE = "classical peer"
#: like PEER_LINE, the simple baseline of each dataset's kind (:data:`bench.peers.SIMPLE_PEER`)
SIMPLE_LINE = "simple baseline"
ALL_METHODS = (*NN_METHODS, *bench_peers.PEER_METHODS)
DEFAULT_SEEDS = (0, 1, 2)

QUICK_DATASETS = ("GunPoint", "ItalyPowerDemand", "breast_cancer", "digits", "GunPoint-10shot")
QUICK_METHODS = ("orca", "naive-ft", *bench_peers.PEER_METHODS)
QUICK_SEEDS = (0,)
#: --quick runs the neural methods on these only. On the shared 2-core machine one run of the
#: engine's CPU recipe took 4-10 min on full GunPoint (615 s), ItalyPowerDemand (238 s orca,
#: 387 s naive-ft) and longer on breast_cancer/digits; data-limited GunPoint (16 training rows,
#: so the 100-epoch cap means ~200 steps) took 190-320 s (orca) and 135-300 s (naive-ft).
QUICK_NN_DATASETS = ("GunPoint-10shot",)


# --- specs, budgets, cache keys ------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Task:
    """One (dataset, method, seed) run, with everything that decides its result."""

    dataset: str
    method: str
    seed: int
    #: neural runs: the JobSpec; peers: None
    spec: dict[str, Any] | None
    #: what the result is keyed by (spec, resolved spec, data file, peer version)
    identity: dict[str, Any]
    #: the fine-tuning epochs every method of this dataset gets
    budget_epochs: int

    @property
    def key(self) -> str:
        return _digest(self.identity)


class Planner:
    """Builds tasks: dataset files, resolved budgets and cache keys, computed once per dataset."""

    def __init__(self, cache_dir: Path, device: str) -> None:
        self.cache_dir = Path(cache_dir)
        self.device = device
        self._resolved: dict[tuple[str, str], dict[str, Any]] = {}

    def dataset_file(self, name: str) -> Path:
        return bench_datasets.dataset_path(name, self.cache_dir)

    def base_spec(self, dataset: str, seed: int) -> dict[str, Any]:
        meta = bench_datasets.DATASETS[dataset]
        return {
            "dataset_id": dataset,
            "backbone": BACKBONE,
            "task": {"type": meta.task_type},
            "seed": seed,
        }

    def resolve(self, dataset: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The engine's resolved spec for ``spec`` on this dataset (no training; cached)."""
        from orca_engine.data import load_dataset
        from orca_engine.specs import ResolvedSpec, resolve_spec

        memo = (dataset, json.dumps(spec, sort_keys=True))
        if memo not in self._resolved:
            path = self.dataset_file(dataset)
            loaded = load_dataset(
                path, task_type=spec.get("task", {}).get("type"), seed=int(spec.get("seed", 0))
            )
            device = "cuda" if self.device.startswith("cuda") else "cpu"
            resolved = resolve_spec(dict(spec), loaded.info, device=device).to_dict()
            resolved.pop("reasons", None)
            for name in KEYED_WITHOUT_DEFAULT:
                if resolved.get(name) == ResolvedSpec.model_fields[name].default:
                    # the field's default is what every job did before it existed: results
                    # stored under the key without it (the ablations without alignment) stay valid
                    resolved.pop(name)
            self._resolved[memo] = resolved
        return self._resolved[memo]

    def budget_epochs(self, dataset: str) -> int:
        """Fine-tuning epochs ``auto`` resolves for ``orca`` on this dataset (seed-independent)."""
        return int(self.resolve(dataset, self.base_spec(dataset, 0))["finetune_epochs"])

    def nn_task(
        self,
        dataset: str,
        method: str,
        seed: int,
        overrides: Mapping[str, Any],
        resolved_overrides: Mapping[str, Any] | None = None,
        *,
        equal_budget: bool = True,
    ) -> Task:
        epochs = self.budget_epochs(dataset)
        spec = deep_merge(self.base_spec(dataset, seed), overrides)
        if equal_budget and "epochs" not in spec.get("finetune", {}) and method != "orca":
            spec = deep_merge(spec, {"finetune": {"epochs": epochs}})
        identity = {
            "kind": "nn",
            "version": RESULT_VERSION,
            "spec": spec,
            "resolved": self.resolve(dataset, spec),
            "resolved_overrides": dict(resolved_overrides or {}),
            "data": bench_datasets.file_digest(self.dataset_file(dataset)),
            "device": self.device,
        }
        return Task(dataset, method, seed, spec, identity, epochs)

    def peer_task(self, dataset: str, method: str, seed: int) -> Task:
        epochs = self.budget_epochs(dataset) if method == "cnn" else 0
        identity = {
            "kind": "peer",
            "version": RESULT_VERSION,
            "peer_version": bench_peers.PEER_VERSION,
            "method": method,
            "seed": seed,
            "epochs": epochs,
            "data": bench_datasets.file_digest(self.dataset_file(dataset)),
        }
        return Task(dataset, method, seed, None, identity, epochs)

    def task(self, dataset: str, method: str, seed: int) -> Task | None:
        """The task for a named method, or None when the method does not apply to the dataset."""
        if method in NN_METHODS:
            return self.nn_task(dataset, method, seed, NN_METHODS[method])
        if bench_peers.applies(method, bench_datasets.DATASETS[dataset]):
            return self.peer_task(dataset, method, seed)
        return None


def result_path(cache_dir: Path, task: Task) -> Path:
    return (
        Path(cache_dir)
        / "results"
        / task.dataset
        / task.method
        / f"seed{task.seed}-{task.key}.json"
    )


def load_result(cache_dir: Path, task: Task) -> dict[str, Any] | None:
    path = result_path(cache_dir, task)
    if not path.exists():
        return None
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return loaded


def _store_result(cache_dir: Path, task: Task, result: dict[str, Any]) -> None:
    path = result_path(cache_dir, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(result, indent=1, sort_keys=True))
    partial.replace(path)


# --- running ---------------------------------------------------------------------------------


def _bundle_marks(bundle_dir: Path, dataset_path: str, accuracy: float) -> str | None:
    """The finished bundle's per-row marks on test, or None where they would not be trusted.

    The bundle predicts the test rows afresh (the path a client's predict call takes); the
    marks are kept only when they reproduce the job's own test accuracy. A failure here is
    logged and costs only the marks, never the finished run.
    """
    from orca_engine.predict import load_model

    try:
        with np.load(dataset_path, allow_pickle=False) as data:
            x_test, y_test = data["x_test"], data["y_test"]
        predictor = load_model(bundle_dir)
        marks = bench_peers.correct_marks(y_test, predictor.predict(x_test).predictions)
    except Exception:
        logger.exception("per-row marks not kept: the bundle could not predict the test rows")
        return None
    if abs(marks.count("1") / len(marks) - accuracy) > 1e-9:
        logger.warning(
            "bundle's test accuracy %.6f differs from the job's %.6f: per-row marks not kept",
            marks.count("1") / len(marks),
            accuracy,
        )
        return None
    return marks


def _nn_child(request: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: one ``run_job`` on the CPU threads given; returns what we record."""
    import torch

    torch.set_num_threads(int(request["threads"]))
    from orca_engine.pipeline import run_job

    scratch = Path(tempfile.mkdtemp(prefix="orca-quality-"))
    started = time.monotonic()
    try:
        result = run_job(
            request["spec"],
            request["dataset_path"],
            scratch / "work",
            bundle_dir=scratch / "bundle",
            device=request["device"],
            proxy_cache_dir=request["proxy_cache_dir"],
            resolved_overrides=request["resolved_overrides"] or None,
        )
        accuracy = result.metrics["test"].get("accuracy")
        marks = (
            None
            if accuracy is None or result.resolved_spec.get("task_type") != "classification"
            else _bundle_marks(scratch / "bundle", request["dataset_path"], float(accuracy))
        )
    finally:
        wall = time.monotonic() - started
        shutil.rmtree(scratch, ignore_errors=True)
    resolved = result.resolved_spec
    history = result.curves.get("refine") or []
    return {
        "test": result.metrics["test"],
        "val": result.metrics["val"],
        "alignment": result.metrics["alignment"],
        "alignment_curve": result.curves.get("alignment") or [],
        "wall_s": wall,
        "finetune_epochs": resolved.get("finetune_epochs"),
        "refine_epochs_run": len(history),
        "best_epoch": result.curves.get("best_epoch"),
        "align_epochs_run": max(0, len(result.curves.get("alignment") or []) - 1),
        "resolved_spec": {k: v for k, v in resolved.items() if k != "reasons"},
        **({"test_correct": marks} if marks else {}),
    }


def _run_in_subprocess(
    request: dict[str, Any], timeout_s: float | None, log_path: Path
) -> dict[str, Any]:
    """Run :func:`_nn_child` in a fresh interpreter: its own memory, threads and torch state.

    The child's log (the engine's events: choices, per-epoch metrics) goes to ``log_path``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orca-quality-io-") as io_dir:
        request_path, answer_path = Path(io_dir) / "request.json", Path(io_dir) / "answer.json"
        request_path.write_text(json.dumps(request))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = str(request["threads"])
        command = [sys.executable, "-m", "bench.quality", CHILD_FLAG, str(request_path)]
        with log_path.open("w") as log:
            completed = subprocess.run(
                [*command, str(answer_path)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        if completed.returncode != 0 or not answer_path.exists():
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"exit {completed.returncode} (log {log_path}): {tail}")
        answer: dict[str, Any] = json.loads(answer_path.read_text())
        return answer


def _child_main(request_path: str, answer_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    request = json.loads(Path(request_path).read_text())
    Path(answer_path).write_text(json.dumps(_nn_child(request)))
    return 0


def _record(task: Task, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "dataset": task.dataset,
        "method": task.method,
        "seed": task.seed,
        "key": task.key,
        "budget_epochs": task.budget_epochs,
        "metric": bench_datasets.DATASETS[task.dataset].metric,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        **body,
    }


def run_tasks(
    tasks: Sequence[Task],
    *,
    cache_dir: Path,
    jobs: int = 1,
    device: str = "cpu",
    fresh: bool = False,
    timeout_s: float | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run what is not cached (peers here, neural runs in ``jobs`` worker processes).

    Returns every result of ``tasks`` that exists afterwards (cached or new); a failed run is
    logged and left out, so a rerun tries it again. ``threads``: torch threads per neural run
    (default: the cores shared out among ``jobs``); peers run on one thread, since on a busy
    machine an oversubscribed small model slows down many times over.
    """
    cache_dir = Path(cache_dir)
    results: dict[str, dict[str, Any]] = {}
    pending: list[Task] = []
    for task in tasks:
        cached = None if fresh else load_result(cache_dir, task)
        if cached is not None:
            results[result_path(cache_dir, task).as_posix()] = cached
        else:
            pending.append(task)
    logger.info("%d runs cached, %d to run", len(tasks) - len(pending), len(pending))

    peer_tasks = [t for t in pending if t.spec is None]
    if peer_tasks:
        import torch

        torch.set_num_threads(1)
    for task in peer_tasks:
        meta = bench_datasets.DATASETS[task.dataset]
        arrays = bench_datasets.load_arrays(task.dataset, cache_dir)
        body = bench_peers.run_peer(
            task.method, arrays, meta, seed=task.seed, epochs=task.budget_epochs
        )
        record = _record(task, body)
        _store_result(cache_dir, task, record)
        results[result_path(cache_dir, task).as_posix()] = record
        logger.info(
            "%s %s seed %d: %s %.4f in %.1fs",
            task.dataset,
            task.method,
            task.seed,
            meta.metric,
            body["test"].get(meta.metric, math.nan),
            body["wall_s"],
        )

    nn_pending = [t for t in pending if t.spec is not None]
    if nn_pending:
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

        def run_one(task: Task) -> dict[str, Any]:
            request = {
                "spec": task.spec,
                "dataset_path": str(bench_datasets.dataset_path(task.dataset, cache_dir)),
                "device": device,
                "threads": threads,
                "proxy_cache_dir": str(cache_dir / "proxies"),
                "resolved_overrides": task.identity.get("resolved_overrides") or {},
            }
            log = cache_dir / "logs" / f"{task.dataset}-{task.method}-seed{task.seed}.log"
            return _run_in_subprocess(request, timeout_s, log)

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(run_one, task): task for task in nn_pending}
            for future in concurrent.futures.as_completed(futures):
                task = futures[future]
                try:
                    body = future.result()
                except Exception as exc:
                    logger.error(
                        "%s %s seed %d failed: %s", task.dataset, task.method, task.seed, exc
                    )
                    continue
                record = _record(task, body)
                _store_result(cache_dir, task, record)
                results[result_path(cache_dir, task).as_posix()] = record
                metric = bench_datasets.DATASETS[task.dataset].metric
                logger.info(
                    "%s %s seed %d: %s %.4f in %.0fs (alignment %s -> %s)",
                    task.dataset,
                    task.method,
                    task.seed,
                    metric,
                    body["test"].get(metric, math.nan),
                    body["wall_s"],
                    body["alignment"].get("before"),
                    body["alignment"].get("after"),
                )
    return list(results.values())


def evaluate_recipe(
    dataset_names: Iterable[str],
    spec_overrides: Mapping[str, Any],
    seeds: Iterable[int],
    *,
    resolved_overrides: Mapping[str, Any] | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    jobs: int = 1,
    device: str = "cpu",
    fresh: bool = False,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Run the ``orca`` recipe with ``spec_overrides`` (JobSpec fields, deep-merged) on datasets.

    Results share the suite's cache, keyed by a hash of the overrides and what they resolve to,
    so repeating an experiment is free and the suite's own ``orca`` runs are reused when the
    overrides are empty. Each result has ``test``, ``val``, ``alignment``, ``wall_s``, ... .
    ``resolved_overrides`` replaces resolved values the spec does not expose (``token_budget``).
    """
    overrides = dict(spec_overrides)
    if label is None:
        label = (
            "orca"
            if not overrides and not resolved_overrides
            else "recipe-"
            + _digest({"spec": overrides, "resolved": dict(resolved_overrides or {})})[:8]
        )
    planner = Planner(cache_dir, device)
    tasks = [
        planner.nn_task(dataset, label, seed, overrides, resolved_overrides, equal_budget=False)
        for dataset in dataset_names
        for seed in seeds
    ]
    return run_tasks(tasks, cache_dir=cache_dir, jobs=jobs, device=device, fresh=fresh)


# --- summarising -----------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool:
    from orca_engine.metrics import higher_is_better as engine_rule

    return bool(engine_rule(metric))


@dataclass
class Cell:
    values: list[float]
    wall: list[float]
    after: list[float]
    before: list[float]
    #: fine-tuning epochs actually run (early stopping may end a run before the budget)
    epochs_run: list[int] = field(default_factory=list)
    #: per seed, the run's per-row test marks (:func:`bench.peers.correct_marks`) where it kept them
    marks: dict[int, str] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def collect(
    results: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str], Cell]:
    """Per (dataset, method): the test metric, wall time and alignment distances over seeds."""
    cells: dict[tuple[str, str], Cell] = {}
    for result in sorted(results, key=lambda r: (r["dataset"], r["method"], r["seed"])):
        cell = cells.setdefault((result["dataset"], result["method"]), Cell([], [], [], []))
        value = result["test"].get(result["metric"])
        if value is None:
            continue
        cell.values.append(float(value))
        cell.wall.append(float(result["wall_s"]))
        if result.get("refine_epochs_run"):
            cell.epochs_run.append(int(result["refine_epochs_run"]))
        alignment = result.get("alignment") or {}
        if alignment.get("after") is not None:
            cell.after.append(float(alignment["after"]))
            cell.before.append(float(alignment["before"]))
        if result.get("test_correct"):
            cell.marks[int(result["seed"])] = str(result["test_correct"])
    return cells


def _fmt(value: float, metric: str) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.3f}" if metric in ("accuracy", "relative_l2") else f"{value:.1f}"


def _empty(dataset: str, method: str, planned: set[tuple[str, str]] | None) -> str:
    """What a table shows without a result: n/a, not run by this command, or missing."""
    meta = bench_datasets.DATASETS[dataset]
    if method not in NN_METHODS and not bench_peers.applies(method, meta):
        return "n/a"
    return "—" if planned is None or (dataset, method) in planned else "·"


def quality_table(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    methods: Sequence[str],
    n_seeds: int,
    planner: Planner | None = None,
    planned: set[tuple[str, str]] | None = None,
) -> str:
    """Markdown: one row per dataset, mean ± std of the test metric per method, best in bold."""
    header = "| dataset | metric | epochs | " + " | ".join(methods) + " |"
    lines = [header, "|---|---|---:|" + "---:|" * len(methods)]
    for dataset in datasets:
        meta = bench_datasets.DATASETS[dataset]
        better = max if higher_is_better(meta.metric) else min
        means = {
            m: cells[(dataset, m)].mean
            for m in methods
            if (dataset, m) in cells and cells[(dataset, m)].values
        }
        best = better(means.values()) if means else math.nan
        row = []
        for method in methods:
            cell = cells.get((dataset, method))
            if cell is None or not cell.values:
                row.append(_empty(dataset, method, planned))
                continue
            text = _fmt(cell.mean, meta.metric)
            if len(cell.values) > 1:
                text += f" ± {_fmt(cell.std, meta.metric)}"
            if len(cell.values) < n_seeds:
                text += f" (n={len(cell.values)})"
            if means and cell.mean == best:
                text = f"**{text}**"
            row.append(text)
        arrow = "↑" if higher_is_better(meta.metric) else "↓"
        epochs = str(planner.budget_epochs(dataset)) if planner else ""
        lines.append(f"| {dataset} | {meta.metric} {arrow} | {epochs} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def wall_table(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    methods: Sequence[str],
    planned: set[tuple[str, str]] | None = None,
) -> str:
    """Markdown: mean wall seconds per run (dataset x method)."""
    lines = ["| dataset | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for dataset in datasets:
        row = []
        for method in methods:
            cell = cells.get((dataset, method))
            if cell and cell.wall:
                text = f"{statistics.fmean(cell.wall):.1f}"
                if cell.epochs_run:
                    text += f" ({statistics.fmean(cell.epochs_run):.0f} ep)"
                row.append(text)
            else:
                row.append(_empty(dataset, method, planned))
        lines.append(f"| {dataset} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def alignment_table(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    methods: Sequence[str],
    planned: set[tuple[str, str]] | None = None,
) -> str:
    """Markdown: alignment distance before → after (mean over seeds), each under its own distance."""
    aligned = [m for m in methods if m in DISTANCE_METHODS]
    if not aligned:
        return ""
    lines = [
        "| dataset | " + " | ".join(f"{m} before → after" for m in aligned) + " |",
        "|---|" + "---:|" * len(aligned),
    ]
    for dataset in datasets:
        row = []
        for method in aligned:
            cell = cells.get((dataset, method))
            if cell and cell.after:
                before, after = statistics.fmean(cell.before), statistics.fmean(cell.after)
                row.append(f"{before:.4g} → {after:.4g} ({(after / before - 1) * 100:+.0f}%)")
            else:
                row.append(_empty(dataset, method, planned))
        lines.append(f"| {dataset} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# --- plots and claims ------------------------------------------------------------------------


def _cost(value: float, metric: str, n_test: int) -> float:
    """Lower is better; a perfect score counts as half a misclassified test sample."""
    if higher_is_better(metric):
        return max(1.0 - value, 0.5 / max(n_test, 1))
    return max(value, 1e-12)


def _line_method(dataset: str, method: str) -> str:
    """``method``, or for :data:`PEER_LINE` / :data:`SIMPLE_LINE` the dataset kind's strong
    peer / simple baseline."""
    kind = bench_datasets.DATASETS[dataset].kind
    if method == PEER_LINE:
        return bench_peers.STRONG_PEER[kind]
    if method == SIMPLE_LINE:
        return bench_peers.SIMPLE_PEER[kind]
    return method


def _method_cell(cells: Mapping[tuple[str, str], Cell], dataset: str, method: str) -> Cell | None:
    """The cell of ``method`` on ``dataset`` (a line resolved by :func:`_line_method`)."""
    cell = cells.get((dataset, _line_method(dataset, method)))
    return cell if cell is not None and cell.values else None


def performance_profile(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    methods: Sequence[str],
    test_sizes: Mapping[str, int],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Dolan-More profile: for each tau, the share of tasks where a method's cost <= tau x best.

    Cost is the error (1 - accuracy, RMSE, relative L2) of the seed-mean; a method missing on a
    task counts as never within any tau there. ``methods`` may include :data:`PEER_LINE`, the
    strong classical peer of each task's kind (MiniRocket, HistGradientBoosting, CNN).
    """
    taus = np.concatenate([np.linspace(1.0, 3.0, 201), np.linspace(3.0, 10.0, 71)[1:]])
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    for dataset in datasets:
        metric = bench_datasets.DATASETS[dataset].metric
        costs = {
            m: _cost(cell.mean, metric, test_sizes[dataset])
            for m in methods
            if (cell := _method_cell(cells, dataset, m)) is not None
        }
        if len(costs) < 2:
            continue
        best = min(costs.values())
        for method in methods:
            ratios[method].append(costs[method] / best if method in costs else math.inf)
    profile = {
        m: np.array([np.mean(np.array(ratios[m]) <= tau) if ratios[m] else 0.0 for tau in taus])
        for m in methods
    }
    return taus, profile


def plot_profile(
    taus: np.ndarray, profile: Mapping[str, np.ndarray], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, share in profile.items():
        style = "-" if method in NN_METHODS else "--"
        ax.step(taus, share, where="post", linestyle=style, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("τ (error within τ x the best method's error)")
    ax.set_ylabel("fraction of tasks")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distance_points(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per aligned run: relative distance after alignment and the metric gain over naive-ft.

    Distances of different kinds (OTDD, MMD) and datasets have different scales, so the x-axis is
    ``after / before`` and the y-axis the run's test metric minus naive-ft's on the same dataset
    and seed (sign flipped for errors so up is better).
    """
    by_key = {(r["dataset"], r["method"], r["seed"]): r for r in results}
    points = []
    for (dataset, method, seed), result in by_key.items():
        if method not in ALIGNED_METHODS:
            continue
        naive = by_key.get((dataset, "naive-ft", seed))
        alignment = result.get("alignment") or {}
        metric = result["metric"]
        if naive is None or not alignment.get("before") or alignment.get("after") is None:
            continue
        sign = 1.0 if higher_is_better(metric) else -1.0
        gain = sign * (result["test"][metric] - naive["test"][metric])
        if not higher_is_better(metric):
            gain /= max(abs(naive["test"][metric]), 1e-12)  # relative, errors differ in scale
        points.append(
            {
                "dataset": dataset,
                "method": method,
                "seed": seed,
                "ratio": alignment["after"] / alignment["before"],
                "gain": gain,
            }
        )
    return points


def plot_distance_scatter(points: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"orca-full": "o", "orca-mmd": "s", "orca-gaussian": "^"}
    for method in ALIGNED_METHODS:
        chosen = [p for p in points if p["method"] == method]
        if chosen:
            ax.scatter(
                [p["ratio"] for p in chosen],
                [p["gain"] for p in chosen],
                marker=markers[method],
                label=method,
                alpha=0.75,
            )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("alignment distance after / before (lower = more aligned)")
    ax.set_ylabel("test score - naive-ft's (same dataset, seed)")
    ax.set_title("Does a lower final distance go with a better model?")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def paired_error(first: Cell, second: Cell) -> float | None:
    """Standard error of the accuracy gap when both runs scored the same test rows.

    Seeds both methods ran with per-row marks are paired row by row (``d = hit_a - hit_b`` in
    {-1, 0, 1}); the error is that of the mean of ``d`` over every paired (seed, row), so only
    rows the two models disagree on count. None when no seed has marks of equal length on both
    sides (then :func:`_pairwise` falls back to the independent binomial error).
    """
    diffs: list[int] = []
    for seed, marks in first.marks.items():
        other = second.marks.get(seed)
        if other is None or len(other) != len(marks):
            continue
        diffs += [int(x) - int(y) for x, y in zip(marks, other, strict=True)]
    if not diffs:
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum(d * d for d in diffs) / n - mean * mean
    return math.sqrt(max(variance, 0.0) / n)


def _pairwise(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    first: str,
    second: str,
    test_sizes: Mapping[str, int],
) -> tuple[int, int, int, list[str]]:
    """(wins, ties, losses, dataset notes) of ``first`` over ``second`` on the seed-means.

    A gap is a tie when it is within either method's seed spread or, for accuracy, within one
    standard error of the difference on the test split (a handful of test samples): paired row
    by row where both runs kept per-row marks (:func:`paired_error`; two models scored on the
    same rows disagree on few of them, so this is the right error), else the independent
    binomial error, which overstates it. Notes mark a paired comparison with ``(paired)``.
    """
    wins = ties = losses = 0
    notes = []
    for dataset in datasets:
        a, b = cells.get((dataset, first)), cells.get((dataset, second))
        if not a or not b or not a.values or not b.values:
            continue
        metric = bench_datasets.DATASETS[dataset].metric
        diff = a.mean - b.mean if higher_is_better(metric) else b.mean - a.mean
        noise = max(a.std, b.std)
        paired = None
        if metric == "accuracy":
            paired = paired_error(a, b)
            n_test = max(test_sizes.get(dataset, 1), 1)
            noise = max(
                noise,
                paired
                if paired is not None
                else math.sqrt((a.mean * (1 - a.mean) + b.mean * (1 - b.mean)) / n_test),
            )
        if abs(diff) <= noise:
            ties += 1
        elif diff > 0:
            wins += 1
        else:
            losses += 1
        notes.append(f"{dataset} {diff:+.3f}{' (paired)' if paired is not None else ''}")
    return wins, ties, losses, notes


def _peer_claims(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    test_sizes: Mapping[str, int],
) -> list[str]:
    """Issue 8's bars for the default: never below the simple baseline; within 3 points of
    (and sometimes ahead of) the strong classical peer. Same tie rule as the other claims."""
    lines = []
    for line, claim in (
        (SIMPLE_LINE, "The default job is never below the simple baseline"),
        (PEER_LINE, "The default job against the strong classical peer"),
    ):
        view = dict(cells)
        rows = []
        for dataset in datasets:
            peer, orca = _method_cell(cells, dataset, line), _method_cell(cells, dataset, "orca")
            if peer is None or orca is None:
                continue
            view[dataset, line] = peer
            rows.append((dataset, _line_method(dataset, line), peer.mean, orca.mean))
        if not rows:
            lines.append(f"- *{claim}*: not measured (no dataset has both orca and its {line}).")
            continue
        wins, ties, losses, _ = _pairwise(view, datasets, "orca", line, test_sizes)
        detail = ", ".join(f"{d}: {n} {p:.3f} vs orca {o:.3f}" for d, n, p, o in rows)
        text = (
            f"- *{claim}*: orca vs the {line} wins {wins}, ties {ties}, loses {losses} of "
            f"{len(rows)} datasets (same tie rule)"
        )
        if line == PEER_LINE:
            accuracy = [
                (d, o - p) for d, _, p, o in rows if bench_datasets.DATASETS[d].metric == "accuracy"
            ]
            close = sum(1 for _, gap in accuracy if gap >= -0.03)
            text += f"; within 3 points of it on {close} of {len(accuracy)} accuracy datasets" + (
                " (more than 3 behind: "
                + ", ".join(f"{d} {gap:+.3f}" for d, gap in accuracy if gap < -0.03)
                + ")"
                if close < len(accuracy)
                else ""
            )
        lines.append(f"{text}: {detail}.")
    return lines


def claims(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str],
    points: Sequence[Mapping[str, Any]],
    test_sizes: Mapping[str, int],
) -> str:
    """The paper's claims checked against these numbers, one bullet each, worded from them."""

    def verdict(first: str, second: str, claim: str) -> str:
        wins, ties, losses, notes = _pairwise(cells, datasets, first, second, test_sizes)
        total = wins + ties + losses
        if total == 0:
            return f"- *{claim}*: not measured (no dataset has both {first} and {second})."
        if wins > losses:
            word = "holds here" if losses == 0 else "mostly holds here"
        elif wins == losses:
            word = "is undecided here"
        else:
            word = "does not hold here"
        one_seed = all(
            len(cell.values) <= 1
            for (dataset, method), cell in cells.items()
            if dataset in datasets and method in (first, second)
        )
        return (
            f"- *{claim}* {word}{' at one seed' if one_seed else ''}: {first} vs {second} wins "
            f"{wins}, ties {ties}, loses {losses} of {total} datasets (seed-mean difference, "
            f"higher = {first} better; a gap within the seed spread or one standard error of the "
            f"test split, paired row by row where both kept per-row marks, is a tie"
            + (
                "; at one seed a regression gap has no noise estimate and counts in full"
                if one_seed
                else ""
            )
            + f"): {', '.join(notes)}."
        )

    lines = [
        verdict("orca-full", "naive-ft", "Alignment beats naive fine-tuning"),
        verdict("orca", "naive-ft", "The default job beats naive fine-tuning"),
        verdict("orca", "orca-noalign", "Alignment earns its place in the default job"),
        verdict("naive-ft", "fpt", "Full fine-tuning beats LayerNorm-only (FPT)"),
        verdict("naive-ft", "scratch", "Pretrained weights beat the same model from scratch"),
    ]
    if len(points) < 3:
        lines.append(
            f"- *Lower final distance → better model*: cannot be checked from {len(points)} "
            "aligned run(s) with a naive-ft run beside them (needs at least 3)."
        )
    else:
        rho = _spearman([p["ratio"] for p in points], [p["gain"] for p in points])
        helped = sum(p["gain"] > 0 for p in points)
        word = "holds here" if rho < -0.3 else "is not supported here"
        lines.append(
            f"- *Lower final distance → better model* {word}: Spearman rho = {rho:.2f} between "
            f"after/before distance and the gain over naive-ft across {len(points)} aligned "
            f"runs (negative = more alignment, more gain); {helped} of {len(points)} aligned "
            "runs beat naive-ft on the same dataset and seed."
        )
    lines += _peer_claims(cells, datasets, test_sizes)
    return "\n".join(lines)


# --- the document ----------------------------------------------------------------------------


def build_report(
    results: Sequence[Mapping[str, Any]],
    *,
    datasets: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    planned: set[tuple[str, str, int]],
    planner: Planner,
    command: str,
    device: str,
    started: float,
    img_dir: Path,
    note: str = "",
) -> str:
    """The markdown body of the Quality section (and the plots beside it)."""
    cells = collect(results)
    nn_methods = [m for m in methods if m in NN_METHODS]
    test_sizes = {d: len(bench_datasets.load_arrays(d, planner.cache_dir)[3]) for d in datasets}
    profile_methods = [*nn_methods, PEER_LINE]
    taus, profile = performance_profile(cells, datasets, profile_methods, test_sizes)
    profile_path = img_dir / "quality_profile.png"
    plot_profile(taus, profile, profile_path, f"Performance profile over {len(datasets)} tasks")
    points = distance_points(results)
    scatter_path = img_dir / "quality_distance.png"
    plot_distance_scatter(points, scatter_path)
    rel = os.path.relpath(img_dir, DOC.parent)
    done = {(r["dataset"], r["method"], r["seed"]) for r in results}
    planned_pairs = {(d, m) for d, m, _ in planned}
    missing = len(planned - done)
    budget_rows = []
    for dataset in datasets:
        resolved = planner.resolve(dataset, planner.base_spec(dataset, 0))
        budget_rows.append(
            f"| {dataset} | {resolved['finetune_epochs']} | {resolved['batch_size']} | "
            f"{resolved['align_epochs']}{' (auto stop)' if resolved['align_auto'] else ''} | "
            f"{resolved['token_budget']} | {resolved['finetune_mode']} | {resolved['lr']:g} | "
            f"{resolved['ensemble_members']} |"
        )
    auc = {
        m: float(np.trapezoid(profile[m], np.log(taus)) / np.log(taus[-1])) for m in profile_methods
    }
    ranking = ", ".join(f"{m} {auc[m]:.2f}" for m in sorted(auc, key=lambda k: -auc[k]))
    parts = [
        machine_line(
            command,
            device=device,
            notes=f"this invocation took {(time.monotonic() - started) / 60:.1f} min; cached "
            "runs of the same command are reused, so numbers may come from earlier invocations",
        ),
        "",
        f"Seeds {', '.join(map(str, seeds))}; cells are mean ± std over seeds "
        f"(`(n=k)`: only k seeds finished; `—`: no finished run in the cache; `·`: not run by "
        f"this command; `n/a`: the method does not apply). Best per row in bold. Same splits for every method: UCR/UEA's own, "
        f"sklearn's seeded stratified 70/30; `-10shot` = at most 10 training rows per class; the "
        f"engine holds 20% of train out for validation and selects the checkpoint on it. Neural "
        f"methods share the backbone architecture (MiniLM-L6, `{SCRATCH_BACKBONE}` for scratch) "
        f"and the fine-tuning budget of `epochs` (what `auto` resolves for orca, passed to the "
        f"others; early stopping may end a run sooner); the CNN peer trains for the same epochs. "
        f"{missing} requested runs are missing.",
        "",
        *([note, ""] if note else []),
        "### Test metric",
        "",
        quality_table(cells, datasets, methods, len(seeds), planner, planned_pairs),
        "",
        "### Budgets `auto` resolved for orca",
        "",
        "| dataset | finetune epochs | batch | align epochs | tokens | finetune mode | lr "
        "| ensemble members |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
        *budget_rows,
        "",
        "### Wall time per run (s)",
        "",
        "Mean over seeds; `(k ep)`: fine-tuning epochs a neural run actually ran before early "
        "stopping (of the budget above; summed over an ensemble's members). Neural runs include "
        "loading MiniLM, alignment and "
        "evaluation; peers ran on one thread in the harness process.",
        "",
        wall_table(cells, datasets, methods, planned_pairs),
        "",
    ]
    if any(m in DISTANCE_METHODS for m in nn_methods):
        parts += [
            "### Alignment distance (before → after embedder learning, each under its own "
            "distance)",
            "",
            alignment_table(cells, datasets, methods, planned_pairs),
            "",
        ]
    parts += [
        "### Plots",
        "",
        f"![performance profile]({rel}/{profile_path.name})",
        "",
        "Performance profile (Dolan & Moré, as in the ORCA paper): for each τ, the fraction of "
        "tasks on which a method's error (1 - accuracy, RMSE, relative L2; seed-mean; a perfect "
        "score counts as half a test error) is within τ x the best method's. `classical peer` "
        "is the strong peer of each task's kind (MiniRocket for series, HistGradientBoosting "
        "for tables, the small CNN for images and fields). Area under the "
        f"log-τ curve (1 = best everywhere): {ranking}.",
        "",
        f"![distance vs accuracy]({rel}/{scatter_path.name})",
        "",
        "One point per aligned run: final/initial alignment distance against the test-score "
        "gain over naive-ft on the same dataset and seed (relative error reduction for "
        "regression).",
        "",
        "### Claims checked",
        "",
        claims(cells, datasets, points, test_sizes),
    ]
    return "\n".join(parts)


# --- CLI -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="one seed, 4 datasets, few methods")
    parser.add_argument("--datasets", nargs="+", choices=sorted(bench_datasets.DATASETS))
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--jobs", type=int, default=1, help="neural runs at once (default 1)")
    parser.add_argument(
        "--threads", type=int, help="torch threads per neural run (default: cores / jobs)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (default cpu)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to write into")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs alone")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing; report what the cache holds"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.quality``: run (or resume) the suite, print tables, write the docs."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == [CHILD_FLAG]:
        return _child_main(raw[1], raw[2])
    args = _parser().parse_args(raw)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.monotonic()
    datasets = args.datasets or (
        list(QUICK_DATASETS) if args.quick else list(bench_datasets.DATASETS)
    )
    methods = args.methods or (list(QUICK_METHODS) if args.quick else list(ALL_METHODS))
    seeds = args.seeds or (list(QUICK_SEEDS) if args.quick else list(DEFAULT_SEEDS))
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    planner = Planner(args.cache_dir, device)
    quick_subset = args.quick and not args.datasets and not args.methods
    tasks = [
        task
        for dataset in datasets
        for method in methods
        for seed in seeds
        if not (quick_subset and method in NN_METHODS and dataset not in QUICK_NN_DATASETS)
        and (task := planner.task(dataset, method, seed)) is not None
    ]
    if args.report_only:
        results = [r for t in tasks if (r := load_result(args.cache_dir, t)) is not None]
    else:
        results = run_tasks(
            tasks,
            cache_dir=args.cache_dir,
            jobs=args.jobs,
            device=device,
            fresh=args.fresh,
            threads=args.threads,
        )
    shown_methods = [m for m in methods if any(t.method == m for t in tasks)]
    command = bench_command("bench.quality", raw)
    body = build_report(
        results,
        datasets=datasets,
        methods=shown_methods,
        seeds=seeds,
        planned={(t.dataset, t.method, t.seed) for t in tasks},
        planner=planner,
        command=command,
        device=device,
        started=started,
        # --no-doc leaves docs/ alone, plots included: they go to a scratch folder
        img_dir=IMG_DIR if not args.no_doc else Path(tempfile.mkdtemp(prefix="orca-quality-")),
        note=(
            f"`--quick`: seed 0, and the neural methods only on {', '.join(QUICK_NN_DATASETS)} "
            "so that the command stays within 15 minutes on this 2-core CPU (a neural run takes "
            "minutes here; peers take seconds). The full suite is `python -m bench.quality` "
            f"({len(bench_datasets.DATASETS)} datasets x {len(NN_METHODS)} neural methods x "
            f"{len(DEFAULT_SEEDS)} seeds + peers: many hours on this CPU, resumable)."
            if quick_subset
            else ""
        ),
    )
    print(f"## {SECTION_TITLE}\n\n{body}")
    if not args.no_doc:
        replace_section(args.doc, SECTION_TITLE, body)
        logger.info("wrote section %r of %s", SECTION_TITLE, args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
