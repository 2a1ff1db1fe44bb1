"""Stage 2, distribution alignment: train only the embedder to bring target features to the source.

One *epoch* is one full-batch step on the (subsampled) target: pooled embedder features for every
target sample, the dataset distance to the source proxy, its gradient, one optimizer step. The
gradient is exact for the full batch but memory stays bounded: features are first computed in
chunks without autograd, the distance's gradient w.r.t. the pooled features is taken, and each
chunk is then re-embedded with autograd and back-propagated with its slice of that gradient.

``curve[e]`` is the distance after ``e`` steps (``curve[0]`` before any). With ``auto_stop`` the
loop ends once the best distance of the last ``patience`` epochs is not more than 1% (relative)
below the best distance before them. The embedder runs in eval mode (no dropout), so a fixed
seed gives the same curve on CPU. If the distance ends above where it began, the embedder
with the lowest distance seen is restored. With ``state_path`` each finished epoch is checkpointed
atomically (embedder, optimizer, curve, distance solver warm start, RNG) and a rerun resumes
from it with the same final result.

With ``keep_separation`` the embedder handed on is the one with the lowest distance among those
whose classes (the labels, or the k-means pseudo-classes the distance itself reads) lie at least
as far apart in the pooled features as before alignment: the ratio of between-class to
within-class scatter (:func:`separation_ratio`) may not fall below its start. The source proxy's
own classes barely separate, and matching them drew the task's classes together on most datasets
(docs/QUALITY.md, session 25): an embedder that keeps them apart is never traded for a lower
distance. The embedder before alignment always qualifies.

``scope`` says which embedder weights alignment moves: ``"embedder"`` every one (ORCA's stage 2),
``"output"`` only the learned positions and the output LayerNorm (the tokens' placement and scale
in the backbone's space; the patch projection, stems and bank projection keep their weights).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from orca_engine.device import cpu_copy
from orca_engine.distances import Distance, SourceData, create_distance, kmeans_labels, pool_tokens
from orca_engine.embedders import remembering_bank_shares
from orca_engine.progress import Callbacks

logger = logging.getLogger(__name__)

CLASSIFICATION_TASKS = ("classification",)
AUTO_STOP_PATIENCE = 3
AUTO_STOP_MIN_IMPROVEMENT = 0.01
EMBED_CHUNK = 256
#: which embedder weights alignment trains (see the module docstring)
ALIGN_SCOPES = ("embedder", "output")


@dataclass
class AlignResult:
    """Distance per epoch (``curve[0]`` before training), epochs and wall time; ``after`` is the
    distance of the embedder handed on (``kept_epoch``): the last one, the closest one seen when
    the last ended above ``before``, or with ``keep_separation`` the closest one that kept the
    classes apart. ``separation``: the scatter ratio per entry of ``curve`` (empty when not
    measured)."""

    curve: list[float] = field(default_factory=list)
    before: float = float("nan")
    after: float = float("nan")
    epochs_run: int = 0
    seconds: float = 0.0
    separation: list[float] = field(default_factory=list)
    kept_epoch: int = 0


def alignment_labels(
    task_type: str, y: np.ndarray | None, x_features: np.ndarray, k: int = 10, seed: int = 0
) -> np.ndarray:
    """Class ids for OTDD: the labels for classification, k-means pseudo-labels otherwise."""
    if task_type in CLASSIFICATION_TASKS and y is not None and np.asarray(y).ndim == 1:
        return np.unique(np.asarray(y), return_inverse=True)[1].astype(np.int64)
    return kmeans_labels(np.asarray(x_features).reshape(len(x_features), -1), k, seed)


def stratified_subsample(labels: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_samples`` rows keeping class proportions (seeded)."""
    n = len(labels)
    if n <= max_samples:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = max(1, round(max_samples * len(members) / n))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    picked = np.concatenate(chosen)
    if len(picked) > max_samples:
        picked = rng.choice(picked, size=max_samples, replace=False)
    return np.sort(picked)


def class_scatter(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(between, within)``: sums of squared distances of ``features`` to the grand mean,
    weighted by class size, and to each row's class mean; differentiable in ``features``."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(classes)).to(features.dtype)
    sums = torch.zeros(
        len(classes), features.shape[1], dtype=features.dtype, device=features.device
    )
    means = sums.index_add(0, inverse, features) / counts[:, None]
    between = (counts * ((means - features.mean(0)) ** 2).sum(1)).sum()
    return between, ((features - means[inverse]) ** 2).sum()


def separation_ratio(features: Tensor, labels: Tensor) -> float:
    """Between-class over within-class scatter of ``features`` (:func:`class_scatter`); 0 when
    the classes coincide, ``inf`` when every class is a single point."""
    with torch.no_grad():
        between, within = (float(v) for v in class_scatter(features.detach().double(), labels))
    if within == 0.0:
        return float("inf") if between > 0 else 0.0
    return between / within


def _plateaued(curve: list[float], patience: int) -> bool:
    if len(curve) <= patience:
        return False
    best_before = min(curve[:-patience])
    best_recent = min(curve[-patience:])
    return best_before - best_recent <= AUTO_STOP_MIN_IMPROVEMENT * abs(best_before)


def _pooled_features(model: Any, x: Tensor, chunk: int) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [pool_tokens(model.embed(x[i : i + chunk])) for i in range(0, len(x), chunk)]
        )


def _distance_and_gradient(
    model: Any,
    x: Tensor,
    labels: Tensor,
    distance: Distance,
    chunk: int,
    extra: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[float, Tensor]:
    """Distance of the current embedder and the pooled features it was measured on; leaves its
    full-batch gradient in the embedder's grads. ``extra(features, labels, distance)``, when
    given, is a term added to the objective before differentiating (benchmark probes)."""
    features = _pooled_features(model, x, chunk).requires_grad_(True)
    value = distance(features, labels)
    objective = value if extra is None else value + extra(features, labels, value)
    objective.backward()
    feature_grad = features.grad
    assert feature_grad is not None
    for start in range(0, len(x), chunk):
        pooled = pool_tokens(model.embed(x[start : start + chunk]))
        pooled.backward(feature_grad[start : start + chunk].to(pooled.dtype))
    return float(value.detach()), features.detach()


def _guard_message(name: str, curve: list[float], separation: list[float], epoch: int) -> str:
    start, last = separation[0], separation[-1]
    if epoch == 0:
        return (
            f"alignment drew the classes together (between/within scatter {last:.3g} at the "
            f"end against {start:.3g} before) and no step kept them apart at a lower distance; "
            f"keeping the embedder it began with ({name} {curve[0]:.6g}): alignment changes "
            "nothing on this dataset"
        )
    return (
        f"keeping the embedder of epoch {epoch} ({name} {curve[epoch]:.6g}), the closest to the "
        f"source that keeps the classes as far apart as before (between/within scatter "
        f"{separation[epoch]:.3g} against {start:.3g}; {last:.3g} at the end)"
    )


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _make_trainable(model: Any, scope: str = "embedder") -> None:
    try:
        from orca_engine.model import set_trainable

        set_trainable(model, "embedder")
    except (ImportError, AttributeError):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("embedder."))
    else:
        # Models that are not OrcaModels (no "embedder." prefix handled above) still work.
        for parameter in model.embedder.parameters():
            parameter.requires_grad_(True)
    if scope == "output":
        for name, parameter in model.embedder.named_parameters():
            parameter.requires_grad_(name == "positions" or name.startswith("norm."))


def align_embedder(
    model: Any,
    x: np.ndarray | Tensor,
    target_labels: np.ndarray | Tensor | None,
    source: SourceData,
    *,
    distance: str | Distance = "otdd",
    epochs: int = 10,
    auto_stop: bool = False,
    lr: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    callbacks: Callbacks | None = None,
    max_samples: int = 5000,
    state_path: str | Path | None = None,
    patience: int = AUTO_STOP_PATIENCE,
    chunk_size: int = EMBED_CHUNK,
    distance_options: dict[str, Any] | None = None,
    scope: str = "embedder",
    keep_separation: bool = False,
) -> AlignResult:
    """Train ``model.embedder`` so pooled ``model.embed(x)`` approaches ``source`` under ``distance``.

    ``distance`` is a name for :func:`create_distance` (``"none"`` returns an empty result at
    once) or a built :class:`Distance`. ``epochs=0`` only measures the distance. ``scope``
    (one of :data:`ALIGN_SCOPES`) picks the weights that train; ``keep_separation`` (see the
    module docstring) needs at least two classes in ``target_labels`` and is off otherwise.
    """
    if scope not in ALIGN_SCOPES:
        raise ValueError(f"unknown alignment scope {scope!r}; expected one of {ALIGN_SCOPES}")
    started = time.perf_counter()
    callbacks = callbacks or Callbacks()
    if isinstance(distance, str) and distance == "none":
        # The ablation without alignment: nothing to measure, nothing to train.
        return AlignResult()
    device = torch.device(device)
    torch.manual_seed(seed)
    x_array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if target_labels is None:
        label_array = np.zeros(len(x_array), dtype=np.int64)
    else:
        label_array = np.asarray(
            target_labels.cpu().numpy() if isinstance(target_labels, Tensor) else target_labels
        ).astype(np.int64)
    keep = stratified_subsample(label_array, max_samples, seed)
    x_target = torch.from_numpy(np.ascontiguousarray(x_array[keep], dtype=np.float32)).to(device)
    y_target = torch.from_numpy(label_array[keep]).to(device)

    dist = (
        distance
        if isinstance(distance, Distance)
        else create_distance(distance, source, device=device, seed=seed, **(distance_options or {}))
    )
    was_training = model.training
    previous_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.to(device)
    model.eval()
    _make_trainable(model, scope)
    parameters = [p for p in model.embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)

    curve: list[float] = []
    #: (distance, epoch, embedder state) of the lowest distance measured before a step
    best: tuple[float, int, dict[str, Tensor]] | None = None
    guard = keep_separation and len(torch.unique(y_target)) > 1
    #: scatter ratio per entry of ``curve`` (with the guard), and the guard's pick so far
    separation: list[float] = []
    guarded: tuple[float, int, dict[str, Tensor]] | None = None
    kept: tuple[float, int, dict[str, Tensor]] | None = None
    start_epoch = 0
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file():
        state = torch.load(path, map_location=device, weights_only=False)
        model.embedder.load_state_dict(state["embedder"])
        optimizer.load_state_dict(state["optimizer"])
        curve = list(state["curve"])
        best = state.get("best")
        separation = list(state.get("separation", []))
        guarded = state.get("guarded")
        start_epoch = int(state["epoch"])
        dist.load_warm_state(state["distance_warm"])
        torch.set_rng_state(state["rng"])
        logger.info("alignment resumes after epoch %d", start_epoch)
        if guard and len(separation) != len(curve):
            # A state written without the guard's measurements (an unguarded run, or one from
            # before the guard existed) has lost where the classes began: no guard this time.
            guard, separation, guarded = False, [], None
            callbacks.event(
                "alignment resumed from a state without class-separation measurements; "
                "the separation guard is off for the rest of this alignment",
                kind="log",
            )

    # The embedder reads the same target series every epoch: its kernel bank remembers them.
    remembering = contextlib.ExitStack()
    remembering.enter_context(remembering_bank_shares(model))
    try:
        epoch = start_epoch
        stopped = auto_stop and _plateaued(curve, patience)
        while epoch < epochs and not stopped:
            epoch += 1
            optimizer.zero_grad(set_to_none=True)
            value, features = _distance_and_gradient(model, x_target, y_target, dist, chunk_size)
            curve.append(value)
            if best is None or value < best[0]:
                best = (value, len(curve) - 1, cpu_copy(model.embedder.state_dict()))
            if guard:
                separation.append(separation_ratio(features, y_target))
                if separation[-1] >= separation[0] and (guarded is None or value < guarded[0]):
                    guarded = (value, len(curve) - 1, cpu_copy(model.embedder.state_dict()))
            optimizer.step()
            if path is not None:
                _save_state(
                    path,
                    {
                        "embedder": model.embedder.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "curve": curve,
                        "distance_warm": dist.warm_state(),
                        "rng": torch.get_rng_state(),
                        "best": best,
                        "separation": separation,
                        "guarded": guarded,
                    },
                )
            callbacks.event(
                f"align epoch {epoch}/{epochs}: {dist.name} {curve[-1]:.6g}",
                kind="metric",
                data={
                    "stage": "align",
                    "epoch": epoch - 1,
                    "distance": curve[-1],
                    **({"separation": separation[-1]} if guard else {}),
                },
            )
            callbacks.progress(
                stage="align", step=epoch, total=epochs, metrics={"distance": curve[-1]}
            )
            callbacks.check_cancelled()
            stopped = auto_stop and _plateaued(curve, patience)
        with torch.no_grad():
            features = _pooled_features(model, x_target, chunk_size)
            curve.append(float(dist(features, y_target)))
        if guard:
            separation.append(separation_ratio(features, y_target))
            last_kept_apart = separation[-1] >= separation[0]
            if guarded is not None and not (last_kept_apart and curve[-1] < guarded[0]):
                model.embedder.load_state_dict(guarded[2])
                kept = guarded
                callbacks.event(
                    _guard_message(dist.name, curve, separation, guarded[1]), kind="log"
                )
        elif best is not None and curve[-1] > curve[0]:
            # Alignment that ends farther from the source than it began (a first step too large
            # for a wide embedder) hands on the closest embedder it saw instead.
            model.embedder.load_state_dict(best[2])
            kept = best
            callbacks.event(
                f"alignment ended at {dist.name} {curve[-1]:.6g}, above where it began "
                f"({curve[0]:.6g}); keeping the embedder of epoch {kept[1]} ({kept[0]:.6g})",
                kind="log",
            )
    finally:
        remembering.close()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous_flags.get(name, True))
        model.train(was_training)
    result = AlignResult(
        curve=curve,
        before=curve[0],
        after=kept[0] if kept is not None else curve[-1],
        epochs_run=len(curve) - 1,
        seconds=time.perf_counter() - started,
        separation=separation,
        kept_epoch=kept[1] if kept is not None else len(curve) - 1,
    )
    callbacks.event(
        f"alignment {dist.name}: {result.before:.6g} -> {result.after:.6g} in {result.epochs_run} epochs",
        kind="metric",
        data={"stage": "align", "before": result.before, "after": result.after},
    )
    return result
