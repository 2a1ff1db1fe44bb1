"""The task spec a user submits (SPEC §4) and its resolution into concrete hyperparameters.

:class:`JobSpec` is what ``POST /v1/jobs`` accepts: every model forbids unknown fields and bounds
every number, so a bad request is refused with the field path named. :func:`resolve_spec` turns
each ``auto`` into a concrete value derived from the dataset and the device, and records one line
per choice in ``ResolvedSpec.reasons`` so a user can see why.

Defaults aim at a CPU job on a small dataset finishing in minutes:

* ``token_budget``: series 8 tokens through a 64-channel conv stem (``embedder_stem``); images
  on a text backbone (point tasks) 4 tokens through a 64-channel conv stem, more when a patch
  would exceed 8 pixels a side; other inputs 64 tokens per sample on CPU, 128 on CUDA (the
  embedder and backbone may cap it further, e.g. to the backbone's 512 positions or to the
  sample's length);
* ``head_flat``: point tasks on series and tables (text backbones) read every output token side
  by side instead of their mean; on tables (``head_layer_mix``) from a learned mix of the
  backbone's input and all its layers;
* ``embedder_kernel_bank``: series point tasks also read each patch through a fixed bank of
  dilated filters (thresholds set from the training series), projected into every token;
* ``head_kernel_summary``: with the kernel bank, the head also reads the bank's shares over the
  whole series through a Linear of its own (starting at zero), beside the body's tokens;
* ``head_local_skip``: dense series tasks also read the conv stem's output at every position
  through a Linear of their own (starting at zero), beside the per-token decoder;
* ``embedder_stem_layers``: dense series tasks get a three-layer conv stem (the second and third
  layers residual, dilated 2 and 4), so each position's local features reach about seven half
  windows each way; other stems have one layer;
* ``embedder_circular``: a dense series task whose inputs and targets both run on across the
  seam from the last position to the first (a periodic domain, checked on the training data when
  the job starts) has a conv stem that wraps around the ends instead of reading zeros;
* ``selection_start``: for classification with fewer than 100 validation rows, checkpoints are
  selected only from half the epochs on (regression: any epoch);
* ``ensemble_members``: up to 5 cross-fitted members while five runs fit in a budget of
  training-sample passes (small datasets; tables: passes times columns; dense tasks: passes
  times tokens, in a larger budget of their own), else 1;
* ``batch_size``: ``clip(n_train // 8, 8, 64)``, never more than the training rows;
* ``finetune_epochs``: enough epochs for ~500 optimisation steps on CPU (~2000 on CUDA),
  between 3 and 100 (early stopping usually ends sooner); dense tasks twice that;
* ``finetune_mode``: below 2,000 training rows only the backbone's LayerNorms train (with the
  embedder and head), from 2,000 on every weight; dense tasks train every weight at any size;
* ``lr``: AdamW 1e-4 for full fine-tuning (3e-4 for dense tasks), 1e-3 when only LayerNorms or
  the head train; SGD 10x;
* ``align_epochs``: at most 30 on CPU / 60 on CUDA, stopping when the distance plateaus.

numpy / pydantic only (no torch): the API validates specs with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from orca_engine.data import DatasetInfo, compatible_task_types
from orca_engine.errors import SpecError
from orca_engine.metrics import METRICS_FOR_TASK, default_metric

TaskType = Literal[
    "classification", "multilabel", "regression", "dense_regression", "dense_classification"
]
Metric = Literal["accuracy", "macro_f1", "auroc", "map", "mse", "rmse", "mae", "relative_l2"]
Distance = Literal["otdd", "otdd_gaussian", "ot", "mmd", "l2", "cosine", "none"]
FinetuneMode = Literal["full", "layernorm", "frozen"]
#: what a task spec may ask for: a concrete mode, or ``auto`` (resolved from the dataset size)
RequestedFinetuneMode = Literal["auto", "full", "layernorm", "frozen"]
Optimizer = Literal["adamw", "sgd"]
#: which embedder weights alignment trains (orca_engine.align.ALIGN_SCOPES)
AlignScope = Literal["embedder", "output"]

MAX_SEED = 2**31 - 1
DEFAULT_TEXT_BACKBONE = "minilm-l6"
#: registry ids whose backbone is a vision model (``timm:<arch>`` ones are too)
VISION_BACKBONES = frozenset({"tiny-vit", "tiny-swin"})
#: most positions the default backbone (MiniLM, BERT) has
BACKBONE_MAX_POSITIONS = 512

# Resolution constants (documented in the module docstring).
TOKEN_BUDGET = {"cpu": 64, "cuda": 128}
#: series get fewer, longer tokens (docs/QUALITY.md): each token then carries a stretch of shape
SEQUENCE_TOKEN_BUDGET = 8
#: channels of the conv stem in front of a series' patch projection (0 would turn it off)
SEQUENCE_STEM_CHANNELS = 64
#: point tasks on series read every token side by side, not their mean (docs/QUALITY.md,
#: session 6: ArrowHead 0.741 -> 0.789, GunPoint 0.940 -> 0.920)
SEQUENCE_FLAT_HEAD = True
#: ... and their tokens also carry a fixed kernel bank's per-patch shares (docs/QUALITY.md,
#: session 9)
SEQUENCE_KERNEL_BANK = True
#: point tasks on tables read by a text body read each feature's token side by side too
#: (docs/QUALITY.md, session 10)
TABLE_FLAT_HEAD = True
#: inputs whose flat head reads a learned mix of the body's input and all its layers instead of
#: the last layer alone (docs/QUALITY.md, session 10)
LAYER_MIX_INPUTS = frozenset({"tabular"})
#: images read by a text backbone get few tokens too, each built by a conv stem from a patch and
#: its neighbours (docs/QUALITY.md, session 5: 8x8 digits 0.77 at 64 one-pixel tokens, 0.98 at
#: 16 tokens of 2x2, 0.99 at 4 tokens of 4x4)
IMAGE_TOKEN_BUDGET = 4
IMAGE_STEM_CHANNELS = 64
#: ... unless patches would then exceed this side: a larger image gets more tokens instead (up to
#: TOKEN_BUDGET), keeping patches near what vision transformers use on small images (a guard,
#: not a measurement: the only images that ship here are 8x8)
IMAGE_MAX_PATCH = 8
#: below this many validation samples, one lucky sample can crown an under-trained early epoch,
#: so checkpoints are selected only from the early-stopping floor on
SMALL_VAL_SPLIT = 100
#: where selection starts on a small validation split (the early-stopping floor, refine.py)
LATE_SELECTION_START = 0.5
#: ... for classification only: a regression error is continuous, so one sample cannot crown an
#: epoch, and on small tables the best epoch came early (docs/QUALITY.md, session 5)
REGRESSION_TASKS = ("regression", "dense_regression")
TARGET_STEPS = {"cpu": 500, "cuda": 2000}
ALIGN_EPOCH_CAP = {"cpu": 30, "cuda": 60}
#: why ``alignment.keep_separation: auto`` is on (docs/QUALITY.md, session 25)
KEEP_SEPARATION_REASON = (
    "alignment hands on the embedder closest to the source proxy among those that keep the "
    "classes (or the k-means pseudo-classes of a regression) at least as far apart as they "
    "began, the embedder before alignment included: the proxy's own classes barely separate, "
    "and matching them drew the task's classes together on 14 of the 19 quality-suite sets"
)
MIN_FINETUNE_EPOCHS, MAX_FINETUNE_EPOCHS = 3, 100
#: dense tasks train this many times the epochs a point task of the same size gets: on two 1D
#: fields they were still underfitting at the point budget (docs/QUALITY.md, session 14)
DENSE_EPOCH_FACTOR = 2
MIN_BATCH, MAX_BATCH = 8, 64
#: ``finetune.mode: auto`` tunes only the body's LayerNorms (plus embedder and head) below this
#: many training rows, and every weight from here on (docs/QUALITY.md, session 4); dense tasks
#: train every weight at any size (session 14)
LAYERNORM_BELOW_ROWS = 2000
ADAMW_LR = {"full": 1e-4, "layernorm": 1e-3, "frozen": 1e-3}
#: dense tasks training every weight start at this many times the ``full`` rate: on three 1D
#: fields it lowered the error on two (every seed) and was level on the third (QUALITY.md, s15)
DENSE_FULL_LR_FACTOR = 3.0
SGD_LR_FACTOR = 10.0
EMBEDDER_LR = 1e-3
WEIGHT_DECAY = {"adamw": 0.01, "sgd": 0.0}
WARMUP_FRACTION = 0.05
#: classification targets are softened by this much (auto); over-confident fits on a few dozen
#: samples are what it counters
LABEL_SMOOTHING = 0.1
#: the weight average spans about this share of all optimizer steps (auto), within the bounds
EMA_HORIZON_FRACTION = 0.1
EMA_HORIZON_STEPS = (10, 500)
#: input kinds whose training batches get label-preserving perturbations (orca_engine.augment)
AUGMENTABLE_KINDS = ("seq1d", "image2d")
#: Off by default, like augmentation: measured on three UCR sets (docs/QUALITY.md), label
#: smoothing 0.1 plus weight averaging was no better than without, and varied more across seeds.
#: They stay available as resolved values for benchmarks (``resolved_overrides``).
AUGMENT_BY_DEFAULT = False
SMOOTH_AND_AVERAGE_BY_DEFAULT = False
#: at most this many cross-fitted members (orca_engine/ensemble.py) ...
ENSEMBLE_MAX_MEMBERS = 5
#: ... as many as fit in this many training-sample passes (steps x batch) for the whole ensemble:
#: five members of a ~500-step, batch-8 job on CPU (minutes on 2 cores); a large dataset's
#: single run already spends it, so it gets one model
ENSEMBLE_PASS_BUDGET = {"cpu": 25_000, "cuda": 5 * 2000 * 64}
#: Tables count passes times tokens (one per column, up to the token budget), since a table's
#: cost grows with its columns: five runs over a 10-column table of ~250 training rows (~760,000)
#: took 340 s on the 2-core CPU, as long as a five-member series job, and gained 1.8 RMSE over
#: one model (docs/QUALITY.md, session 11); one run over a 30-column table of ~320 rows
#: (~590,000) already takes ~280 s, so it stays one model
TABLE_ENSEMBLE_TOKEN_PASS_BUDGET = {"cpu": 1_000_000, "cuda": ENSEMBLE_PASS_BUDGET["cuda"] * 64}
#: Dense tasks get a budget of their own, in passes times tokens (a 2D map at 64 tokens costs
#: eight times a 1D field at 8): three cross-fitted members lowered the error on 280-row 1D fields,
#: where one run takes ~28,000 passes of 8 tokens (docs/QUALITY.md, sessions 15-16), and three
#: such runs took 389 s on the 2-core CPU. The budget buys three at that size (224 training rows
#: after the validation share), five up to ~140 rows, two up to ~350 and one model beyond; a
#: dense run costs at most ~65,000 passes (TARGET_STEPS caps its steps)
DENSE_ENSEMBLE_TOKEN_PASS_BUDGET = {
    "cpu": 720_000,
    "cuda": ENSEMBLE_PASS_BUDGET["cuda"] * SEQUENCE_TOKEN_BUDGET,
}
# Share of train held out for validation when the upload has none (load_dataset's default).
VAL_FRACTION = 0.2

_Strict = ConfigDict(extra="forbid", validate_default=True)


def _auto_or_number(
    value: Any, *, kind: type, low: float, high: float, low_exclusive: bool = False
) -> Any:
    """Accept ``"auto"`` or a number of ``kind`` in range, with one clear message otherwise."""
    if value == "auto":
        return value
    low_text = f"greater than {low:g}" if low_exclusive else f"at least {low:g}"
    expected = (
        f"'auto' or {'an integer' if kind is int else 'a number'} {low_text} and at most {high:g}"
    )
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    valid = is_number and not (kind is int and isinstance(value, float) and not value.is_integer())
    if valid:
        too_low = value <= low if low_exclusive else value < low
        valid = not too_low and value <= high and math.isfinite(value)
    if not valid:
        raise PydanticCustomError(
            "auto_or_number",
            "must be {expected}, got {value}",
            {"expected": expected, "value": repr(value)},
        )
    return int(value) if kind is int else float(value)


def _reject_control_characters(value: str) -> str:
    if any(ord(char) < 32 for char in value):
        raise PydanticCustomError("control_characters", "must not contain control characters")
    return value


class TaskConfig(BaseModel):
    """What to learn and which validation metric selects the checkpoint."""

    model_config = _Strict

    # One Literal (nested ones flatten) so a bad value yields one error listing every choice.
    type: Literal["auto", TaskType] = "auto"
    metric: Literal["auto", Metric] = "auto"


class AlignmentConfig(BaseModel):
    """Stage 2: train the embedder to match a source proxy under a dataset distance."""

    model_config = _Strict

    distance: Distance = "otdd"
    source: Annotated[str, Field(min_length=1, max_length=1000)] = "auto"
    epochs: Literal["auto"] | Annotated[int, Field(ge=0, le=10_000)] = "auto"
    max_samples: Annotated[int, Field(ge=10, le=100_000, strict=True)] = 5000
    #: which embedder weights alignment trains: every one, or only positions + output LayerNorm
    scope: AlignScope = "embedder"
    #: hand on only an embedder that keeps the classes at least as far apart as they began
    keep_separation: Literal["auto"] | Annotated[bool, Field(strict=True)] = "auto"

    @field_validator("epochs", mode="before")
    @classmethod
    def _check_epochs(cls, value: Any) -> Any:
        return _auto_or_number(value, kind=int, low=0, high=10_000)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        return _reject_control_characters(value)


class FinetuneConfig(BaseModel):
    """Stage 3: fine-tune on the task loss."""

    model_config = _Strict

    mode: RequestedFinetuneMode = "auto"
    epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=10_000)] = "auto"
    lr: Literal["auto"] | Annotated[float, Field(gt=0, le=1)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=4096)] = "auto"
    optimizer: Optimizer = "adamw"
    early_stopping_patience: Annotated[int, Field(ge=0, le=1000, strict=True)] = 10
    #: cross-fitted models refined and averaged; ``auto``: up to 5 on small datasets, else 1
    ensemble_members: Literal["auto"] | Annotated[int, Field(ge=1, le=10)] = "auto"

    @field_validator("epochs", mode="before")
    @classmethod
    def _check_epochs(cls, value: Any) -> Any:
        return _auto_or_number(value, kind=int, low=1, high=10_000)

    @field_validator("ensemble_members", mode="before")
    @classmethod
    def _check_members(cls, value: Any) -> Any:
        return _auto_or_number(value, kind=int, low=1, high=10)

    @field_validator("lr", mode="before")
    @classmethod
    def _check_lr(cls, value: Any) -> Any:
        return _auto_or_number(value, kind=float, low=0, high=1, low_exclusive=True)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _check_batch_size(cls, value: Any) -> Any:
        return _auto_or_number(value, kind=int, low=1, high=4096)


class JobSpec(BaseModel):
    """The body of ``POST /v1/jobs`` (SPEC §4). Every field but ``dataset_id`` has a default."""

    model_config = _Strict

    dataset_id: Annotated[str, Field(min_length=1, max_length=200)]
    name: Annotated[str, Field(max_length=200)] | None = None
    task: TaskConfig = Field(default_factory=TaskConfig)
    backbone: Annotated[str, Field(min_length=1, max_length=1000)] = "auto"
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)] = 0
    queue: Literal["auto", "gpu", "cpu"] = "auto"
    allow_random_init: Annotated[bool, Field(strict=True)] = False

    @field_validator("backbone", "name")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        return None if value is None else _reject_control_characters(value)


#: resolved fields of levers measured and not adopted (docs/QUALITY.md, sessions 5 and 6), with
#: the value every stored spec holds unless a benchmark turned the lever on
RETIRED_FIELDS: dict[str, Any] = {
    "augment_shift": True,
    "embedder_derivative": False,
    "embedder_stem_scales": 1,
    "embedder_pooled": False,
}


class ResolvedSpec(BaseModel):
    """A job's hyperparameters with every ``auto`` made concrete; stored with the job and bundle."""

    model_config = ConfigDict(extra="forbid")

    task_type: TaskType
    metric: Metric
    backbone: str
    source: str
    distance: Distance
    align_epochs: Annotated[int, Field(ge=0)]
    align_auto: bool
    max_samples: Annotated[int, Field(ge=1)]
    #: embedder weights alignment trained (older jobs trained every one)
    align_scope: AlignScope = "embedder"
    #: alignment handed on only an embedder that kept the classes apart (older jobs: off)
    align_keep_separation: bool = False
    finetune_mode: FinetuneMode
    finetune_epochs: Annotated[int, Field(ge=1)]
    lr: Annotated[float, Field(gt=0)]
    embedder_lr: Annotated[float, Field(gt=0)]
    batch_size: Annotated[int, Field(ge=1)]
    optimizer: Optimizer
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)]
    early_stopping_patience: Annotated[int, Field(ge=0)]
    # Recipe fields added after the first release; their defaults reproduce older jobs.
    augment: bool = False
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    #: channels of the sequence or image embedder's conv stem (0: patches are projected directly)
    embedder_stem: Annotated[int, Field(ge=0)] = 0
    #: series: fixed dilated filters (calibrated on training data) add per-patch features
    embedder_kernel_bank: bool = False
    #: with the kernel bank, point tasks: the head also reads its shares over the whole series
    head_kernel_summary: bool = False
    #: dense series tasks: the head also reads the embedder stem's output at every position
    head_local_skip: bool = False
    #: series: the embedder's conv stem wraps around the ends (periodic domain), not zero-padded
    embedder_circular: bool = False
    #: series: layers of the conv stem (after the first, each a residual one dilated twice as far)
    embedder_stem_layers: Annotated[int, Field(ge=1, le=4)] = 1
    #: point tasks: the head reads every token side by side, not their mean
    head_flat: bool = False
    #: with head_flat: the head reads a learned mix of every body layer, not the last alone
    head_layer_mix: bool = False
    #: share of the fine-tuning epochs before which no checkpoint is selected
    selection_start: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: mixup strength for single-label classification (0: off)
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0
    #: cross-fitted members refined from the aligned model and averaged (1: a single model)
    ensemble_members: Annotated[int, Field(ge=1, le=10)] = 1
    token_budget: Annotated[int, Field(ge=1)]
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    allow_random_init: bool = False
    reasons: dict[str, str] = Field(default_factory=dict)
    dataset_id: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedSpec:
        """Validate a stored spec; fields of retired levers are dropped while they are neutral."""
        data = dict(data)
        for name, neutral in RETIRED_FIELDS.items():
            if name in data and data.pop(name) != neutral:
                raise SpecError(
                    f"this spec turns on {name!r}, a recipe option measured and removed in "
                    "engine 2026-12-03 (docs/QUALITY.md); resubmit the job without it",
                    param=name,
                )
        return cls.model_validate(data)


def validation_issues(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as ``{"field": "finetune.lr", "message": ...}`` lines a user can act on."""
    issues = []
    for error in exc.errors(include_url=False):
        # Drop the union-member tags pydantic appends to the location ("int", "literal['auto']").
        path = [str(part) for part in error["loc"] if not _is_union_tag(part)]
        field_path = ".".join(path) or "body"
        if error["type"] == "extra_forbidden":
            message = f"unknown field {field_path!r}"
        elif error["type"] == "missing":
            message = f"{field_path} is required"
        else:
            message = f"{field_path}: {error['msg']}"
        issues.append({"field": field_path, "message": message})
    return issues


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("int", "float", "str", "bool", "constrained-int", "constrained-float")
        or part.startswith(("literal[", "function-"))
    )


def parse_spec(data: dict[str, Any] | JobSpec) -> JobSpec:
    """A :class:`JobSpec` from a dict, raising :class:`SpecError` naming the first bad field."""
    if isinstance(data, JobSpec):
        return data
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        issues = validation_issues(exc)
        message = "; ".join(issue["message"] for issue in issues)
        raise SpecError(message, param=issues[0]["field"] if issues else None) from exc


def backbone_family(name: str) -> str:
    """``"vision"`` for ``timm:`` ids and the tiny ViT/Swin, ``"text"`` for everything else."""
    return "vision" if name.startswith("timm:") or name in VISION_BACKBONES else "text"


def augmentation_applies(input_kind: str, task_type: str) -> bool:
    """Whether training batches of this input kind and task get perturbed (see ``augment``).

    Sequences and images have label-preserving moves (scale, jitter, shift); table rows do not,
    and moving a dense task's input would need the same move on its label map.
    """
    return input_kind in AUGMENTABLE_KINDS and not task_type.startswith("dense_")


#: conv stem layers for dense series tasks (docs/QUALITY.md, session 21); other stems have one
DENSE_STEM_LAYERS = 3


def dense_series_stem(task_type: str, input_kind: str, embedder_stem: int) -> bool:
    """A dense task on series with a conv stem: where the head reads the stem at every position
    (``head_local_skip``), the stem is deeper (``embedder_stem_layers``) and may wrap around a
    periodic domain (``embedder_circular``).
    """
    return task_type.startswith("dense_") and input_kind == "seq1d" and embedder_stem > 0


def stem_layers_for(task_type: str, input_kind: str, embedder_stem: int) -> int:
    """The conv stem's depth an ``auto`` job gets: :data:`DENSE_STEM_LAYERS` for a dense series
    task with a stem, one layer otherwise."""
    return DENSE_STEM_LAYERS if dense_series_stem(task_type, input_kind, embedder_stem) else 1


def ema_decay_for(total_steps: int) -> float:
    """Weight-average decay whose horizon ``1 / (1 - decay)`` is ~10% of the run's steps."""
    low, high = EMA_HORIZON_STEPS
    horizon = min(max(round(total_steps * EMA_HORIZON_FRACTION), low), high)
    return 1.0 - 1.0 / horizon


def _device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def effective_train_size(info: DatasetInfo, val_fraction: float = VAL_FRACTION) -> int:
    """Training rows once a validation share is held out (when the upload has no val split)."""
    n_train = int(info.splits.get("train", 0))
    if info.has_val or int(info.splits.get("val", 0)) > 0:
        return max(1, n_train)
    return max(1, n_train - max(1, round(n_train * val_fraction)))


def validation_size(info: DatasetInfo, val_fraction: float = VAL_FRACTION) -> int:
    """Validation rows: the upload's own split, or the share held out of train."""
    n_train = int(info.splits.get("train", 0))
    if info.has_val or int(info.splits.get("val", 0)) > 0:
        return int(info.splits.get("val", 0))
    return max(1, round(n_train * val_fraction)) if n_train > 1 else 0


def _check_compatibility(spec: JobSpec, info: DatasetInfo, task_type: str, metric: str) -> None:
    allowed_tasks = compatible_task_types(info)
    if task_type not in allowed_tasks:
        dense_asked = task_type.startswith("dense_")
        dense_labels = info.task_type.startswith("dense_")
        if dense_asked and not dense_labels:
            why = "dense tasks need a per-position label map with the spatial shape of x"
        elif dense_labels and not dense_asked:
            why = "the labels are per-position maps, so the task must be dense"
        else:
            why = f"the labels look like {info.task_type} ({info.label_kind} values)"
        raise SpecError(
            f"task type {task_type!r} does not fit this dataset: {why}; possible: "
            f"{', '.join(allowed_tasks)}",
            param="task.type",
        )
    if metric not in METRICS_FOR_TASK[task_type]:
        raise SpecError(
            f"metric {metric!r} does not apply to {task_type}; choose one of "
            f"{', '.join(METRICS_FOR_TASK[task_type])}",
            param="task.metric",
        )
    if spec.alignment.distance == "none" and spec.alignment.epochs not in ("auto", 0):
        raise SpecError(
            "alignment.distance 'none' skips alignment, so alignment.epochs must be 'auto' or 0",
            param="alignment.epochs",
        )
    if spec.alignment.distance == "none" and spec.alignment.scope != "embedder":
        raise SpecError(
            "alignment.distance 'none' skips alignment, so alignment.scope has nothing to choose",
            param="alignment.scope",
        )
    if spec.alignment.distance == "none" and spec.alignment.keep_separation is True:
        raise SpecError(
            "alignment.distance 'none' skips alignment, so there is no separation to keep",
            param="alignment.keep_separation",
        )


def image_token_budget(sample_shape: Sequence[int], cap: int) -> int:
    """Tokens for a ``(C, H, W)`` image on a text backbone: IMAGE_TOKEN_BUDGET, or as many as
    keep patches within IMAGE_MAX_PATCH a side, never above ``cap``."""
    height, width = int(sample_shape[-2]), int(sample_shape[-1])
    cells = math.ceil(height / IMAGE_MAX_PATCH) * math.ceil(width / IMAGE_MAX_PATCH)
    return min(max(IMAGE_TOKEN_BUDGET, cells), cap)


def _point_task_on_text_body(task_type: str, family: str) -> bool:
    """Point tasks read by a text body (one output token per input token)."""
    return not task_type.startswith("dense_") and family != "vision"


def _series_point_task(input_kind: str, task_type: str, family: str) -> bool:
    """Point tasks on series read by a text body: where the flat head and kernel bank apply."""
    return input_kind == "seq1d" and _point_task_on_text_body(task_type, family)


def flat_head_applies(input_kind: str, task_type: str, *, family: str) -> bool:
    """Whether ``auto`` gives a point task a flat head: series and tables read by a text body."""
    enabled = {"seq1d": SEQUENCE_FLAT_HEAD, "tabular": TABLE_FLAT_HEAD}.get(input_kind, False)
    return enabled and _point_task_on_text_body(task_type, family)


def kernel_bank_applies(input_kind: str, task_type: str, *, family: str) -> bool:
    """Whether ``auto`` gives this input a fixed kernel bank: point tasks on series, text bodies."""
    return SEQUENCE_KERNEL_BANK and _series_point_task(input_kind, task_type, family)


def embedder_recipe(
    input_kind: str,
    sample_shape: Sequence[int],
    task_type: str,
    *,
    family: str,
    device_kind: str,
) -> tuple[int, int, str, str]:
    """``auto``'s token budget and conv-stem channels for one input on one backbone family.

    Returns ``(token_budget, stem_channels, budget_reason, stem_reason)``. Jobs resolve their
    embedder through this, and so does the standalone analysis, so that what it measures is the
    embedder a job on the same data would train.
    """
    general_budget = min(TOKEN_BUDGET[device_kind], BACKBONE_MAX_POSITIONS)
    stem = 0
    if input_kind == "seq1d":
        budget, stem = SEQUENCE_TOKEN_BUDGET, SEQUENCE_STEM_CHANNELS
        budget_reason = (
            f"{budget} tokens per series, each a stretch of the series seen through a conv "
            "stem (measured in docs/QUALITY.md; the embedder may use fewer)"
        )
    elif input_kind == "image2d" and family != "vision" and not task_type.startswith("dense_"):
        budget = image_token_budget(sample_shape, general_budget)
        stem = IMAGE_STEM_CHANNELS
        budget_reason = (
            f"{budget} tokens per image, each a patch seen through a conv stem (measured "
            f"in docs/QUALITY.md; more only when a patch would exceed {IMAGE_MAX_PATCH} pixels "
            "a side)"
        )
    else:
        budget = general_budget
        budget_reason = f"{budget} tokens per sample on {device_kind} (the embedder may use fewer)"
    stem_reason = (
        f"a {stem}-channel conv stem gives each token local shape features"
        if stem
        else f"no stem for {input_kind} inputs"
        + (" on a vision backbone" if family == "vision" else "")
        + (f" on {task_type}" if task_type.startswith("dense_") else "")
    )
    return budget, stem, budget_reason, stem_reason


def sequence_patch_size(length: int, max_tokens: int) -> int:
    """Smallest patch length p with ``ceil(length / p) <= max_tokens``.

    Here (torch-free) so that resolution can count the tokens the embedder will make.
    """
    return max(1, math.ceil(length / max(1, max_tokens)))


def table_tokens(n_columns: int, token_budget: int) -> int:
    """Tokens the embedder makes of a table row: one per column, or column groups past the budget."""
    return math.ceil(n_columns / sequence_patch_size(n_columns, token_budget))


def resolve_spec(
    spec: JobSpec | dict[str, Any],
    info: DatasetInfo,
    *,
    device: str = "cpu",
    vision_backbone: str | None = None,
) -> ResolvedSpec:
    """Every ``auto`` in ``spec`` made concrete for this dataset and device, with reasons.

    ``vision_backbone`` (a registry id) is the default backbone for image inputs when the service
    has one; otherwise every modality defaults to the text backbone (ORCA's cross-modal setting).
    Raises :class:`SpecError` (``param`` names the field) for impossible combinations.
    """
    spec = parse_spec(spec)
    kind = _device_kind(device)
    reasons: dict[str, str] = {}

    task_type: str = spec.task.type
    if task_type == "auto":
        task_type = info.task_type
        reasons["task_type"] = (
            f"inferred from the labels ({info.label_kind} values, shape {list(info.label_shape)})"
        )
    metric: str = spec.task.metric
    if metric == "auto":
        metric = default_metric(task_type)
        reasons["metric"] = f"default for {task_type}"
    _check_compatibility(spec, info, task_type, metric)

    backbone = spec.backbone
    if backbone == "auto":
        if info.input_kind == "image2d" and vision_backbone:
            backbone = vision_backbone
            reasons["backbone"] = "image inputs and a vision backbone is available"
        else:
            backbone = DEFAULT_TEXT_BACKBONE
            reasons["backbone"] = (
                f"default pretrained backbone ({DEFAULT_TEXT_BACKBONE}); ORCA transfers it to "
                f"{info.input_kind} inputs"
            )
    family = backbone_family(backbone)
    source = spec.alignment.source
    if source == "auto":
        source = "natural-images" if family == "vision" else "english-text"
        reasons["source"] = f"proxy matching the {family} backbone's pretraining data"

    distance = spec.alignment.distance
    if distance == "none":
        align_epochs, align_auto = 0, False
        reasons["align_epochs"] = "distance 'none' skips embedder alignment"
    elif spec.alignment.epochs == "auto":
        align_epochs, align_auto = ALIGN_EPOCH_CAP[kind], True
        reasons["align_epochs"] = (
            f"up to {align_epochs} epochs on {kind}, stopping early when the distance plateaus; "
            "ORCA's stage 2, run on every job. With keep_separation on, the embedder handed on "
            "is the closest to the proxy that keeps the classes apart: on the 19 sets of the "
            "quality suite that was the embedder before alignment on most point sets (their "
            "classes merged, and without alignment they scored as well or better) and the last "
            "one on the two periodic fields, where alignment cut the error by a tenth to a fifth "
            "(docs/QUALITY.md, session 25); set alignment.distance 'none' to skip it"
        )
    else:
        align_epochs, align_auto = int(spec.alignment.epochs), False
    keep_separation = spec.alignment.keep_separation
    if distance == "none":
        keep_separation = False
    elif keep_separation == "auto":
        keep_separation = True
        reasons["align_keep_separation"] = KEEP_SEPARATION_REASON

    n_train = effective_train_size(info)
    batch_size: int | str = spec.finetune.batch_size
    if batch_size == "auto":
        batch_size = min(max(n_train // 8, MIN_BATCH), MAX_BATCH, n_train)
        reasons["batch_size"] = (
            f"clip(n_train // 8, {MIN_BATCH}, {MAX_BATCH}) for {n_train} training samples"
        )
    # dense tasks (per-position labels) get their own epochs and mode rules below
    dense = task_type.startswith("dense_")
    finetune_epochs = spec.finetune.epochs
    if finetune_epochs == "auto":
        steps_per_epoch = math.ceil(n_train / int(batch_size))
        wanted = math.ceil(TARGET_STEPS[kind] / steps_per_epoch)
        point_epochs = min(max(wanted, MIN_FINETUNE_EPOCHS), MAX_FINETUNE_EPOCHS)
        finetune_epochs = point_epochs * (DENSE_EPOCH_FACTOR if dense else 1)
        reasons["finetune_epochs"] = (
            f"about {TARGET_STEPS[kind]} optimisation steps on {kind} at {steps_per_epoch} steps "
            f"per epoch, within [{MIN_FINETUNE_EPOCHS}, {MAX_FINETUNE_EPOCHS}]"
        )
        if dense:
            reasons["finetune_epochs"] += (
                f", times {DENSE_EPOCH_FACTOR} for a dense task: at the point tasks' budget "
                "its training error was still level with its validation error, and twice the "
                "epochs lowered both (docs/QUALITY.md)"
            )
    mode: str = spec.finetune.mode
    if mode == "auto":
        mode = "full" if dense or n_train >= LAYERNORM_BELOW_ROWS else "layernorm"
        if dense:
            reasons["finetune_mode"] = (
                "dense task: every sample supervises every position, so all weights train "
                "whatever the size; on two small 1D fields this cut the mean relative error by "
                "a quarter to two fifths against LayerNorms only (docs/QUALITY.md)"
            )
        else:
            reasons["finetune_mode"] = f"{n_train} training samples: " + (
                f"fewer than {LAYERNORM_BELOW_ROWS}, so only the backbone's LayerNorms train "
                "(with the embedder and head): on sets this small, training every weight was "
                "no better and slower (docs/QUALITY.md)"
                if mode == "layernorm"
                else f"at least {LAYERNORM_BELOW_ROWS}, so all weights train"
            )
    optimizer = spec.finetune.optimizer
    lr = spec.finetune.lr
    if lr == "auto":
        lr = ADAMW_LR[mode] * (SGD_LR_FACTOR if optimizer == "sgd" else 1.0)
        trained = {
            "full": "all weights train",
            "layernorm": "only LayerNorms, embedder and head train",
            "frozen": "only the head trains",
        }[mode]
        reasons["lr"] = f"{optimizer} with mode {mode} ({trained})"
        if dense and mode == "full":
            # rounded, so the stored spec reads 3e-4, not 3.0000000000000003e-4
            lr = float(f"{lr * DENSE_FULL_LR_FACTOR:.12g}")
            reasons["lr"] += (
                f", times {DENSE_FULL_LR_FACTOR:g} for a dense task: on three 1D fields this "
                "lowered the error on two and was level on the third (docs/QUALITY.md)"
            )
    token_budget, embedder_stem, budget_reason, stem_reason = embedder_recipe(
        info.input_kind, info.sample_shape, task_type, family=family, device_kind=kind
    )
    reasons["token_budget"], reasons["embedder_stem"] = budget_reason, stem_reason
    head_flat = flat_head_applies(info.input_kind, task_type, family=family)
    reasons["head_flat"] = (
        "the head reads every token side by side, keeping which "
        + ("stretch of the series" if info.input_kind == "seq1d" else "column")
        + " a feature came from (measured in docs/QUALITY.md)"
        if head_flat
        else "the head averages the tokens"
    )
    head_layer_mix = head_flat and info.input_kind in LAYER_MIX_INPUTS
    reasons["head_layer_mix"] = (
        "the head reads a learned mix of the backbone's input and every layer's output, "
        "starting even (measured in docs/QUALITY.md)"
        if head_layer_mix
        else "the head reads the backbone's last layer"
    )
    kernel_bank = kernel_bank_applies(info.input_kind, task_type, family=family)
    reasons["embedder_kernel_bank"] = (
        "each token also reads its stretch through 84 fixed filters at several dilations, as "
        "the shares of positions above thresholds set from the training series (measured in "
        "docs/QUALITY.md)"
        + (
            "; with several channels, up to four small channel subsets per filter and dilation"
            if info.sample_shape[0] > 1
            else ""
        )
        if kernel_bank
        else "no fixed kernel bank"
        + (f" for {info.input_kind} inputs" if info.input_kind != "seq1d" else "")
        + (" on a vision backbone" if family == "vision" else "")
        + (f" on {task_type}" if task_type.startswith("dense_") else "")
    )
    head_kernel_summary = kernel_bank
    reasons["head_kernel_summary"] = (
        "the head also reads the bank's shares over the whole series (MiniRocket's features) "
        "through a Linear of its own beside the body's tokens (measured in docs/QUALITY.md)"
        if head_kernel_summary
        else "no kernel bank to summarise"
    )
    dense_series = task_type.startswith("dense_") and info.input_kind == "seq1d"
    head_local_skip = dense_series_stem(task_type, info.input_kind, embedder_stem)
    reasons["head_local_skip"] = (
        "each output position also reads the conv stem's features at that position through a "
        "Linear of its own (starting at zero) beside the per-token decoder (measured in "
        "docs/QUALITY.md)"
        if head_local_skip
        else "no conv stem to read"
        if dense_series
        else "only dense series tasks read the stem at every position"
    )
    embedder_stem_layers = stem_layers_for(task_type, info.input_kind, embedder_stem)
    # the stem's layer i (from 1) is dilated 2**i (orca_engine.embedders.local_stem)
    dilations = " and ".join(str(2**layer) for layer in range(1, DENSE_STEM_LAYERS))
    reasons["embedder_stem_layers"] = (
        f"{DENSE_STEM_LAYERS} stem layers, the later ones residual and dilated {dilations}, so each "
        "position's local features reach further along the series (measured in docs/QUALITY.md)"
        if head_local_skip
        else "no conv stem to deepen"
        if dense_series
        else "one stem layer: only dense series tasks get a deeper stem"
    )
    reasons["embedder_circular"] = (
        "decided from the training data when the job starts (a periodic domain wraps around)"
        if head_local_skip
        else "no conv stem to wrap"
        if dense_series
        else "only dense series tasks are checked for a periodic domain"
    )
    n_val = validation_size(info)
    regression = task_type in REGRESSION_TASKS
    selection_start = LATE_SELECTION_START if n_val < SMALL_VAL_SPLIT and not regression else 0.0
    reasons["selection_start"] = (
        f"checkpoints are selected from epoch {math.ceil(selection_start * int(finetune_epochs))} "
        f"on: {n_val} validation samples are too few to trust an early epoch's score"
        if selection_start
        else f"any epoch may be selected: a {task_type} error moves smoothly, and its best epoch "
        "is often an early one (docs/QUALITY.md)"
        if regression and n_val < SMALL_VAL_SPLIT
        else f"any epoch may be selected ({n_val} validation samples)"
    )
    reasons["embedder_lr"] = "fixed learning rate for training the embedder during alignment"
    reasons["weight_decay"] = f"standard for {optimizer}"
    # Off by default: measured on three UCR sets (docs/QUALITY.md), scale+jitter+shift cost
    # ItalyPowerDemand ~30 points (its classes differ in *when* demand peaks) and helped none.
    augment = AUGMENT_BY_DEFAULT and augmentation_applies(info.input_kind, task_type)
    reasons["augment"] = (
        "training batches are scaled, jittered and shifted (sequences) or translated (images)"
        if augment
        else "off: time shifts can change the label of series whose class is a timing "
        "(measured in docs/QUALITY.md)"
        if augmentation_applies(info.input_kind, task_type)
        else f"no label-preserving perturbation for {info.input_kind} inputs on {task_type}"
    )
    smooth_and_average = SMOOTH_AND_AVERAGE_BY_DEFAULT
    label_smoothing = (
        LABEL_SMOOTHING if smooth_and_average and task_type == "classification" else 0.0
    )
    reasons["label_smoothing"] = (
        f"{LABEL_SMOOTHING} against over-confident fits on small training sets"
        if label_smoothing
        else "off: measured no better on small series sets (docs/QUALITY.md)"
        if task_type == "classification"
        else f"only single-label classification is smoothed, not {task_type}"
    )
    total_steps = int(finetune_epochs) * math.ceil(n_train / int(batch_size))
    passes = total_steps * int(batch_size)
    cost, budget, unit = passes, ENSEMBLE_PASS_BUDGET[kind], "training-sample passes"
    if dense:
        cost *= min(token_budget, math.prod(info.sample_shape[1:]))
        budget = DENSE_ENSEMBLE_TOKEN_PASS_BUDGET[kind]
        unit = "token passes (samples x tokens) of a dense task"
    elif info.input_kind == "tabular":
        cost *= table_tokens(info.sample_shape[0], token_budget)
        budget, unit = TABLE_ENSEMBLE_TOKEN_PASS_BUDGET[kind], "token passes (samples x columns)"
    ensemble_members = max(1, min(ENSEMBLE_MAX_MEMBERS, budget // cost))
    if n_train + validation_size(info) < 2 * ENSEMBLE_MAX_MEMBERS:
        ensemble_members = 1  # too few rows for folds with something in each
    if spec.finetune.ensemble_members != "auto":
        ensemble_members = int(spec.finetune.ensemble_members)
        pooled_rows = n_train + validation_size(info)
        folds = max(ensemble_members, ENSEMBLE_MAX_MEMBERS)
        if ensemble_members > 1 and not info.has_val and pooled_rows < 2 * folds:
            raise SpecError(
                f"finetune.ensemble_members {ensemble_members} cuts the training rows into "
                f"{folds} folds, which needs at least {2 * folds} rows; this dataset has "
                f"{pooled_rows}. Use 1, or upload a validation split.",
                param="finetune.ensemble_members",
            )
    else:
        reasons["ensemble_members"] = (
            f"{ensemble_members} cross-fitted members, each validated on its own fold and averaged: "
            "one small-data run swings with its split (docs/QUALITY.md)"
            if ensemble_members > 1
            else f"one model: one run takes {cost} {unit}, and an ensemble may "
            f"spend {budget} on {kind}"
            if cost * 2 > budget
            else "one model: too few rows to cut folds"
        )
    ema_decay = ema_decay_for(total_steps) if smooth_and_average else 0.0
    reasons["ema_decay"] = (
        f"validation and the kept model use a weight average over ~{round(1 / (1 - ema_decay))} "
        f"of {total_steps} steps"
        if ema_decay
        else "off: the live weights are evaluated and kept (averaging measured no better)"
    )

    return ResolvedSpec.model_validate(
        dict(
            task_type=task_type,
            metric=metric,
            backbone=backbone,
            source=source,
            distance=distance,
            align_epochs=align_epochs,
            align_auto=align_auto,
            max_samples=spec.alignment.max_samples,
            align_scope=spec.alignment.scope,
            align_keep_separation=bool(keep_separation),
            finetune_mode=mode,
            finetune_epochs=int(finetune_epochs),
            lr=float(lr),
            embedder_lr=EMBEDDER_LR,
            batch_size=int(batch_size),
            optimizer=optimizer,
            weight_decay=WEIGHT_DECAY[optimizer],
            warmup_fraction=WARMUP_FRACTION,
            early_stopping_patience=spec.finetune.early_stopping_patience,
            augment=augment,
            label_smoothing=label_smoothing,
            ema_decay=ema_decay,
            ensemble_members=ensemble_members,
            embedder_stem=embedder_stem,
            head_flat=head_flat,
            head_layer_mix=head_layer_mix,
            embedder_kernel_bank=kernel_bank,
            head_kernel_summary=head_kernel_summary,
            head_local_skip=head_local_skip,
            embedder_stem_layers=embedder_stem_layers,
            selection_start=selection_start,
            token_budget=token_budget,
            seed=spec.seed,
            allow_random_init=spec.allow_random_init,
            reasons=reasons,
            dataset_id=spec.dataset_id,
            name=spec.name,
        )
    )


#: a dense series task's stem wraps around when, in its inputs and its targets alike, the step
#: across the seam (last position to first) and the bend there are at most this many times their
#: means inside the series: a periodic domain sampled without a repeated end point scores about 1
#: (Burgers 1.0, Allen-Cahn 0.9-1.0); Darcy's pressure, pinned to zero at both walls, bends 18
#: times harder across the seam
SEAM_RATIO_LIMIT = 2.0
#: training rows the seam check reads (evenly spaced), so its cost does not grow with the data
SEAM_SAMPLE_ROWS = 1_000


def seam_ratios(values: np.ndarray) -> tuple[float, float]:
    """``(N, L)`` or ``(N, C, L)`` values: the mean absolute step and second difference across
    the seam between the last position and the first, each over its mean inside the series
    (per channel, so a channel on a small scale counts as much; the largest over channels).

    ``inf`` where the seam cannot be read (fewer than 4 positions, missing values) or where the
    inside is flat and the seam is not; 1.0 where both are flat.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        v = v[:, None, :]
    if v.ndim != 3 or v.shape[-1] < 4 or v.shape[0] == 0 or not np.all(np.isfinite(v)):
        return math.inf, math.inf
    step_in = np.abs(np.diff(v, axis=-1)).mean(axis=(0, 2))
    bend_in = np.abs(v[..., :-2] - 2 * v[..., 1:-1] + v[..., 2:]).mean(axis=(0, 2))
    step_seam = np.abs(v[..., 0] - v[..., -1]).mean(axis=0)
    bend_seam = (
        np.abs(v[..., -1] - 2 * v[..., 0] + v[..., 1])
        + np.abs(v[..., -2] - 2 * v[..., -1] + v[..., 0])
    ).mean(axis=0) / 2

    def ratio(seam: np.ndarray, inside: np.ndarray) -> float:
        flat = inside <= 0
        per_channel = np.where(
            flat, np.where(seam > 0, math.inf, 1.0), seam / np.where(flat, 1.0, inside)
        )
        return float(per_channel.max())

    return ratio(step_seam, step_in), ratio(bend_seam, bend_in)


def periodic_domain(inputs: np.ndarray, targets: np.ndarray) -> tuple[bool, str]:
    """Whether a dense series task's inputs and targets both run on across the seam, and why.

    Reads at most :data:`SEAM_SAMPLE_ROWS` evenly spaced rows of each.
    """
    rows = np.unique(np.linspace(0, len(inputs) - 1, min(len(inputs), SEAM_SAMPLE_ROWS)).round())
    rows = rows.astype(int)
    x_step, x_bend = seam_ratios(np.asarray(inputs[rows]))
    y_step, y_bend = seam_ratios(np.asarray(targets[rows]))
    periodic = max(x_step, x_bend, y_step, y_bend) <= SEAM_RATIO_LIMIT
    measured = (
        f"across the seam (last position to first) the inputs step {x_step:.2f}x and bend "
        f"{x_bend:.2f}x their mean inside the series, the targets {y_step:.2f}x and {y_bend:.2f}x"
    )
    if periodic:
        return True, (
            f"a periodic domain: {measured} (all at most {SEAM_RATIO_LIMIT:g}x), so the conv "
            "stem wraps around the ends instead of reading zeros (measured in docs/QUALITY.md)"
        )
    return False, (
        f"not a periodic domain: {measured} (a limit of {SEAM_RATIO_LIMIT:g}x), so the conv stem "
        "reads zeros past the ends"
    )


# --- local backbone locations (SPEC §4: only inside the allowed model directories) ---


def local_backbone_path(backbone: str) -> Path | None:
    """The local file/dir a backbone id points at (``hf:<dir>``, ``timm:<arch>@<path>``, a path)."""
    if backbone.startswith("hf:"):
        return Path(backbone[len("hf:") :])
    if backbone.startswith("timm:"):
        _, at, weights = backbone.partition("@")
        return Path(weights) if at else None
    if "/" in backbone or "\\" in backbone or backbone.startswith((".", "~")):
        return Path(backbone)
    return None


def check_backbone_location(backbone: str, model_dirs: Sequence[str | Path]) -> None:
    """A local backbone must lie inside one of ``model_dirs`` (SPEC §4); registry names pass."""
    path = local_backbone_path(backbone)
    if path is None:
        return
    resolved = path.expanduser().resolve()
    allowed = [Path(d).expanduser().resolve() for d in model_dirs]
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        where = ", ".join(str(d) for d in allowed) or "none are configured"
        raise SpecError(
            f"backbone path {str(path)!r} is not inside an allowed model directory ({where})",
            param="backbone",
        )
