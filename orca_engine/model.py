"""``OrcaModel`` = embedder -> pretrained backbone -> head, and which of its parts train."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orca_engine.backbones import Backbone, create_backbone
from orca_engine.embedders import Embedder, create_embedder, embedder_from_config
from orca_engine.errors import SpecError
from orca_engine.heads import POOLED_TASKS, Head, create_head, head_from_config

TRAINABLE_MODES = ("full", "layernorm", "frozen", "embedder")
CONFIG_VERSION = 1


class OrcaModel(nn.Module):
    """The ORCA model: a task embedder in front of a pretrained body, a task head behind it."""

    def __init__(self, embedder: Embedder, backbone: Backbone, head: Head) -> None:
        super().__init__()
        self.embedder = embedder
        self.backbone = backbone
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedder output ``(B, T, d)``: what distribution alignment compares with the source."""
        return self.embedder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Task outputs: ``(B, out_dim)`` for pooled tasks, ``(B, K, *spatial)`` for dense ones."""
        if self.head.skip_features:
            tokens, local = self.embedder.encode_local(x)
            return self.head(self._hidden(tokens), local)
        if self.head.summary_features:
            tokens, summary = self.embedder.encode(x)
            return self.head(self._hidden(tokens), summary)
        return self.head(self._hidden(self.embedder(x)))

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the head reads: the last layer, or ``(layers, B, T, d)`` for a layer mix."""
        if self.head.layers > 1:
            return torch.stack(self.backbone.layer_outputs(tokens, self.embedder.grid))
        return self.backbone(tokens, self.embedder.grid)

    @property
    def task_type(self) -> str:
        return self.head.task_type

    def config(self) -> dict[str, Any]:
        """Plain JSON that :func:`model_from_config` turns back into this architecture."""
        return {
            "version": CONFIG_VERSION,
            "task_type": self.head.task_type,
            "out_dim": self.head.out_dim,
            "input_kind": self.embedder.input_kind,
            "sample_shape": list(self.embedder.sample_shape),
            "label_shape": list(self.head.label_shape),
            "embedder": self.embedder.config(),
            "head": self.head.config(),
            "backbone": {"name": self.backbone.name, "config": self.backbone.rebuild_config()},
        }


def build_model(
    *,
    info: Any,
    task_type: str,
    out_dim: int,
    backbone: Backbone | str,
    token_budget: int,
    allow_random_init: bool = False,
    stem_channels: int = 0,
    flat_head: bool = False,
    kernel_bank: bool = False,
    layer_mix: bool = False,
    kernel_summary: bool = False,
    local_skip: bool = False,
    circular: bool = False,
    stem_layers: int = 1,
) -> OrcaModel:
    """A fresh model for a dataset (any object with ``input_kind``, ``sample_shape``, ``label_shape``).

    ``backbone`` is a built :class:`Backbone` or a registry name to build (pretrained).
    """
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, allow_random_init=allow_random_init)
    embedder = create_embedder(
        info.input_kind,
        tuple(info.sample_shape),
        backbone,
        token_budget=token_budget,
        stem_channels=stem_channels,
        kernel_bank=kernel_bank,
        kernel_summary=kernel_summary and task_type in POOLED_TASKS,
        circular=circular,
        stem_layers=stem_layers,
    )
    head = create_head(
        task_type,
        backbone=backbone,
        embedder=embedder,
        out_dim=out_dim,
        label_shape=tuple(info.label_shape),
        flat=flat_head,
        layer_mix=layer_mix,
        local_skip=local_skip,
    )
    return OrcaModel(embedder, backbone, head)


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """The architecture described by :meth:`OrcaModel.config`, weights random until loaded.

    A config with ``ensemble_members`` > 1 (written by :class:`EnsembleModel`) rebuilds that many
    members of the same architecture.
    """
    members = int(config.get("ensemble_members", 1))
    if members > 1:
        from orca_engine.ensemble import EnsembleModel

        single = {k: v for k, v in config.items() if k != "ensemble_members"}
        return EnsembleModel([_single_from_config(single) for _ in range(members)])
    return _single_from_config(config)


def _single_from_config(config: dict[str, Any]) -> OrcaModel:
    backbone_config = config["backbone"]
    backbone = create_backbone(
        backbone_config["name"], pretrained=False, config=backbone_config["config"]
    )
    embedder = embedder_from_config(config["embedder"], backbone)
    head = head_from_config(config["head"])
    return OrcaModel(embedder, backbone, head)


def set_trainable(model: OrcaModel, mode: str) -> list[str]:
    """Freeze all but the parts ``mode`` trains; returns the trainable parameter names.

    ``full``: everything. ``layernorm`` (the FPT baseline): every normalisation layer of the
    backbone (its LayerNorms in a transformer; see ``Backbone.norm_parameter_names``) plus the
    whole embedder and head. ``frozen``: the head only. ``embedder``: the embedder only (stage 2).
    """
    if mode not in TRAINABLE_MODES:
        raise SpecError(
            f"unknown fine-tuning mode {mode!r}; expected one of {TRAINABLE_MODES}",
            param="finetune.mode",
        )
    backbone_norms = {f"backbone.{n}" for n in model.backbone.norm_parameter_names()}
    trainable: list[str] = []
    for name, parameter in model.named_parameters():
        part = name.split(".", 1)[0]
        if mode == "full":
            wanted = True
        elif mode == "layernorm":
            wanted = part in ("embedder", "head") or name in backbone_norms
        elif mode == "frozen":
            wanted = part == "head"
        else:
            wanted = part == "embedder"
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    return trainable
