"""Cross-fitted ensembles for small datasets: K refinements of one aligned model, averaged.

With a few dozen training samples, one fine-tuning run depends heavily on which samples the
validation split took and on which epoch a dozen validation samples happened to favour
(docs/QUALITY.md measured 10+ point swings between seeds). A cross-fitted ensemble trains K
members from the same aligned embedder and pretrained body, member k validating on fold k of the
pooled train + validation rows, so every labelled sample trains K - 1 members and validates one,
and the members' averaged prediction is the model. The out-of-fold predictions give an honest
validation score for the whole ensemble.

Outputs are combined in probability space for classification (the result is returned as
log-probabilities, so argmax, softmax and cross-entropy downstream still hold) and averaged for
regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from orca_engine.data import Dataset
from orca_engine.progress import Callbacks

if TYPE_CHECKING:
    from orca_engine.model import OrcaModel


def combine_outputs(task_type: str, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """One output from the members' outputs, in the form a single model returns."""
    stacked = torch.stack([o.float() for o in outputs])
    if task_type in ("classification", "dense_classification"):
        # mean probability over members, returned as log-probabilities (valid logits)
        return torch.logsumexp(torch.log_softmax(stacked, dim=2), dim=0) - np.log(len(outputs))
    if task_type == "multilabel":
        mean = torch.sigmoid(stacked).mean(dim=0).clamp(1e-7, 1 - 1e-7)
        return torch.log(mean) - torch.log1p(-mean)
    return stacked.mean(dim=0)


class EnsembleModel(nn.Module):
    """K models of one architecture whose outputs are combined by :func:`combine_outputs`."""

    def __init__(self, members: Sequence[OrcaModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def _member(self, index: int) -> OrcaModel:
        return cast("OrcaModel", self.members[index])

    @property
    def task_type(self) -> str:
        return self._member(0).task_type

    @property
    def embedder(self) -> nn.Module:
        """The first member's embedder (input kind and shape are the same for all)."""
        return self._member(0).embedder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_outputs(self.task_type, [member(x) for member in self.members])

    def config(self) -> dict[str, Any]:
        """The members' shared architecture plus their number (see ``model_from_config``)."""
        return {**self._member(0).config(), "ensemble_members": len(self.members)}


def _fold_ids(y: np.ndarray, task_type: str, k: int, seed: int) -> np.ndarray:
    """Fold number of every row: stratified for classification when each class has k+ rows."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n_rows = len(y)
    folds = np.zeros(n_rows, dtype=np.int64)
    stratified = False
    if task_type == "classification":
        _, counts = np.unique(y, return_counts=True)
        stratified = bool(counts.min() >= k)
    splitter = (
        StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        if stratified
        else KFold(n_splits=k, shuffle=True, random_state=seed)
    )
    for fold, (_, val_idx) in enumerate(
        splitter.split(np.zeros(n_rows), y if stratified else None)
    ):
        folds[val_idx] = fold
    return folds


def member_datasets(
    dataset: Dataset, k: int, seed: int, *, pooled: bool, folds: int = 5
) -> list[Dataset]:
    """The K members' train/validation splits.

    ``pooled``: train and validation rows (the latter held out by the loader, not the user's)
    are pooled and cut into ``max(k, folds)`` folds; member i validates on fold i, so each
    member holds out the usual share however few members there are. Otherwise every member
    keeps the user's validation split and the members differ only by seed.
    """
    if not pooled:
        return [dataset] * k
    x = np.concatenate([np.asarray(dataset.x_train), np.asarray(dataset.x_val)])
    y = np.concatenate([np.asarray(dataset.y_train), np.asarray(dataset.y_val)])
    fold_of = _fold_ids(y, dataset.info.task_type, max(k, folds), seed)
    members = []
    for fold in range(k):
        train, val = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        members.append(
            replace(dataset, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])
        )
    return members


def pooled_validation(members: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """All members' validation rows, in member order (the out-of-fold set when pooled)."""
    x = np.concatenate([np.asarray(m.x_val) for m in members])
    y = np.concatenate([np.asarray(m.y_val) for m in members])
    return x, y


class MemberCallbacks(Callbacks):
    """Forwards one member's events and progress as part of the whole refine stage."""

    def __init__(self, parent: Callbacks, index: int, count: int) -> None:
        self.parent, self.index, self.count = parent, index, count

    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        extra = {"member": self.index + 1, "members": self.count}
        self.parent.event(
            f"member {self.index + 1}/{self.count}: {message}",
            kind=kind,
            data={**(data or {}), **extra},
        )

    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        self.parent.progress(
            stage=stage, step=self.index * total + step, total=self.count * total, metrics=metrics
        )

    def cancelled(self) -> bool:
        return self.parent.cancelled()

    def check_cancelled(self) -> None:
        self.parent.check_cancelled()
