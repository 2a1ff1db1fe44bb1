"""Checkpoints: the exported model bundle and the per-stage resume files, all written atomically.

A *bundle* is a directory a user can download and rebuild without the code that trained it::

    model.safetensors   embedder + backbone + head weights (each distinct tensor stored once)
    config.json         format version, resolved spec, model config, normaliser, label map, ...
    metrics.json        {"val": {...}, "test": {...}, "alignment": {"before", "after"}}
    curves.json         {"alignment": [...], "refine": [...per-epoch history...]}

It is written into a temporary sibling directory and renamed into place, so a bundle directory
exists only when it is complete. *Stage checkpoints* are plain dicts saved with ``torch.save``
to a temporary file and ``os.replace``-d over the old one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import orca_engine
from orca_engine.errors import EngineError

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.json"
# safetensors metadata key listing state-dict names stored once because they share memory or
# hold exactly the same values as another entry (an ensemble's untouched backbone weights)
_ALIASES_KEY = "orca_aliases"


class BundleError(EngineError):
    """A bundle directory is missing files, or was written by an incompatible engine."""

    code = "bundle_invalid"


# --- stage checkpoints -----------------------------------------------------------------------


def save_stage(path: str | Path, state: dict[str, Any]) -> None:
    """Write a stage checkpoint atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_stage(path: str | Path) -> dict[str, Any] | None:
    """A stage checkpoint written by :func:`save_stage`, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON atomically (temp file + rename)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and tuples sneak into configs; make them plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- weights ---------------------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        *_storage_key(tensor),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def _content_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """dtype, shape and a digest of the bytes of a contiguous CPU tensor."""
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return (tensor.dtype, tuple(tensor.shape), hashlib.blake2b(raw.data, digest_size=16).digest())


def save_weights(model: nn.Module, path: Path) -> None:
    """``model.state_dict()`` as safetensors: contiguous CPU tensors, each distinct one stored once.

    safetensors refuses tensors that share memory. A state-dict entry that is exactly another
    entry (tied weights) or holds exactly the same values as an earlier one is dropped and
    recorded as an alias in the file's metadata. With a LayerNorm-only ensemble that is most of
    the file: the members' frozen backbone weights are identical, so they are written once instead
    of once per member. Entries that merely overlap another's storage are copied so each is stored
    on its own.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name_of_view: dict[tuple[Any, ...], str] = {}
    first_name_of_content: dict[tuple[Any, ...], str] = {}
    storages_seen: set[tuple[Any, ...]] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        view = _view_key(tensor)
        if view in first_name_of_view:
            aliases[name] = first_name_of_view[view]
            continue
        first_name_of_view[view] = name
        storage = _storage_key(tensor)
        shares_storage = storage in storages_seen
        storages_seen.add(storage)
        cpu_tensor = tensor.to("cpu")
        if shares_storage:
            cpu_tensor = cpu_tensor.clone()
        cpu_tensor = cpu_tensor.contiguous()
        content = _content_key(cpu_tensor)
        same = first_name_of_content.get(content)
        if same is not None and torch.equal(tensors[same], cpu_tensor):
            aliases[name] = same
            continue
        first_name_of_content.setdefault(content, name)
        tensors[name] = cpu_tensor
    save_file(tensors, str(path), metadata={_ALIASES_KEY: json.dumps(aliases)})


def load_weights(model: nn.Module, path: Path, *, share_identical: bool = False) -> None:
    """Load :func:`save_weights` output into ``model`` strictly (every key present, none extra).

    ``share_identical``: entries stored once are then one tensor in memory too (an ensemble's
    members share their frozen backbone weights). Only for a model used for inference: training
    it would update a shared weight on behalf of every member that holds it.
    """
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    aliases: dict[str, str] = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    for alias, stored_as in aliases.items():
        tensors[alias] = tensors[stored_as]
    model.load_state_dict(tensors, strict=True)
    if share_identical:
        _share_aliases(model, aliases)


def _share_aliases(model: nn.Module, aliases: dict[str, str]) -> None:
    """Point each aliased parameter or buffer at the tensor of the entry it was stored as."""
    for alias, stored_as in aliases.items():
        owner_path, _, attribute = alias.rpartition(".")
        owner = model.get_submodule(owner_path)
        if attribute in owner._parameters:
            source = model.get_parameter(stored_as)
            if owner._parameters[attribute] is not source:
                owner._parameters[attribute] = source
        elif attribute in owner._buffers:
            owner._buffers[attribute] = model.get_buffer(stored_as)


# --- bundles ---------------------------------------------------------------------------------


def save_bundle(
    bundle_dir: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    curves: dict[str, Any],
) -> Path:
    """Write a complete bundle at ``bundle_dir`` (replacing an older one) or nothing at all.

    ``config`` is what the pipeline knows (resolved spec, normaliser, label map, ...); the model's
    own rebuild config, the format and the engine version are added here.
    """
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    full_config = {
        **config,
        "format_version": BUNDLE_FORMAT_VERSION,
        "engine_version": orca_engine.__version__,
        "model": model.config(),  # type: ignore[operator]
    }
    temporary = bundle_dir.with_name(f".{bundle_dir.name}.{uuid.uuid4().hex}.partial")
    temporary.mkdir()
    try:
        save_weights(model, temporary / WEIGHTS_FILE)
        write_json(temporary / CONFIG_FILE, full_config)
        write_json(temporary / METRICS_FILE, metrics)
        write_json(temporary / CURVES_FILE, curves)
        _replace_dir(temporary, bundle_dir)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info("saved model bundle to %s", bundle_dir)
    return bundle_dir


def _replace_dir(source: Path, target: Path) -> None:
    # rename() cannot replace a non-empty directory: move the old one aside first, so at every
    # instant `target` is either absent, the old complete bundle, or the new complete one.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_bundle_config(bundle_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a bundle, checked for a format this engine understands."""
    bundle_dir = Path(bundle_dir)
    config_path = bundle_dir / CONFIG_FILE
    if not config_path.is_file() or not (bundle_dir / WEIGHTS_FILE).is_file():
        raise BundleError(f"{bundle_dir} is not a model bundle (no {CONFIG_FILE} / {WEIGHTS_FILE})")
    config: dict[str, Any] = json.loads(config_path.read_text())
    version = config.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle format {version!r} is not supported (this engine reads {BUNDLE_FORMAT_VERSION})"
        )
    return config


def load_bundle(
    bundle_dir: str | Path, *, share_identical: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``config.json`` alone (no pretrained download) and load its weights.

    ``share_identical``: see :func:`load_weights` (prediction sets it; a model to train must not).
    """
    from orca_engine.model import model_from_config

    bundle_dir = Path(bundle_dir)
    config = read_bundle_config(bundle_dir)
    model = model_from_config(config["model"])
    load_weights(model, bundle_dir / WEIGHTS_FILE, share_identical=share_identical)
    model.eval()
    return model, config
