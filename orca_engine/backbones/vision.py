"""timm vision transformers (ViT/DeiT and Swin) as ORCA backbones.

Images are never resized to the pretraining resolution: ViTs are built with
``dynamic_img_size=True`` and their position table is resampled to the embedder's grid; Swin
takes any grid because timm pads windows itself and we pad the grid to a multiple of the total
patch-merging factor (zero tokens at the bottom/right), so every stage halves it exactly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orca_engine.backbones.base import Backbone, register_backbone, square_grid
from orca_engine.errors import BackboneUnavailable

logger = logging.getLogger(__name__)

#: grid-size cap for vision bodies (the token budget from the spec is usually smaller)
VISION_MAX_TOKENS = 4096
#: a checkpoint missing more than this fraction of the model's tensors is refused
MAX_MISSING_FRACTION = 0.1
WEIGHT_FILES_IN_DIR = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# open_clip checkpoints hold a timm image tower under this prefix (next to a text tower we drop).
_TOWER_PREFIX = "visual.trunk."
# Wrappers (DDP, training scripts) that put a prefix in front of every key.
_WRAPPER_PREFIXES = ("module.", "model.")

_TINY_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-vit": {
        "kind": "vit",
        "kwargs": {
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
    },
    "tiny-swin": {
        "kind": "swin",
        "kwargs": {
            "img_size": 32,
            "patch_size": 2,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [1, 2],
            "window_size": 4,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
    },
}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class TimmVisionBackbone(Backbone):
    """Shared parts of the timm backbones: rebuild description and image attributes."""

    family = "vision"

    def __init__(self, model: nn.Module, *, name: str, build: dict[str, Any]) -> None:
        super().__init__()
        self.model: Any = model  # timm models are dynamically typed
        self.name = name
        self.build = build
        patch_embed: Any = model.patch_embed
        self.image_size = _pair(patch_embed.img_size)
        self.patch_size = _pair(patch_embed.patch_size)[0]
        self.in_chans = int(getattr(self.model, "in_chans", 3))
        self.max_tokens = VISION_MAX_TOKENS
        self.load_report: dict[str, list[str]] = {"missing": [], "unexpected": []}

    def rebuild_config(self) -> dict[str, Any]:
        """``{"kind", "arch", "kwargs"}``: enough for timm to build the same architecture."""
        return dict(self.build)


class TimmViTBackbone(TimmVisionBackbone):
    """A timm ``VisionTransformer`` (ViT, DeiT, ...): prefix tokens + blocks + final norm."""

    def __init__(self, model: nn.Module, *, name: str, build: dict[str, Any]) -> None:
        super().__init__(model, name=name, build=build)
        self.embed_dim = int(self.model.embed_dim)
        self.output_dim = int(self.model.num_features)

    def _prefix_tokens(self, batch: int) -> torch.Tensor | None:
        model = self.model
        parts = [t for t in (model.cls_token, model.reg_token) if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts, dim=1)
        if model.pos_embed is not None and not model.no_embed_class:
            prefix = prefix + model.pos_embed[:, : model.num_prefix_tokens]
        # Patch tokens from the embedder already live after norm_pre; bring the prefix there too.
        return model.norm_pre(prefix).expand(batch, -1, -1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Prepend cls/register tokens, run blocks + norm, return the patch tokens only."""
        model = self.model
        prefix = self._prefix_tokens(tokens.shape[0])
        x = tokens if prefix is None else torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        x = model.blocks(x)
        x = model.norm(x)
        return x[:, model.num_prefix_tokens :]

    def position_embeddings(
        self, n_tokens: int, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """The pretrained position table resampled to ``grid`` (near-square layout for 1D)."""
        from timm.layers import resample_abs_pos_embed

        model = self.model
        if model.pos_embed is None:
            return None
        table = (
            model.pos_embed
            if model.no_embed_class
            else model.pos_embed[:, model.num_prefix_tokens :]
        )
        target = grid if grid is not None else square_grid(n_tokens)
        with torch.no_grad():
            resampled = resample_abs_pos_embed(
                table.detach(),
                new_size=list(target),
                old_size=list(model.patch_embed.grid_size),
                num_prefix_tokens=0,
                verbose=False,
            )
        return resampled[0, :n_tokens].clone()

    def embed_source(self, inputs: Any) -> torch.Tensor:
        """patch_embed + positions (+ norm_pre) of ``(B, C, H, W)`` images, without prefix tokens."""
        model = self.model
        x = model.patch_embed(inputs)
        x = model._pos_embed(x)
        x = model.norm_pre(x)
        return x[:, model.num_prefix_tokens :]


class TimmSwinBackbone(TimmVisionBackbone):
    """A timm ``SwinTransformer``: hierarchical, relative positions, downsampled output grid."""

    def __init__(self, model: nn.Module, *, name: str, build: dict[str, Any]) -> None:
        super().__init__(model, name=name, build=build)
        self.embed_dim = int(self.model.embed_dim)
        self.output_dim = int(self.model.num_features)
        self.merge_factor = 2 ** (len(self.model.layers) - 1)

    def _padded_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        f = self.merge_factor
        return -(-grid[0] // f) * f, -(-grid[1] // f) * f

    def output_stride(self) -> int:
        return self.merge_factor

    def sequence_grid(self, n_tokens: int) -> tuple[int, int] | None:
        return square_grid(n_tokens)

    def output_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        if grid is None:
            return None
        rows, cols = self._padded_grid(grid)
        return rows // self.merge_factor, cols // self.merge_factor

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Lay tokens out on ``grid`` (or a near-square grid for 1D), pad, run the stages."""
        batch, n_tokens, width = tokens.shape
        layout = grid if grid is not None else square_grid(n_tokens)
        rows, cols = layout
        if rows * cols != n_tokens:
            tokens = F.pad(tokens, (0, 0, 0, rows * cols - n_tokens))
        x = tokens.reshape(batch, rows, cols, width)
        padded_rows, padded_cols = self._padded_grid(layout)
        x = F.pad(x, (0, 0, 0, padded_cols - cols, 0, padded_rows - rows))
        model = self.model
        x = model.norm(model.layers(x))
        return x.reshape(batch, -1, x.shape[-1])

    def position_embeddings(
        self, n_tokens: int, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """None: Swin's attention carries relative positions itself."""
        return None

    def input_norm(self) -> nn.LayerNorm | None:
        """Swin's patch embedding ends in a LayerNorm (``patch_embed.norm``)."""
        norm = getattr(getattr(self.model, "patch_embed", None), "norm", None)
        return norm if isinstance(norm, nn.LayerNorm) else None

    def embed_source(self, inputs: Any) -> torch.Tensor:
        """The (normalised) patch embedding of ``(B, C, H, W)`` images, flattened to tokens."""
        x = self.model.patch_embed(inputs)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def _wrap(model: nn.Module, *, name: str, build: dict[str, Any]) -> TimmVisionBackbone:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return TimmViTBackbone(model, name=name, build={**build, "kind": "vit"})
    if isinstance(model, SwinTransformer):
        return TimmSwinBackbone(model, name=name, build={**build, "kind": "swin"})
    raise BackboneUnavailable(
        f"backbone {name!r}: {type(model).__name__} is not supported; use a timm ViT/DeiT "
        "(vit_*, deit_*) or Swin (swin_*) architecture",
        param="backbone",
    )


def _create_timm_model(arch: str, kwargs: dict[str, Any], *, name: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown architectures
        raise BackboneUnavailable(f"backbone {name!r}: {exc}", param="backbone") from exc


def _build_kwargs_for(arch: str, *, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Create ``arch`` headless, with native-grid support when the architecture has it."""
    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    try:
        return _create_timm_model(arch, kwargs, name=name), kwargs
    except TypeError:
        kwargs = {"num_classes": 0}
        return _create_timm_model(arch, kwargs, name=name), kwargs


def _read_state_dict(weights: Path, *, name: str) -> dict[str, torch.Tensor]:
    if weights.is_dir():
        found = next((weights / f for f in WEIGHT_FILES_IN_DIR if (weights / f).is_file()), None)
        if found is None:
            raise BackboneUnavailable(
                f"backbone {name!r}: no weights in {weights} (looked for {', '.join(WEIGHT_FILES_IN_DIR)})",
                param="backbone",
            )
        weights = found
    if not weights.is_file():
        raise BackboneUnavailable(
            f"backbone {name!r}: weights file {weights} not found", param="backbone"
        )
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: tell the user which one
        raise BackboneUnavailable(
            f"backbone {name!r}: cannot read weights {weights}: {exc}", param="backbone"
        ) from exc
    for wrapper_key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict):
        raise BackboneUnavailable(
            f"backbone {name!r}: {weights} holds no state dict", param="backbone"
        )
    if any(k.startswith(_TOWER_PREFIX) for k in state):
        state = {
            k[len(_TOWER_PREFIX) :]: v for k, v in state.items() if k.startswith(_TOWER_PREFIX)
        }
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_timm_weights(model: nn.Module, weights: Path, *, name: str) -> dict[str, list[str]]:
    """Load a local checkpoint into ``model`` (strict=False) and report what did not match."""
    state = _read_state_dict(weights, name=name)
    # timm's own converters handle original-repo key names and resize position tables.
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # a converter that chokes on already-converted keys
            logger.info("checkpoint_filter_fn skipped for %s: %s", weights, exc)
    model_keys = model.state_dict()
    state = {
        k: v for k, v in state.items() if not (k in model_keys and model_keys[k].shape != v.shape)
    }
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("relative_position_index")]
    report = {"missing": missing, "unexpected": list(result.unexpected_keys)}
    if missing:
        logger.warning(
            "backbone %s: %d tensors missing from %s: %s", name, len(missing), weights, missing[:10]
        )
    if report["unexpected"]:
        logger.warning(
            "backbone %s: %d unexpected tensors ignored in %s: %s",
            name,
            len(report["unexpected"]),
            weights,
            report["unexpected"][:10],
        )
    if len(missing) > MAX_MISSING_FRACTION * len(model_keys):
        raise BackboneUnavailable(
            f"backbone {name!r}: {weights} lacks {len(missing)} of {len(model_keys)} tensors "
            f"(e.g. {', '.join(missing[:5])}); is it a checkpoint for this architecture?",
            param="backbone",
        )
    return report


@register_backbone("timm", prefix=True)
def create_timm_backbone(
    spec: str,
    *,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
    allow_random_init: bool = False,
) -> TimmVisionBackbone:
    """``timm:<arch>[@<weights file or dir>]``: a timm ViT/Swin with local weights."""
    arch, _, weights = spec.partition("@")
    name = f"timm:{spec}"
    if config is not None:
        model = _create_timm_model(config["arch"], dict(config["kwargs"]), name=name)
        return _wrap(model, name=name, build=config)
    if pretrained and not weights and not allow_random_init:
        raise BackboneUnavailable(
            f"backbone {name!r} has no weights: use timm:{arch}@<weights file or dir>, or set "
            "allow_random_init to train from a random initialisation",
            param="backbone",
        )
    model, kwargs = _build_kwargs_for(arch, name=name)
    backbone = _wrap(model, name=name, build={"arch": arch, "kwargs": kwargs})
    if pretrained and weights:
        backbone.load_report = load_timm_weights(model, Path(weights), name=name)
    return backbone


def _register_tiny_vision(name: str) -> None:
    def factory(
        *,
        pretrained: bool = True,
        config: dict[str, Any] | None = None,
        allow_random_init: bool = False,
    ) -> TimmVisionBackbone:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.vision_transformer import VisionTransformer

        build = dict(config) if config else dict(_TINY_VISION_CONFIGS[name])
        kwargs = dict(build["kwargs"])
        if "depths" in kwargs:
            kwargs["depths"] = tuple(kwargs["depths"])
            kwargs["num_heads"] = tuple(kwargs["num_heads"])
        model_class = VisionTransformer if build["kind"] == "vit" else SwinTransformer
        return _wrap(model_class(**kwargs), name=name, build={**build, "arch": None})

    factory.__doc__ = f"{name}: a tiny randomly initialised timm model for fast tests."
    register_backbone(name)(factory)


for _tiny_name in _TINY_VISION_CONFIGS:
    _register_tiny_vision(_tiny_name)
