"""Task heads: the backbone's ``(B, T_out, d_out)`` hidden states -> the label space.

Point tasks (classification, multilabel, regression) average the tokens and apply one Linear,
or (``flat``, the default for series on text bodies) apply one Linear to all tokens side by side.
Dense tasks predict a patch of outputs per token and fold the patches back onto the input's own
length or image size (cropping the padding the embedder added), so a ``(C, L)`` input gives a
``(K, L)`` output and a ``(C, H, W)`` input a ``(K, H, W)`` output for any L, H, W.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orca_engine.backbones.base import Backbone
from orca_engine.embedders import Embedder
from orca_engine.errors import SpecError

POOLED_TASKS = ("classification", "multilabel", "regression")
DENSE_TASKS = ("dense_regression", "dense_classification")


class Head(nn.Module):
    """Base: remembers its task and sizes so :meth:`config` can rebuild it."""

    kind: str
    #: how many body layer outputs forward() takes (> 1: a ``(layers, B, T, d)`` stack)
    layers: int = 1
    #: > 0: forward() also takes the embedder's per-position features (``encode_local``)
    skip_features: int = 0

    def __init__(self, in_dim: int, out_dim: int, *, summary_features: int = 0) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.task_type = ""
        self.label_shape: tuple[int, ...] = ()
        self.summary_features = int(summary_features)
        self.summary: nn.Linear | None = None
        if self.summary_features:
            # starts at zero: the head begins as it would without the embedder's summary
            self.summary = nn.Linear(self.summary_features, out_dim, bias=False)
            nn.init.zeros_(self.summary.weight)

    def geometry(self) -> dict[str, Any]:
        """Constructor arguments beyond the sizes."""
        return {}

    def _plus_summary(self, out: torch.Tensor, summary: torch.Tensor | None) -> torch.Tensor:
        """Point heads: add a Linear read of the embedder's whole-sample features, if any."""
        if self.summary is None:
            return out
        if summary is None:
            raise RuntimeError("this head reads the embedder's summary, and none was given")
        return out + self.summary(summary.to(out.dtype))

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`head_from_config` rebuilds this head."""
        return {
            "kind": self.kind,
            "task_type": self.task_type,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "label_shape": list(self.label_shape),
            **self.geometry(),
            # absent without a summary, so older bundles rebuild unchanged
            **({"summary_features": self.summary_features} if self.summary_features else {}),
        }


class PooledHead(Head):
    """Mean over tokens, then Linear to ``out_dim`` logits/values: output ``(B, out_dim)``.

    ``summary_features`` > 0: a second Linear also reads the embedder's whole-sample features
    (a kernel bank's shares over the whole series) and adds to the output; the same for
    :class:`FlatHead`.
    """

    kind = "pooled"

    def __init__(self, in_dim: int, out_dim: int, *, summary_features: int = 0) -> None:
        super().__init__(in_dim, out_dim, summary_features=summary_features)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        return self._plus_summary(self.linear(hidden.mean(dim=1)), summary)


class FlatHead(Head):
    """All ``n_tokens`` hidden states side by side, then Linear: output ``(B, out_dim)``.

    Unlike the mean, it keeps which token (which stretch of a series) a feature came from, as a
    nearest-neighbour comparison of aligned series does. Only for bodies that keep one output
    token per input token (text bodies); others take the mean.

    ``layers`` > 1: the head reads a learned softmax-weighted mix of the body's input and every
    layer's output (``(layers, B, T, d)``, from :meth:`Backbone.layer_outputs`) instead of the
    last layer alone; the mix starts even.
    """

    kind = "flat"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        n_tokens: int,
        layers: int = 1,
        summary_features: int = 0,
    ) -> None:
        super().__init__(in_dim, out_dim, summary_features=summary_features)
        self.n_tokens = int(n_tokens)
        self.layers = int(layers)
        self.linear = nn.Linear(in_dim * self.n_tokens, out_dim)
        self.layer_logits: nn.Parameter | None = None
        if self.layers > 1:
            self.layer_logits = nn.Parameter(torch.zeros(self.layers))

    def geometry(self) -> dict[str, Any]:
        if self.layers > 1:  # absent for one layer, so older bundles rebuild unchanged
            return {"n_tokens": self.n_tokens, "layers": self.layers}
        return {"n_tokens": self.n_tokens}

    def layer_weights(self) -> torch.Tensor | None:
        """The mix over the body's layer outputs (first: the body's input), or None."""
        if self.layer_logits is None:
            return None
        return torch.softmax(self.layer_logits, 0)

    def forward(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.layer_weights()
        if weights is not None:
            hidden = torch.einsum("l,lbtd->btd", weights.to(hidden.dtype), hidden)
        return self._plus_summary(self.linear(hidden.flatten(1)), summary)


class SequenceDenseHead(Head):
    """Per token, ``out_dim * patch`` outputs, laid end to end and cropped to ``length``.

    For grid-only bodies (Swin) that lay a sequence out on a 2D ``layout`` and downsample it by
    ``stride``, each input token first takes the output token whose region contains it.
    """

    kind = "dense_sequence"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        length: int,
        n_tokens: int,
        patch: int,
        layout: tuple[int, int] | None = None,
        stride: int = 1,
        skip_features: int = 0,
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.length, self.n_tokens, self.patch = length, n_tokens, patch
        self.layout = tuple(layout) if layout is not None else None
        self.stride = stride
        self.linear = nn.Linear(in_dim, out_dim * patch)
        self.skip_features = int(skip_features)
        self.skip: nn.Conv1d | None = None
        if self.skip_features:
            # starts at zero: the head begins as it would without the embedder's local features
            self.skip = nn.Conv1d(self.skip_features, out_dim, 1, bias=False)
            nn.init.zeros_(self.skip.weight)

    def _per_input_token(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.layout is None:
            return hidden
        rows, cols = self.layout
        batch, n_out, width = hidden.shape
        out_rows = -(-rows // self.stride)
        grid = hidden.reshape(batch, out_rows, n_out // out_rows, width)
        grid = grid.repeat_interleave(self.stride, dim=1).repeat_interleave(self.stride, dim=2)
        return grid[:, :rows, :cols].reshape(batch, rows * cols, width)[:, : self.n_tokens]

    def forward(self, hidden: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """``local`` (with ``skip_features``): the embedder's per-position features ``(B, F, L)``."""
        tokens = self._per_input_token(hidden)
        batch, n_tokens, _ = tokens.shape
        out = self.linear(tokens).reshape(batch, n_tokens, self.out_dim, self.patch)
        out = out.permute(0, 2, 1, 3).reshape(batch, self.out_dim, n_tokens * self.patch)
        out = out[:, :, : self.length]
        if self.skip is None:
            return out
        if local is None:
            raise RuntimeError("this head reads the embedder's local features, and none were given")
        return out + self.skip(local.to(out.dtype))

    def geometry(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "n_tokens": self.n_tokens,
            "patch": self.patch,
            "layout": list(self.layout) if self.layout is not None else None,
            "stride": self.stride,
            # absent without a skip, so older bundles rebuild unchanged
            **({"skip_features": self.skip_features} if self.skip_features else {}),
        }


class ImageDenseHead(Head):
    """Per output token, an ``out_dim x s x s`` block, folded onto the grid and cropped to (H, W).

    ``s`` = input pixels per output token side: the embedder's patch times the body's stride.
    """

    kind = "dense_image"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        image_size: tuple[int, int],
        out_grid: tuple[int, int],
        pixels_per_token: int,
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.out_grid = (int(out_grid[0]), int(out_grid[1]))
        self.pixels_per_token = pixels_per_token
        self.linear = nn.Linear(in_dim, out_dim * pixels_per_token**2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0]
        rows, cols = self.out_grid
        s = self.pixels_per_token
        out = self.linear(hidden).reshape(batch, rows, cols, self.out_dim, s, s)
        out = out.permute(0, 3, 1, 4, 2, 5).reshape(batch, self.out_dim, rows * s, cols * s)
        height, width = self.image_size
        return out[:, :, :height, :width]

    def geometry(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "out_grid": list(self.out_grid),
            "pixels_per_token": self.pixels_per_token,
        }


def _dense_head(
    backbone: Backbone, embedder: Embedder, out_dim: int, *, local_skip: bool = False
) -> SequenceDenseHead | ImageDenseHead:
    stride = backbone.output_stride()
    if embedder.input_kind == "seq1d":
        layout = backbone.sequence_grid(embedder.n_tokens)
        return SequenceDenseHead(
            backbone.output_dim,
            out_dim,
            length=embedder.sample_shape[-1],
            n_tokens=embedder.n_tokens,
            patch=embedder.patch_size,
            layout=layout,
            stride=stride if layout is not None else 1,
            skip_features=embedder.local_features if local_skip else 0,
        )
    if embedder.input_kind == "image2d" and embedder.grid is not None:
        out_grid = backbone.output_grid(embedder.grid) or embedder.grid
        return ImageDenseHead(
            backbone.output_dim,
            out_dim,
            image_size=(embedder.sample_shape[1], embedder.sample_shape[2]),
            out_grid=out_grid,
            pixels_per_token=embedder.patch_size * stride,
        )
    raise SpecError(
        f"dense tasks need (C, L) sequences or (C, H, W) images, not {embedder.input_kind} inputs",
        param="task.type",
    )


def create_head(
    task_type: str,
    *,
    backbone: Backbone,
    embedder: Embedder,
    out_dim: int,
    label_shape: tuple[int, ...],
    flat: bool = False,
    layer_mix: bool = False,
    local_skip: bool = False,
) -> Head:
    """The head for ``task_type``; ``out_dim`` is classes, targets, or dense output channels K.

    ``flat``: point tasks read every token (:class:`FlatHead`) where the body keeps them;
    ``layer_mix`` (with ``flat``): that head reads a learned mix of all the body's layers.
    Point heads also read the embedder's whole-sample features when it has some
    (``embedder.summary_features``).
    """
    if out_dim < 1:
        raise SpecError(f"a head needs out_dim >= 1, got {out_dim}", param="task.type")
    if task_type in POOLED_TASKS:
        keeps_tokens = backbone.family != "vision"
        head: Head = (
            FlatHead(
                backbone.output_dim,
                out_dim,
                n_tokens=embedder.n_tokens,
                layers=backbone.n_layer_outputs if layer_mix else 1,
                summary_features=embedder.summary_features,
            )
            if flat and keeps_tokens
            else PooledHead(
                backbone.output_dim, out_dim, summary_features=embedder.summary_features
            )
        )
    elif task_type in DENSE_TASKS:
        head = _dense_head(backbone, embedder, out_dim, local_skip=local_skip)
    else:
        raise SpecError(f"unknown task type {task_type!r}", param="task.type")
    head.task_type = task_type
    head.label_shape = tuple(int(s) for s in label_shape)
    return head


_HEAD_KINDS: dict[str, Callable[..., Head]] = {
    PooledHead.kind: PooledHead,
    FlatHead.kind: FlatHead,
    SequenceDenseHead.kind: SequenceDenseHead,
    ImageDenseHead.kind: ImageDenseHead,
}


def head_from_config(config: dict[str, Any]) -> Head:
    """Rebuild a head from :meth:`Head.config` output (weights then come from a checkpoint)."""
    geometry = {
        k: v
        for k, v in config.items()
        if k not in ("kind", "task_type", "in_dim", "out_dim", "label_shape")
    }
    if "layout" in geometry and geometry["layout"] is not None:
        geometry["layout"] = tuple(geometry["layout"])
    head = _HEAD_KINDS[config["kind"]](int(config["in_dim"]), int(config["out_dim"]), **geometry)
    head.task_type = config["task_type"]
    head.label_shape = tuple(int(s) for s in config["label_shape"])
    return head
