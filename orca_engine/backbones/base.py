"""The one surface every backbone exposes, and the registry/factory that builds them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from orca_engine.errors import BackboneUnavailable


class Backbone(nn.Module):
    """A pretrained encoder seen through ORCA's eyes.

    The task-specific embedder produces ``(B, T, embed_dim)`` tokens in the same space as the
    output of the backbone's *own* input embedding layer; :meth:`forward` runs the encoder body on
    them. :meth:`embed_source` runs that own input embedding layer on the backbone's native inputs
    (token ids for text, images for vision) so a source proxy lands in the same space.
    """

    family: ClassVar[str] = "text"  # "text" or "vision"

    #: registry id that rebuilds this backbone, e.g. "minilm-l6", "hf:/models/roberta"
    name: str
    #: width of the tokens forward() takes
    embed_dim: int
    #: width of what forward() returns
    output_dim: int
    #: most tokens forward() accepts in one sequence
    max_tokens: int

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Encode ``(B, T, embed_dim)`` tokens to ``(B, T_out, output_dim)`` hidden states.

        ``grid`` is the (rows, cols) layout of the T tokens for 2D inputs, None for sequences.
        """
        raise NotImplementedError

    def layer_outputs(
        self, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """The body's input and every layer's output, each ``(B, T, output_dim)``, first to last.

        Only bodies that keep one output token per input token and one width throughout (text
        encoders) have them; the default has only the last.
        """
        return [self(tokens, grid)]

    @property
    def n_layer_outputs(self) -> int:
        """How many tensors :meth:`layer_outputs` returns."""
        return 1

    def output_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        """The token grid of :meth:`forward`'s output for an input grid (differs for Swin)."""
        return grid

    def output_stride(self) -> int:
        """How many input tokens per side one output token covers (1, or 2**(stages-1) for Swin)."""
        return 1

    def sequence_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """The 2D layout a grid-only body (Swin) gives a 1D sequence of ``n_tokens``.

        None when the body takes token sequences as they are (text encoders, ViT).
        """
        return None

    def position_embeddings(
        self, n_tokens: int, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """Pretrained positions ``(n_tokens, embed_dim)`` to initialise an embedder with.

        None when the body adds positions itself (relative-position models such as Swin).
        """
        raise NotImplementedError

    def embed_source(self, inputs: Any) -> torch.Tensor:
        """Run the backbone's own input embedding layer on native inputs -> ``(B, T, embed_dim)``."""
        raise NotImplementedError

    def input_norm(self) -> nn.LayerNorm | None:
        """The LayerNorm that ends the backbone's own input embedding, if it has one.

        An embedder copies its scale and shift so its tokens start at the magnitude the body was
        trained on (MiniLM's embedding output has norm ~11, a unit LayerNorm's ~20).
        """
        return None

    def norm_parameter_names(self) -> list[str]:
        """Names (as in ``named_parameters()``) of every normalisation layer's weight and bias.

        What ``finetune.mode: layernorm`` trains in the body: the LayerNorms of a transformer,
        and likewise BatchNorm, GroupNorm and any ``*Norm`` module (a timm CNN, an RMSNorm
        model), so the mode never silently freezes a body that has no LayerNorm.
        """
        return [
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in self.named_modules()
            if _is_norm(module)
            for param_name, _ in module.named_parameters(recurse=False)
        ]

    def rebuild_config(self) -> dict[str, Any]:
        """JSON-able dict with which ``create_backbone(name, pretrained=False, config=...)``
        rebuilds this architecture (weights then come from the checkpoint)."""
        raise NotImplementedError


def square_grid(n_tokens: int) -> tuple[int, int]:
    """The most nearly square (rows, cols) grid with at least ``n_tokens`` cells, row-major."""
    rows = max(1, math.isqrt(max(n_tokens, 1)))
    cols = -(-n_tokens // rows)
    return rows, max(cols, 1)


BackboneFactory = Callable[..., Backbone]

_REGISTRY: dict[str, BackboneFactory] = {}
_PREFIX_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(
    name: str, *, prefix: bool = False
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory under ``name`` (or, with ``prefix=True``, for every ``name:<arg>`` id)."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        table = _PREFIX_REGISTRY if prefix else _REGISTRY
        if name in table:
            raise ValueError(f"backbone {name!r} registered twice")
        table[name] = factory
        return factory

    return decorator


def list_backbones() -> list[str]:
    """Registered exact names, then the prefixes as ``prefix:<arg>``."""
    return sorted(_REGISTRY) + sorted(f"{p}:<arg>" for p in _PREFIX_REGISTRY)


def create_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a registered backbone by id (``minilm-l6``, ``hf:<dir>``, ``timm:<arch>[@<weights>]``)."""
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    prefix, sep, arg = name.partition(":")
    if sep and prefix in _PREFIX_REGISTRY:
        return _PREFIX_REGISTRY[prefix](arg, **kwargs)
    raise BackboneUnavailable(
        f"unknown backbone {name!r}; known: {', '.join(list_backbones())}", param="backbone"
    )


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: a torch norm type, or a module named like one (``LlamaRMSNorm``)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")
