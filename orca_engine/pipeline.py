"""One ORCA job end to end: prepare -> align -> refine -> evaluate -> export, resumable.

Every stage leaves a checkpoint under ``workdir`` (``prepare.json``, ``align_state.pt`` /
``align_done.pt``, ``refine_state.pt``); calling :func:`run_job` again with the same workdir skips
what is done and continues where it stopped, ending with the same weights and metrics as a run
that was never interrupted (on CPU). The test split is read once, in ``evaluate``.

``alignment.max_samples`` caps *both* sides of the alignment: at most that many target training
samples (a seeded subsample) are embedded per alignment epoch, and the source proxy holds at most
that many samples. One knob bounds the cost of the dataset distance, which grows with both.

``backbone: auto`` / ``alignment.source: auto`` are decided in ``prepare`` by
:func:`orca_engine.analyze.choose_backbone_and_source` (a stored transferability analysis, or one
run here when several pairs are possible), announced as a ``choice`` event with the numbers, and
stored in ``prepare.json`` with the rest of the resolved spec.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import orca_engine
from orca_engine.checkpoint import load_stage, save_bundle, save_stage, write_json
from orca_engine.data import (
    Dataset,
    DatasetInfo,
    Normaliser,
    TargetScaler,
    load_dataset,
)
from orca_engine.device import (
    out_of_memory_as_error,
    outputs_in_chunks,
    resolve_device,
    seed_everything,
)
from orca_engine.errors import SpecError
from orca_engine.metrics import compute_metrics
from orca_engine.model import OrcaModel, build_model
from orca_engine.progress import STAGES, Callbacks
from orca_engine.refine import (
    Preprocessing,
    RefineResult,
    bank_memory,
    fit_preprocessing,
    outputs_for_metrics,
    refine,
)
from orca_engine.specs import (
    JobSpec,
    ResolvedSpec,
    check_backbone_location,
    dense_series_stem,
    parse_spec,
    periodic_domain,
    resolve_spec,
)

logger = logging.getLogger(__name__)

PREPARE_FILE = "prepare.json"
ALIGN_STATE_FILE = "align_state.pt"
ALIGN_DONE_FILE = "align_done.pt"

#: share of the overall progress bar each stage takes when alignment runs
STAGE_WEIGHTS = {"prepare": 0.05, "align": 0.25, "refine": 0.60, "evaluate": 0.05, "export": 0.05}


@dataclass
class JobResult:
    """What a finished job hands back to the service."""

    bundle_dir: Path
    #: {"val": {...}, "test": {...}, "alignment": {"before": x, "after": y}}
    metrics: dict[str, Any]
    resolved_spec: dict[str, Any]
    curves: dict[str, Any]


def overall_progress(stage: str, step: int, total: int, align_enabled: bool) -> float:
    """One 0..1 progress value for the whole job from a stage's ``step`` of ``total``.

    Without alignment its share goes to refinement, so the bar still fills evenly.
    """
    weights = dict(STAGE_WEIGHTS)
    if not align_enabled:
        weights["refine"] += weights.pop("align")
    if stage not in weights:
        return 0.0 if stage == "align" else 1.0
    done_before = sum(
        weights[s] for s in STAGES if s in weights and STAGES.index(s) < STAGES.index(stage)
    )
    fraction = min(1.0, max(0.0, step / total)) if total > 0 else 1.0
    return min(1.0, done_before + weights[stage] * fraction)


# --- prepare ---------------------------------------------------------------------------------


def _prepared_record(
    rspec: ResolvedSpec, dataset: Dataset, preprocessing: Preprocessing
) -> dict[str, Any]:
    return {
        "resolved_spec": rspec.to_dict(),
        "info": dataset.info.to_dict(),
        "normaliser": preprocessing.normaliser.to_dict(),
        "target_scaler": preprocessing.target_scaler.to_dict()
        if preprocessing.target_scaler
        else None,
        "label_map": dataset.label_map.to_dict() if dataset.label_map else None,
        "target_shape": list(dataset.y_train.shape[1:]),
    }


def _apply_overrides(rspec: ResolvedSpec, overrides: Mapping[str, Any] | None) -> ResolvedSpec:
    if not overrides:
        return rspec
    values = rspec.to_dict()
    unknown = sorted(set(overrides) - set(values) - {"reasons"})
    if unknown:
        raise SpecError(f"cannot override unknown resolved values {unknown}", param=unknown[0])
    reasons = {**values["reasons"], **{key: "set by the caller" for key in overrides}}
    return ResolvedSpec.from_dict({**values, **overrides, "reasons": reasons})


def _decide_stem_wrap(
    rspec: ResolvedSpec, dataset: Dataset, overrides: Mapping[str, Any] | None
) -> ResolvedSpec:
    """A dense series task's stem wraps around its ends when the training data is periodic.

    Read from the data here (not in :func:`resolve_spec`, which sees only the dataset's info);
    a caller's override stands.
    """
    applies = dense_series_stem(rspec.task_type, dataset.info.input_kind, rspec.embedder_stem)
    if "embedder_circular" in (overrides or {}) or not applies:
        return rspec
    periodic, reason = periodic_domain(dataset.x_train, dataset.y_train)
    return rspec.model_copy(
        update={
            "embedder_circular": periodic,
            "reasons": {**rspec.reasons, "embedder_circular": reason},
        }
    )


def _announce_choices(rspec: ResolvedSpec, callbacks: Callbacks) -> None:
    values = rspec.to_dict()
    for key, reason in sorted(rspec.reasons.items()):
        callbacks.event(
            f"{key} = {values.get(key)!r}: {reason}",
            kind="choice",
            data={"param": key, "value": values.get(key), "reason": reason},
        )


@dataclass
class ChoiceContext:
    """What ``backbone: auto`` / ``alignment.source: auto`` may draw on (see ``analyze``).

    ``stored_analysis`` is the dataset's latest succeeded transferability analysis (its
    ``AnalysisResult.to_dict()``), ``extra_backbones`` ids the service offers besides the
    registry's installed ones; ``source_paths`` maps dataset ids named as a source to their file.
    """

    stored_analysis: Mapping[str, Any] | None = None
    extra_backbones: Sequence[str] = ()
    source_paths: Mapping[str, str | Path] | None = None
    proxy_cache_dir: str | Path | None = None


def _choose_backbone_and_source(
    job_spec: JobSpec,
    rspec: ResolvedSpec,
    dataset: Dataset,
    context: ChoiceContext,
    device: torch.device,
    callbacks: Callbacks,
) -> tuple[ResolvedSpec, dict[str, Any] | None]:
    """Replace the family defaults of an ``auto`` backbone/source by the analysis's best pair."""
    from orca_engine.analyze import (
        DEFAULT_ALIGN_EPOCHS,
        DEFAULT_DISTANCE,
        DEFAULT_SAMPLE_SIZE,
        AnalysisResult,
        Candidate,
        analyze_transferability,
        choose_backbone_and_source,
    )

    def run_analysis(candidates: list[Candidate]) -> AnalysisResult:
        callbacks.event(
            f"prepare: analysing {len(candidates)} backbone/proxy pairs to choose for 'auto'",
            kind="log",
        )
        return analyze_transferability(
            dataset,
            [
                Candidate(c.backbone, _proxy_name(c.source, context.source_paths), c.source)
                for c in candidates
            ],
            distance=rspec.distance if rspec.distance != "none" else DEFAULT_DISTANCE,
            sample_size=min(DEFAULT_SAMPLE_SIZE, rspec.max_samples),
            align_epochs=DEFAULT_ALIGN_EPOCHS,
            seed=rspec.seed,
            device=device,
            callbacks=callbacks,
            proxy_cache_dir=context.proxy_cache_dir,
            token_budget=rspec.token_budget,
            stem_channels=rspec.embedder_stem,
            kernel_bank=rspec.embedder_kernel_bank,
            stem_layers=rspec.embedder_stem_layers,
            circular=rspec.embedder_circular,
            allow_random_init=rspec.allow_random_init,
            progress_stage="prepare",
        )

    choice = choose_backbone_and_source(
        backbone=job_spec.backbone,
        source=job_spec.alignment.source,
        allow_random_init=rspec.allow_random_init,
        stored_analysis=context.stored_analysis,
        run_analysis=run_analysis,
        extra_backbones=context.extra_backbones,
    )
    if choice is None or (
        choice.analysis is None
        and (choice.backbone, choice.source) == (rspec.backbone, rspec.source)
    ):
        return rspec, None  # nothing was compared: the resolver's own reasons say it better
    reasons = dict(rspec.reasons)
    if job_spec.backbone == "auto":
        reasons["backbone"] = choice.reason
    if job_spec.alignment.source == "auto":
        reasons["source"] = choice.reason
    chosen = rspec.model_copy(
        update={"backbone": choice.backbone, "source": choice.source, "reasons": reasons}
    )
    summary = None
    if choice.analysis is not None:
        summary = {
            key: choice.analysis.get(key)
            for key in ("distance", "sample_size", "align_epochs", "seed", "seconds")
        }
        summary["ranking"] = [
            {k: c.get(k) for k in ("rank", "backbone", "source", "before", "after", "score")}
            for c in choice.analysis.get("candidates") or []
            if c.get("status") == "ok"
        ]
    callbacks.event(
        f"chose backbone {choice.backbone!r} with source {choice.source!r}: {choice.reason}",
        kind="choice",
        data={
            "param": "backbone_source",
            "value": {"backbone": choice.backbone, "source": choice.source},
            "reason": choice.reason,
            "analysis": summary,
        },
    )
    return chosen, choice.analysis


def _prepare(
    job_spec: JobSpec,
    dataset_path: str | Path,
    workdir: Path,
    *,
    device: torch.device,
    callbacks: Callbacks,
    model_dirs: Sequence[str | Path],
    filename: str | None,
    label_column: str | None,
    resolved_overrides: Mapping[str, Any] | None,
    choice_context: ChoiceContext | None = None,
) -> tuple[Dataset, ResolvedSpec, dict[str, Any]]:
    """Load the dataset, resolve the spec and fit the preprocessing once (then prepare.json)."""
    task_override = job_spec.task.type if job_spec.task.type != "auto" else None
    dataset = load_dataset(
        dataset_path,
        filename=filename,
        label_column=label_column,
        task_type=task_override,
        seed=job_spec.seed,
    )
    prepared_path = workdir / PREPARE_FILE
    if prepared_path.exists():
        callbacks.event("prepare: resuming with the spec resolved before", kind="log")
    else:
        fresh_spec = _apply_overrides(
            resolve_spec(job_spec, dataset.info, device=device.type), resolved_overrides
        )
        # Decided once, here: the choice lands in prepare.json, so a resumed job never re-decides.
        fresh_spec = _decide_stem_wrap(fresh_spec, dataset, resolved_overrides)
        analysis = None
        if not {"backbone", "source"} & set(resolved_overrides or {}):
            fresh_spec, analysis = _choose_backbone_and_source(
                job_spec, fresh_spec, dataset, choice_context or ChoiceContext(), device, callbacks
            )
        check_backbone_location(fresh_spec.backbone, model_dirs)
        _announce_choices(fresh_spec, callbacks)
        record = _prepared_record(
            fresh_spec, dataset, fit_preprocessing(dataset, fresh_spec.task_type)
        )
        if analysis is not None:
            record["analysis"] = analysis
        write_json(prepared_path, record)
    # Always continue from the stored JSON, so a fresh and a resumed run see identical values.
    prepared: dict[str, Any] = json.loads(prepared_path.read_text())
    rspec = ResolvedSpec.from_dict(prepared["resolved_spec"])
    check_backbone_location(rspec.backbone, model_dirs)
    return dataset, rspec, prepared


def _build_model(rspec: ResolvedSpec, info: DatasetInfo) -> OrcaModel:
    """The ORCA model with pretrained backbone weights and seeded embedder/head initialisation."""
    from orca_engine.backbones import create_backbone

    # Seed before anything is initialised (random-init backbones too) so that a resumed job
    # rebuilds exactly the model the interrupted one started from.
    seed_everything(rspec.seed)
    backbone = create_backbone(rspec.backbone, allow_random_init=rspec.allow_random_init)
    return build_model(
        info=info,
        task_type=rspec.task_type,
        out_dim=info.out_dim
        if info.task_type == rspec.task_type
        else _out_dim(info, rspec.task_type),
        backbone=backbone,
        token_budget=rspec.token_budget,
        stem_channels=rspec.embedder_stem,
        flat_head=rspec.head_flat,
        kernel_bank=rspec.embedder_kernel_bank,
        layer_mix=rspec.head_layer_mix,
        kernel_summary=rspec.head_kernel_summary,
        local_skip=rspec.head_local_skip,
        circular=rspec.embedder_circular,
        stem_layers=rspec.embedder_stem_layers,
    )


def _calibrate_embedder(
    model: OrcaModel, dataset: Dataset, rspec: ResolvedSpec, preprocessing: Preprocessing
) -> None:
    """Fit the embedder's fixed parts (a kernel bank's thresholds) on a seeded training sample.

    Deterministic in the seed, so a resumed job recomputes exactly what the first run used.
    """
    if not rspec.embedder_kernel_bank:
        return
    from orca_engine.embedders import KERNEL_BANK_CALIBRATION_SERIES

    rows = _alignment_subsample(len(dataset.x_train), KERNEL_BANK_CALIBRATION_SERIES, rspec.seed)
    x = preprocessing.normaliser.transform(np.asarray(dataset.x_train[rows]))
    model.embedder.calibrate(torch.as_tensor(x, dtype=torch.float32), seed=rspec.seed)


def _out_dim(info: DatasetInfo, task_type: str) -> int:
    # The user asked for another task type than the inferred one (e.g. regression on int labels).
    from dataclasses import replace

    return replace(info, task_type=task_type).out_dim


# --- align -----------------------------------------------------------------------------------


def _alignment_subsample(n_train: int, max_samples: int, seed: int) -> np.ndarray:
    if n_train <= max_samples:
        return np.arange(n_train)
    chosen = np.random.default_rng(seed).choice(n_train, size=max_samples, replace=False)
    return np.sort(chosen)


def _proxy_name(source: str, source_paths: Mapping[str, str | Path] | None) -> str:
    if source_paths and source in source_paths:
        return f"dataset:{source_paths[source]}"
    return source


def _run_alignment(
    model: OrcaModel,
    dataset: Dataset,
    rspec: ResolvedSpec,
    preprocessing: Preprocessing,
    *,
    workdir: Path,
    device: torch.device,
    callbacks: Callbacks,
    proxy_cache_dir: str | Path | None,
    source_paths: Mapping[str, str | Path] | None,
) -> dict[str, Any]:
    """Train the embedder towards the source proxy; returns the record stored in align_done.pt."""
    from orca_engine.align import align_embedder, alignment_labels
    from orca_engine.proxies import build_proxy

    done = load_stage(workdir / ALIGN_DONE_FILE)
    if done is not None:
        model.embedder.load_state_dict(done["embedder"])
        callbacks.event("alignment already done; reusing the aligned embedder", kind="stage")
        return dict(done["result"])

    seed_everything(rspec.seed)
    proxy = _proxy_name(rspec.source, source_paths)
    callbacks.event(
        f"building source proxy {proxy!r} ({rspec.max_samples} samples at most)", kind="log"
    )
    source = build_proxy(
        proxy,
        model.backbone,
        n_samples=rspec.max_samples,
        seed=rspec.seed,
        cache_dir=proxy_cache_dir,
    )
    subsample = _alignment_subsample(len(dataset.x_train), rspec.max_samples, rspec.seed)
    x_align = preprocessing.normaliser.transform(np.asarray(dataset.x_train[subsample]))
    y_align = np.asarray(dataset.y_train[subsample])
    labels = alignment_labels(rspec.task_type, y_align, x_align, seed=rspec.seed)
    result = align_embedder(
        model,
        x_align,
        labels,
        source,
        distance=rspec.distance,
        epochs=rspec.align_epochs,
        auto_stop=rspec.align_auto,
        lr=rspec.embedder_lr,
        seed=rspec.seed,
        device=device,
        callbacks=callbacks,
        max_samples=rspec.max_samples,
        state_path=workdir / ALIGN_STATE_FILE,
        scope=rspec.align_scope,
        keep_separation=rspec.align_keep_separation,
    )
    record = {
        "curve": [float(v) for v in result.curve],
        "before": float(result.before),
        "after": float(result.after),
        "epochs_run": int(result.epochs_run),
        "seconds": float(result.seconds),
        "source": proxy,
        "distance": rspec.distance,
        "kept_epoch": int(result.kept_epoch),
        # a class of one sample each makes the ratio infinite: stored as null (JSON has no inf)
        "separation": [float(v) if math.isfinite(v) else None for v in result.separation],
    }
    save_stage(
        workdir / ALIGN_DONE_FILE,
        {"embedder": model.embedder.state_dict(), "result": record},
    )
    return record


# --- refine as a cross-fitted ensemble --------------------------------------------------------


def _refine_ensemble(
    model: OrcaModel,
    dataset: Dataset,
    rspec: ResolvedSpec,
    *,
    device: torch.device,
    callbacks: Callbacks,
    workdir: Path,
    preprocessing: Preprocessing,
    pooled: bool,
) -> tuple[torch.nn.Module, RefineResult]:
    """Refine ``rspec.ensemble_members`` copies of the aligned ``model``, one per fold.

    Each member resumes on its own (``member-<i>/``). The returned result describes the whole
    ensemble: its validation metrics are computed on the out-of-fold predictions, its history
    is every member's epochs in turn (each record names its ``member``), its best epoch the
    first member's.
    """
    from orca_engine.ensemble import (
        EnsembleModel,
        MemberCallbacks,
        member_datasets,
        pooled_validation,
    )
    from orca_engine.refine import evaluate_split

    count = int(rspec.ensemble_members)
    splits = member_datasets(dataset, count, rspec.seed, pooled=pooled)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    members: list[OrcaModel] = []
    results: list[RefineResult] = []
    for index, member_data in enumerate(splits):
        model.load_state_dict(start)
        member_spec = rspec.model_copy(update={"seed": rspec.seed + index})
        result = refine(
            model,
            member_data,
            member_spec,
            device=device,
            callbacks=MemberCallbacks(callbacks, index, count),
            state_dir=workdir / f"member-{index}",
            preprocessing=preprocessing,
        )
        member = copy.deepcopy(model)
        member.load_state_dict(result.best_state)
        members.append(member.eval())
        results.append(result)
    ensemble = EnsembleModel(members).to(device)
    # Out-of-fold: each member scores only its own validation rows; with the user's own split
    # (not pooled) every member saw the same rows, and the ensemble is scored on them.
    if pooled:
        outputs = [
            outputs_in_chunks(
                member,
                part.x_val,
                device=device,
                transform=preprocessing.normaliser.transform,
            )
            for member, part in zip(members, splits, strict=True)
        ]
        _, y_val = pooled_validation(splits)
        metric_outputs = outputs_for_metrics(
            rspec.task_type, np.concatenate(outputs), y_val, preprocessing.target_scaler
        )
        val_metrics = compute_metrics(rspec.task_type, y_val, metric_outputs)
    else:
        val_metrics, _ = evaluate_split(
            ensemble,
            dataset.x_val,
            dataset.y_val,
            task_type=rspec.task_type,
            preprocessing=preprocessing,
            device=device,
        )
    callbacks.event(
        f"ensemble of {count}: selected epochs {[r.best_epoch for r in results]}, "
        f"{'out-of-fold' if pooled else 'validation'} {rspec.metric} "
        f"{val_metrics.get(rspec.metric, float('nan')):.4f}",
        kind="metric",
        data={
            "stage": "refine",
            "members": count,
            **{f"val_{k}": v for k, v in val_metrics.items()},
        },
    )
    first = results[0]
    summary = RefineResult(
        history=[
            {**record, "member": index + 1}
            for index, result in enumerate(results)
            for record in result.history
        ],
        best_epoch=first.best_epoch,
        best_val=val_metrics,
        best_state={},
        stopped_early=first.stopped_early,
    )
    return ensemble, summary


# --- the job ---------------------------------------------------------------------------------


def run_job(
    spec: JobSpec | dict[str, Any],
    dataset_path: str | Path,
    workdir: str | Path,
    *,
    bundle_dir: str | Path,
    callbacks: Callbacks | None = None,
    device: str | torch.device = "auto",
    proxy_cache_dir: str | Path | None = None,
    model_dirs: Sequence[str | Path] = (),
    filename: str | None = None,
    label_column: str | None = None,
    source_paths: Mapping[str, str | Path] | None = None,
    resolved_overrides: Mapping[str, Any] | None = None,
    stored_analysis: Mapping[str, Any] | None = None,
    extra_backbones: Sequence[str] = (),
) -> JobResult:
    """Run (or resume) one fine-tuning job and export its bundle to ``bundle_dir``.

    Raises :class:`~orca_engine.errors.EngineError` subclasses for problems a user can act on
    (bad spec, invalid data, backbone unavailable, out of memory, cancelled); anything else is a
    bug and propagates as is. ``resolved_overrides`` replaces resolved values the task spec does
    not expose (e.g. ``{"token_budget": 32}`` for benchmarks and tests); each is logged as a choice.
    ``stored_analysis`` (the dataset's latest transferability analysis) and ``extra_backbones``
    feed the choice of ``backbone: auto`` / ``alignment.source: auto`` (:mod:`orca_engine.analyze`).
    """
    callbacks = callbacks or Callbacks()
    job_spec = parse_spec(spec)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    started = time.monotonic()

    # prepare ----------------------------------------------------------------------------------
    callbacks.event(
        "prepare: loading and checking the dataset", kind="stage", data={"stage": "prepare"}
    )
    callbacks.progress(stage="prepare", step=0, total=1)
    dataset, rspec, prepared = _prepare(
        job_spec,
        dataset_path,
        workdir,
        device=torch_device,
        callbacks=callbacks,
        model_dirs=model_dirs,
        filename=filename,
        label_column=label_column,
        resolved_overrides=resolved_overrides,
        choice_context=ChoiceContext(
            stored_analysis=stored_analysis,
            extra_backbones=tuple(extra_backbones),
            source_paths=source_paths,
            proxy_cache_dir=proxy_cache_dir,
        ),
    )
    preprocessing = Preprocessing(
        normaliser=Normaliser.from_dict(prepared["normaliser"]),
        target_scaler=TargetScaler.from_dict(prepared["target_scaler"])
        if prepared["target_scaler"]
        else None,
    )
    hint_align = f"try a smaller alignment.max_samples (now {rspec.max_samples})"
    with out_of_memory_as_error(f"try a smaller finetune.batch_size (now {rspec.batch_size})"):
        model = _build_model(rspec, dataset.info).to(torch_device)
        _calibrate_embedder(model, dataset, rspec, preprocessing)
    callbacks.progress(stage="prepare", step=1, total=1)

    # align ------------------------------------------------------------------------------------
    align_enabled = rspec.distance != "none" and rspec.align_epochs > 0
    alignment: dict[str, Any] = {"curve": [], "before": None, "after": None}
    if align_enabled:
        callbacks.event(
            f"align: training the embedder towards {rspec.source!r} under {rspec.distance}",
            kind="stage",
            data={"stage": "align", "enabled": True},
        )
        with out_of_memory_as_error(hint_align):
            alignment = _run_alignment(
                model,
                dataset,
                rspec,
                preprocessing,
                workdir=workdir,
                device=torch_device,
                callbacks=callbacks,
                proxy_cache_dir=proxy_cache_dir,
                source_paths=source_paths,
            )
    else:
        callbacks.event(
            "align: skipped (distance none or 0 alignment epochs)",
            kind="stage",
            data={"stage": "align", "enabled": False},
        )

    # refine -----------------------------------------------------------------------------------
    callbacks.event(
        f"refine: {rspec.finetune_mode} fine-tuning for up to {rspec.finetune_epochs} epochs",
        kind="stage",
        data={"stage": "refine"},
    )
    final: torch.nn.Module = model
    if rspec.ensemble_members > 1:
        with bank_memory(model, rspec):  # the members' folds share their series
            final, refined = _refine_ensemble(
                model,
                dataset,
                rspec,
                device=torch_device,
                callbacks=callbacks,
                workdir=workdir,
                preprocessing=preprocessing,
                pooled=not dataset.info.has_val,
            )
    else:
        refined = refine(
            model,
            dataset,
            rspec,
            device=torch_device,
            callbacks=callbacks,
            state_dir=workdir,
            preprocessing=preprocessing,
        )
        model.load_state_dict(refined.best_state)
    final.eval()

    # evaluate ---------------------------------------------------------------------------------
    selected = (
        f"an ensemble of {rspec.ensemble_members} (out-of-fold"
        if rspec.ensemble_members > 1
        else f"epoch {refined.best_epoch} (val"
    )
    callbacks.event(
        f"evaluate: selected {selected} {rspec.metric} "
        f"{refined.best_val.get(rspec.metric, float('nan')):.4f})",
        kind="stage",
        data={"stage": "evaluate"},
    )
    callbacks.progress(stage="evaluate", step=0, total=1)
    test_metrics: dict[str, float] = {}
    if dataset.x_test is not None and dataset.y_test is not None and len(dataset.x_test) > 0:
        with out_of_memory_as_error(f"try a smaller finetune.batch_size (now {rspec.batch_size})"):
            outputs = outputs_in_chunks(
                final,
                dataset.x_test,
                device=torch_device,
                transform=preprocessing.normaliser.transform,
            )
        metric_outputs = outputs_for_metrics(
            rspec.task_type, outputs, dataset.y_test, preprocessing.target_scaler
        )
        test_metrics = compute_metrics(rspec.task_type, dataset.y_test, metric_outputs)
        callbacks.event(
            f"test {rspec.metric}: {test_metrics.get(rspec.metric, float('nan')):.4f}",
            kind="metric",
            data={"stage": "evaluate", **{f"test_{k}": v for k, v in test_metrics.items()}},
        )
    callbacks.progress(stage="evaluate", step=1, total=1)

    # export -----------------------------------------------------------------------------------
    callbacks.event("export: writing the model bundle", kind="stage", data={"stage": "export"})
    callbacks.progress(stage="export", step=0, total=1)
    metrics = {
        "val": refined.best_val,
        "test": test_metrics,
        "alignment": {"before": alignment["before"], "after": alignment["after"]},
    }
    curves = {
        "alignment": alignment["curve"],
        "refine": refined.history,
        "best_epoch": refined.best_epoch,
        "stopped_early": refined.stopped_early,
    }
    config = {
        "resolved_spec": prepared["resolved_spec"],
        "task_type": rspec.task_type,
        "input_kind": dataset.info.input_kind,
        "sample_shape": list(dataset.info.sample_shape),
        "label_shape": prepared["target_shape"],
        "dataset_info": prepared["info"],
        "normaliser": prepared["normaliser"],
        "target_scaler": prepared["target_scaler"],
        "label_map": prepared["label_map"],
        "backbone": rspec.backbone,
        "alignment": {k: v for k, v in alignment.items() if k != "curve"},
        "engine_version": orca_engine.__version__,
    }
    bundle = save_bundle(bundle_dir, model=final, config=config, metrics=metrics, curves=curves)
    callbacks.progress(stage="export", step=1, total=1)
    callbacks.event(
        f"done in {time.monotonic() - started:.1f}s (this attempt)",
        kind="stage",
        data={"stage": "export"},
    )
    return JobResult(
        bundle_dir=bundle,
        metrics=metrics,
        resolved_spec=prepared["resolved_spec"],
        curves=curves,
    )
