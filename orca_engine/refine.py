"""Stage 3, refinement: fine-tune on the task loss and select the epoch on the validation split.

One readable loop in the nanoGPT manner: a pure learning-rate schedule (:func:`lr_at`), batches
drawn from numpy arrays with a seeded generator, an optimizer over the trainable parameters, a
whole-split evaluation on val after every epoch, and a plain-dict resume file written after an
epoch whenever writing it has become cheap next to the training since the last write. The test
split is never looked at here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orca_engine.augment import augment_batch
from orca_engine.checkpoint import load_stage, save_stage
from orca_engine.data import Dataset, Normaliser, TargetScaler
from orca_engine.device import (
    autocast,
    cpu_copy,
    out_of_memory_as_error,
    outputs_in_chunks,
    restore_rng_state,
    rng_state,
    seed_everything,
)
from orca_engine.embedders import remembering_bank_shares
from orca_engine.metrics import compute_metrics, higher_is_better
from orca_engine.model import OrcaModel, set_trainable
from orca_engine.progress import Callbacks

logger = logging.getLogger(__name__)

STATE_FILE = "refine_state.pt"
#: 2: the resume file holds only the tensors refinement can change (trained parameters and
#: buffers) plus a SHA-256 of the frozen ones; 1 (still read): the whole model
STATE_FORMAT_VERSION = 2
#: the cosine schedule ends at this fraction of the base learning rate, not at zero
LR_FLOOR_RATIO = 0.01
#: learning-rate multiplier for the randomly initialised embedder and head in full fine-tuning
NEW_MODULE_LR_SCALE = 10.0
GRAD_CLIP_NORM = 1.0
SGD_MOMENTUM = 0.9
#: how many progress reports one refinement run sends at most
PROGRESS_REPORTS = 100
#: early stopping never ends a run before this share of its epochs: on a few dozen samples the
#: validation metric sits flat for many epochs while the model is still learning (ArrowHead,
#: 36 series: stopped at epoch 14 of 100 with the training loss still at chance)
MIN_EPOCHS_FRACTION = 0.5
#: the resume state (model, optimizer, best weights: ~370 MB for MiniLM trained in full, ~16 MB
#: in ``layernorm`` mode, see :data:`SLIM_STATE`) is written after an
#: epoch only once the time since the last write is this many times what that write took, so
#: writing costs at most ~1/20 of the run (every epoch, it was a fifth of a 2-core CPU epoch on
#: a 280-row field); the first and the last epoch of a run are always written. A killed run
#: resumes from the last write and, being deterministic, ends with the same weights.
STATE_WRITE_COST_RATIO = 20.0
#: AdamW updates every tensor in one fused kernel where the device has one: on the 2-core CPU a
#: step over MiniLM's 22.6 M weights took 16 ms instead of the per-tensor loop's 75 ms
#: (docs/BENCHMARKS.md, "Refinement epoch cost"); the same arithmetic, rounded differently
FUSED_ADAMW = True
FUSED_DEVICES = ("cpu", "cuda")
#: frozen weights (in ``layernorm`` mode all of the backbone but its LayerNorms: 90 of MiniLM's
#: 94 MB) are snapshotted once per run and kept out of the resume file and of the per-epoch
#: best-weights copy; a resume checks them against the fingerprint instead. False writes and
#: copies the whole model every time, as before session 23 (kept for bench.epoch_cost)
SLIM_STATE = True

REGRESSION_TASKS = ("regression", "dense_regression")


@dataclass
class RefineResult:
    """What refinement produced: the per-epoch history and the epoch selected on val."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_val: dict[str, float]
    #: weights of the best epoch, on the CPU
    best_state: dict[str, torch.Tensor] = field(repr=False)
    stopped_early: bool


def _frozen_names(model: nn.Module) -> list[str]:
    """State-dict entries refinement cannot change: parameters that do not train.

    Buffers count as changeable (a kernel bank's statistics, normalisation running stats).
    """
    trainable = {
        name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad
    }
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    return [name for name in model.state_dict() if name not in trainable and name not in buffers]


def _fingerprint(state: dict[str, torch.Tensor], names: list[str]) -> str:
    """SHA-256 over the named tensors' names, dtypes, shapes and bytes (~50 ms for MiniLM's
    90 MB here, read in place): tells whether a rebuilt model's frozen weights are, bit for bit,
    the ones a resume file was trained beside, whatever the thread count."""
    digest = hashlib.sha256()
    for name in names:
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass
class Preprocessing:
    """How raw arrays become model inputs/targets. Fitted on train only, saved with the model."""

    normaliser: Normaliser
    target_scaler: TargetScaler | None


def fit_preprocessing(dataset: Dataset, task_type: str) -> Preprocessing:
    """Fit the input normaliser (and, for regression, the target scaler) on the train split."""
    normaliser = Normaliser.fit(dataset.x_train)
    target_scaler = TargetScaler.fit(dataset.y_train) if task_type in REGRESSION_TASKS else None
    return Preprocessing(normaliser=normaliser, target_scaler=target_scaler)


# --- schedule, optimizer, loss ---------------------------------------------------------------


def lr_at(
    step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float
) -> float:
    """Learning rate at optimizer ``step`` (0-based): linear warmup, then cosine decay to a floor.

    Warmup reaches ``base_lr`` at the last warmup step; decay then ends at ``base_lr * min_ratio``
    on the final step and stays there (steps past ``total_steps`` never go below the floor).
    """
    if base_lr < 0 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError("lr_at needs base_lr >= 0 and 0 <= min_ratio <= 1")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_ratio + (1.0 - min_ratio) * cosine)


def _uses_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    # Biases and normalisation scales/shifts are vectors; decaying them only hurts.
    return parameter.ndim >= 2 and "norm" not in name.lower()


def build_optimizer(model: nn.Module, rspec: Any) -> torch.optim.Optimizer:
    """AdamW (fused) or SGD(momentum) over the trainable parameters, no decay on norms/biases.

    In ``full`` mode the pretrained backbone trains at ``rspec.lr`` and the freshly initialised
    embedder and head at ``NEW_MODULE_LR_SCALE`` times that: one rate for both either moves the
    head too slowly or the pretrained weights too far (on GunPoint with MiniLM, 60 epochs at
    1e-4: test accuracy 0.82 with the scaled rate, 0.69 without, seed 0). Each parameter group
    remembers its ``base_lr`` so the schedule can scale it every step.
    (``rspec.embedder_lr`` is alignment's.)
    """
    base_lr = float(rspec.lr)
    scale = NEW_MODULE_LR_SCALE if rspec.finetune_mode == "full" else 1.0
    parts = [(name, module) for name, module in model.named_children()]
    groups = []
    for part_name, module in parts or [("model", model)]:
        lr = base_lr if part_name == "backbone" else base_lr * scale
        decayed: list[nn.Parameter] = []
        not_decayed: list[nn.Parameter] = []
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                (decayed if _uses_weight_decay(name, parameter) else not_decayed).append(parameter)
        groups += [
            {"params": params, "lr": lr, "base_lr": lr, "weight_decay": decay}
            for params, decay in ((decayed, float(rspec.weight_decay)), (not_decayed, 0.0))
            if params
        ]
    if not groups:
        raise ValueError("the model has no trainable parameters in this fine-tuning mode")
    if rspec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=SGD_MOMENTUM)
    fused = FUSED_ADAMW and all(p.device.type in FUSED_DEVICES for p in model.parameters())
    return torch.optim.AdamW(groups, lr=base_lr, fused=True if fused else None)


def targets_tensor(
    task_type: str, y: np.ndarray, target_scaler: TargetScaler | None
) -> torch.Tensor:
    """Encoded labels as the loss wants them: int64 class ids, float 0/1, standardised floats."""
    if task_type in ("classification", "dense_classification"):
        return torch.from_numpy(np.asarray(y, dtype=np.int64))
    if target_scaler is not None:
        y = target_scaler.transform(y)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def mixup_pairs(batch: int, alpha: float) -> tuple[float, torch.Tensor] | None:
    """Mixup for one batch: a weight ``lam ~ Beta(alpha, alpha)`` and a partner permutation.

    Each sample becomes ``lam * x + (1 - lam) * x[partner]`` and its loss the same mix of the two
    labels' losses. Draws from torch's global generator (seeded and saved with the resume state).
    ``None`` when there is nothing to mix (a batch of one).
    """
    if batch < 2 or alpha <= 0:
        return None
    concentration = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(concentration, concentration).sample())
    return lam, torch.randperm(batch)


def task_loss(
    task_type: str,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy, BCE-with-logits or MSE (on standardised targets), in float32.

    ``label_smoothing`` applies to single-label classification only (training loss; validation
    losses are computed without it so they stay comparable across recipes).
    """
    outputs = outputs.float()
    if task_type == "classification":
        return F.cross_entropy(
            outputs.reshape(len(outputs), -1),
            targets.reshape(-1),
            label_smoothing=label_smoothing,
        )
    if task_type == "dense_classification":
        if targets.ndim == outputs.ndim:  # (B, 1, *S) ids
            targets = targets[:, 0]
        return F.cross_entropy(outputs, targets)
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(outputs.reshape(targets.shape), targets)
    if task_type in REGRESSION_TASKS:
        return F.mse_loss(outputs.reshape(targets.shape), targets)
    raise ValueError(f"unknown task type {task_type!r}")


def outputs_for_metrics(
    task_type: str, outputs: np.ndarray, y_true: np.ndarray, target_scaler: TargetScaler | None
) -> np.ndarray:
    """Raw outputs in the units ``compute_metrics`` compares with ``y_true`` (original scale)."""
    if task_type in REGRESSION_TASKS:
        outputs = outputs.reshape(y_true.shape)
        if target_scaler is not None:
            outputs = target_scaler.inverse_transform(outputs)
    return outputs


def evaluate_split(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task_type: str,
    preprocessing: Preprocessing,
    device: torch.device,
) -> tuple[dict[str, float], float]:
    """Task metrics and loss over a WHOLE split (outputs concatenated, never per-chunk averages)."""
    model.eval()
    outputs = outputs_in_chunks(
        model, x, device=device, transform=preprocessing.normaliser.transform
    )
    loss = task_loss(
        task_type,
        torch.from_numpy(outputs),
        targets_tensor(task_type, y, preprocessing.target_scaler),
    )
    metric_outputs = outputs_for_metrics(task_type, outputs, y, preprocessing.target_scaler)
    return compute_metrics(task_type, y, metric_outputs), float(loss)


class WeightAverage:
    """An exponential moving average of a model's weights, evaluated and kept instead of them.

    On small datasets the weights after any one step are noisy, and so is validation on a split
    of a dozen samples; the average over the last ~``1 / (1 - decay)`` steps is a smoother model
    and a steadier selection signal. The effective decay ramps up as ``(1 + t) / (10 + t)`` so the
    randomly initialised head is not averaged with its first steps for long.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self._pairs = self._tensor_pairs(model)

    def _tensor_pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ours = self.model.state_dict()
        return [(ours[name], tensor) for name, tensor in model.state_dict().items()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live weights after one optimizer step."""
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for average, current in self._pairs:
            if average.dtype.is_floating_point:
                average.lerp_(current.detach(), 1.0 - decay)
            else:
                average.copy_(current)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


# --- the loop --------------------------------------------------------------------------------


def _epoch_batches(
    n_samples: int, batch_size: int, generator: torch.Generator
) -> Iterator[np.ndarray]:
    order = torch.randperm(n_samples, generator=generator).numpy()
    for start in range(0, n_samples, batch_size):
        # Sorted indices read a memory-mapped array front to back; the loss does not care.
        yield np.sort(order[start : start + batch_size])


def _is_better(
    value: float, loss: float, best: float | None, best_loss: float | None, *, higher: bool
) -> bool:
    """Is this epoch's validation result better than the best so far?

    The task metric decides; on a tie the lower validation loss wins. Small validation splits
    make ties common (10 series give accuracy in steps of 0.1), and without the tie-break the
    first epoch to reach a value is kept and early stopping fires while the model still improves.
    Equal metric and loss keep the earlier epoch.
    """
    if math.isnan(value):
        return False
    if best is None:
        return True
    if value != best:
        return value > best if higher else value < best
    return best_loss is not None and not math.isnan(loss) and loss < best_loss


def refine(
    model: OrcaModel,
    dataset: Dataset,
    rspec: Any,
    *,
    device: torch.device | str,
    callbacks: Callbacks | None = None,
    state_dir: str | Path | None = None,
    preprocessing: Preprocessing | None = None,
) -> RefineResult:
    """Fine-tune ``model`` on ``dataset``'s train split; select the best epoch on val.

    ``rspec`` is the resolved spec (task type, metric, mode, epochs, lr, batch size, ...).
    ``preprocessing`` defaults to one fitted on train here; the pipeline passes the one it saves
    with the model. With ``state_dir`` the loop resumes from ``refine_state.pt``, written after
    the first and the last epoch and after any epoch once writing has become cheap next to the
    training since the last write (:data:`STATE_WRITE_COST_RATIO`); on CPU a resumed run ends
    with the same weights as an uninterrupted one.
    On return ``model`` holds the LAST epoch's weights; ``best_state`` holds the selected ones.
    The fixed kernel bank, if any, reads the same series every epoch and remembers them for the
    run (not where augmentation or mixup make every epoch's inputs new).
    """
    with bank_memory(model, rspec):
        return _refine(
            model,
            dataset,
            rspec,
            device=device,
            callbacks=callbacks,
            state_dir=state_dir,
            preprocessing=preprocessing,
        )


def bank_memory(model: nn.Module, rspec: Any) -> contextlib.AbstractContextManager[None]:
    """The kernel banks of ``model`` remember the series they read while this is open, unless
    augmentation or mixup make every epoch's inputs new (then there is nothing to reuse)."""
    fresh_inputs = bool(getattr(rspec, "augment", False)) or (
        rspec.task_type == "classification" and float(getattr(rspec, "mixup_alpha", 0.0)) > 0
    )
    return contextlib.nullcontext() if fresh_inputs else remembering_bank_shares(model)


def _refine(
    model: OrcaModel,
    dataset: Dataset,
    rspec: Any,
    *,
    device: torch.device | str,
    callbacks: Callbacks | None,
    state_dir: str | Path | None,
    preprocessing: Preprocessing | None,
) -> RefineResult:
    callbacks = callbacks or Callbacks()
    device = torch.device(device)
    task_type: str = rspec.task_type
    metric: str = rspec.metric
    higher = higher_is_better(metric)
    preprocessing = preprocessing or fit_preprocessing(dataset, task_type)
    normalise = preprocessing.normaliser.transform

    n_train = len(dataset.x_train)
    batch_size = max(1, min(int(rspec.batch_size), n_train))
    steps_per_epoch = math.ceil(n_train / batch_size)
    epochs = int(rspec.finetune_epochs)
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(float(rspec.warmup_fraction) * total_steps)
    patience = int(rspec.early_stopping_patience)
    min_epochs = math.ceil(MIN_EPOCHS_FRACTION * epochs)
    # Epochs before this one are never selected (a tiny validation split can crown an
    # under-trained early epoch by one lucky sample); at most the last epoch.
    select_from = min(
        epochs, max(1, math.ceil(float(getattr(rspec, "selection_start", 0.0)) * epochs))
    )
    progress_every = max(1, total_steps // PROGRESS_REPORTS)

    model.to(device)
    set_trainable(model, rspec.finetune_mode)
    optimizer = build_optimizer(model, rspec)
    label_smoothing = float(getattr(rspec, "label_smoothing", 0.0))
    augment = bool(getattr(rspec, "augment", False))
    mixup_alpha = (
        float(getattr(rspec, "mixup_alpha", 0.0)) if task_type == "classification" else 0.0
    )
    ema_decay = float(getattr(rspec, "ema_decay", 0.0))
    average = WeightAverage(model, ema_decay) if ema_decay > 0 else None
    # What validation sees and what is kept: the weight average when there is one.
    evaluated = average.model if average is not None else model
    input_kind = model.embedder.input_kind
    generator = torch.Generator().manual_seed(int(rspec.seed))
    y_train = targets_tensor(task_type, dataset.y_train, preprocessing.target_scaler)

    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    fingerprint = rspec.to_dict() if hasattr(rspec, "to_dict") else None
    # Frozen weights never move in this run: one CPU snapshot serves every best-weights copy,
    # and the resume file holds a fingerprint of them instead of the tensors.
    frozen_names = _frozen_names(model) if SLIM_STATE else []
    live = evaluated.state_dict()
    frozen = cpu_copy({name: live[name] for name in frozen_names})
    frozen_check = (
        _fingerprint(frozen, frozen_names) if state_path is not None and frozen_names else ""
    )

    def changing(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in state.items() if name not in frozen}

    history: list[dict[str, Any]] = []
    best_epoch, best_score, best_val = -1, None, {}
    best_loss: float | None = None
    best_state: dict[str, torch.Tensor] = {}
    epochs_since_best, stopped_early, start_epoch = 0, False, 0
    # when the last resume-state write ended and how long it took
    last_write_end, last_write_seconds = -math.inf, 0.0

    saved = load_stage(state_path) if state_path is not None else None
    if saved is not None and saved.get("spec") != fingerprint:
        logger.warning("ignoring %s: it was written for a different spec", state_path)
        saved = None
    if (
        saved is not None
        and saved.get("format_version", 1) >= 2
        and (saved.get("frozen_names") != frozen_names or saved.get("frozen_check") != frozen_check)
    ):
        # The rebuilt model's frozen weights are not the ones that run trained beside (a backbone
        # changed on disk): its trained tensors would not fit them, so refinement starts over.
        logger.warning(
            "ignoring %s: the model's frozen weights changed since it was written", state_path
        )
        saved = None
    if saved is not None:
        # Format 1 holds every tensor; format 2 the changing ones, the frozen ones come from here.
        model.load_state_dict({**frozen, **saved["model"]})
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng_state(saved["rng"], generator)
        history, best_epoch, best_val = saved["history"], saved["best_epoch"], saved["best_val"]
        best_score = saved["best_score"]
        best_state = {**frozen, **saved["best_state"]} if saved["best_state"] else {}
        best_loss = saved.get("best_loss")
        epochs_since_best, stopped_early = saved["epochs_since_best"], saved["stopped_early"]
        start_epoch = saved["epoch"]
        if average is not None:
            average.load(saved["average"])
        callbacks.event(f"refine resumes after epoch {start_epoch}/{epochs}", kind="stage")
    else:
        # Refinement's randomness (order, dropout) must not depend on what ran before it, or a
        # run resumed after alignment would differ from an uninterrupted one.
        seed_everything(int(rspec.seed))
        generator.manual_seed(int(rspec.seed))

    finished = stopped_early or start_epoch >= epochs
    global_step = start_epoch * steps_per_epoch
    hint = f"try a smaller finetune.batch_size (now {batch_size})"
    for epoch in range(start_epoch, epochs):
        if finished:
            break
        started = time.monotonic()
        model.train()
        loss_sum, seen, lr = 0.0, 0, 0.0
        for batch_indices in _epoch_batches(n_train, batch_size, generator):
            callbacks.check_cancelled()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(
                    global_step,
                    base_lr=group["base_lr"],
                    warmup_steps=warmup_steps,
                    total_steps=total_steps,
                    min_ratio=LR_FLOOR_RATIO,
                )
            # The reported rate is the spec's own (the backbone's in full mode).
            lr = min(group["lr"] for group in optimizer.param_groups)
            inputs = torch.from_numpy(normalise(np.asarray(dataset.x_train[batch_indices])))
            targets = y_train[torch.from_numpy(batch_indices)]
            if augment:
                inputs = augment_batch(inputs, input_kind=input_kind, task_type=task_type)
            mix = mixup_pairs(len(batch_indices), mixup_alpha) if mixup_alpha > 0 else None
            if mix is not None:
                inputs = mix[0] * inputs + (1.0 - mix[0]) * inputs[mix[1]]
            with out_of_memory_as_error(hint):
                inputs, targets = inputs.to(device), targets.to(device)
                with autocast(device):
                    outputs = model(inputs)
                loss = task_loss(task_type, outputs, targets, label_smoothing=label_smoothing)
                if mix is not None:
                    partner = targets[mix[1].to(device)]
                    loss = mix[0] * loss + (1.0 - mix[0]) * task_loss(
                        task_type, outputs, partner, label_smoothing=label_smoothing
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], GRAD_CLIP_NORM
                )
                optimizer.step()
                if average is not None:
                    average.update()
            batch_loss = float(loss.detach())
            loss_sum += batch_loss * len(batch_indices)
            seen += len(batch_indices)
            global_step += 1
            if global_step % progress_every == 0 or global_step == total_steps:
                callbacks.progress(
                    stage="refine",
                    step=global_step,
                    total=total_steps,
                    metrics={"train_loss": batch_loss, "lr": lr},
                )

        with out_of_memory_as_error(hint):
            val_metrics, val_loss = evaluate_split(
                evaluated,
                dataset.x_val,
                dataset.y_val,
                task_type=task_type,
                preprocessing=preprocessing,
                device=device,
            )
        score = val_metrics.get(metric, float("nan"))
        train_loss = loss_sum / max(1, seen)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val": val_metrics,
            "lr": lr,
            "seconds": time.monotonic() - started,
        }
        history.append(record)
        eligible = epoch + 1 >= select_from
        if eligible and _is_better(score, val_loss, best_score, best_loss, higher=higher):
            best_epoch, best_score, best_val = epoch + 1, score, val_metrics
            best_loss = val_loss
            best_state = {**frozen, **cpu_copy(changing(evaluated.state_dict()))}
            epochs_since_best = 0
        elif eligible:
            epochs_since_best += 1
        stopped_early = (
            patience > 0 and epochs_since_best >= patience and min_epochs <= epoch + 1 < epochs
        )
        callbacks.event(
            f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, "
            f"val loss {val_loss:.4f}, val {metric} {score:.4f}"
            + (" (best so far)" if best_epoch == epoch + 1 else ""),
            kind="metric",
            data={
                "stage": "refine",
                **{k: v for k, v in record.items() if k != "val"},
                **{f"val_{k}": v for k, v in val_metrics.items()},
            },
        )
        callbacks.progress(
            stage="refine",
            step=global_step,
            total=total_steps,
            metrics={"train_loss": train_loss, f"val_{metric}": score},
        )
        # A run's first epoch is due too: nothing was written yet (last_write_end is -inf).
        due = (
            stopped_early
            or epoch + 1 == epochs
            or time.monotonic() - last_write_end >= STATE_WRITE_COST_RATIO * last_write_seconds
        )
        if state_path is not None and due:
            write_started = time.monotonic()
            save_stage(
                state_path,
                {
                    "format_version": STATE_FORMAT_VERSION,
                    "spec": fingerprint,
                    "epoch": epoch + 1,
                    "model": changing(model.state_dict()),
                    "frozen_names": frozen_names,
                    "frozen_check": frozen_check,
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(generator),
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_score": best_score,
                    "best_loss": best_loss,
                    "best_val": best_val,
                    "best_state": changing(best_state),
                    "epochs_since_best": epochs_since_best,
                    "stopped_early": stopped_early,
                    "average": average.state() if average is not None else None,
                },
            )
            last_write_end = time.monotonic()
            last_write_seconds = last_write_end - write_started
        if stopped_early:
            callbacks.event(
                f"early stopping after epoch {epoch + 1}: val {metric} has not improved for "
                f"{patience} epochs (best {best_score:.4f} at epoch {best_epoch})",
                kind="log",
            )
            finished = True

    if best_epoch < 0:
        raise ValueError("refinement ran no epoch (finetune.epochs must be at least 1)")
    return RefineResult(
        history=history,
        best_epoch=best_epoch,
        best_val=best_val,
        best_state=best_state,
        stopped_early=stopped_early,
    )
