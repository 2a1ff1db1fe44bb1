"""Source proxies: data the backbone was made for, seen through its own input embedding layer.

A proxy is a registered builder ``(backbone, n_samples, seed) -> (features, labels)``; features are
``backbone.embed_source`` outputs mean-pooled over tokens (non-padding tokens for text), so they
live in the same space as the task embedder's pooled output. Built proxies are cached on disk as
safetensors keyed by proxy, backbone fingerprint, sample count and seed.

* ``english-text`` (text backbones): real English sentences shipped in ``data/`` (stdlib
  docstrings, PSF licence; see ``data/README.md``), tokenised to ``TEXT_MAX_TOKENS``. Backbones
  without a tokenizer (tiny test models) get seeded random token ids instead.
* ``natural-images`` (vision backbones): seeded random crops of scikit-learn's two sample photos,
  resized to the backbone's image size and ImageNet-normalised.
* ``dataset:<path.npz>``: an uploaded dataset's ``x_train`` (token ids for text backbones,
  ``(N, C, H, W)`` images for vision backbones) with ``y_train`` class ids as labels.

Labels: the paper's text proxy (CoNLL-2003) had NER labels; ours have none, so labels are k-means
pseudo-labels on the pooled features (``DEFAULT_CLUSTERS`` clusters, seeded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from orca_engine.distances import SourceData, kmeans_labels
from orca_engine.errors import SpecError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
SENTENCES_FILE = DATA_DIR / "english_sentences.txt"
TEXT_MAX_TOKENS = 64
DEFAULT_CLUSTERS = 10
EMBED_BATCH = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ProxyBuilder = Callable[[Any, int, int], tuple[torch.Tensor, torch.Tensor | None]]

_REGISTRY: dict[str, ProxyBuilder] = {}
DATASET_PREFIX = "dataset:"


def register_proxy(name: str) -> Callable[[ProxyBuilder], ProxyBuilder]:
    """Register ``builder(backbone, n_samples, seed) -> (features (n, d), labels | None)``.

    Builders return None labels to get k-means pseudo-labels.
    """

    def decorator(builder: ProxyBuilder) -> ProxyBuilder:
        if name in _REGISTRY:
            raise ValueError(f"proxy {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_proxies() -> list[str]:
    """Registered proxy names plus the ``dataset:<path.npz>`` form."""
    return [*sorted(_REGISTRY), f"{DATASET_PREFIX}<path.npz>"]


def default_proxy(backbone: Any) -> str:
    """``english-text`` for text backbones, ``natural-images`` for vision backbones."""
    return "natural-images" if getattr(backbone, "family", "text") == "vision" else "english-text"


def backbone_fingerprint(backbone: Any) -> str:
    """Short stable id of a backbone architecture+name (cache key; weights follow from the name)."""
    try:
        config = backbone.rebuild_config()
    except NotImplementedError:
        config = {}
    blob = json.dumps({"name": backbone.name, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_path(cache_dir: Path, name: str, backbone: Any, n_samples: int, seed: int) -> Path:
    proxy_key = name
    if name.startswith(DATASET_PREFIX):
        path = Path(name[len(DATASET_PREFIX) :])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
        proxy_key = f"dataset-{digest}"
    safe_key = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in proxy_key)
    return cache_dir / f"{safe_key}-{backbone_fingerprint(backbone)}-{n_samples}-{seed}.safetensors"


def build_proxy(
    name: str,
    backbone: Any,
    *,
    n_samples: int = 5000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    n_clusters: int = DEFAULT_CLUSTERS,
) -> SourceData:
    """Embed proxy ``name`` through ``backbone``'s own embedding layer; read/write the disk cache."""
    if name == "auto":
        name = default_proxy(backbone)
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_path(Path(cache_dir), name, backbone, n_samples, seed)
        if cache_file.is_file():
            tensors = load_file(str(cache_file))
            logger.info("proxy %s loaded from %s", name, cache_file)
            return SourceData(tensors["features"], tensors["labels"], name)

    if name.startswith(DATASET_PREFIX):
        features, labels = _dataset_proxy(name[len(DATASET_PREFIX) :], backbone, n_samples, seed)
    elif name in _REGISTRY:
        features, labels = _REGISTRY[name](backbone, n_samples, seed)
    else:
        raise SpecError(
            f"unknown source proxy {name!r}; known: {', '.join(list_proxies())}",
            param="alignment.source",
        )
    features = features.detach().float().cpu().contiguous()
    if labels is None:
        labels = torch.from_numpy(kmeans_labels(features, n_clusters, seed))
    labels = labels.long().cpu().contiguous()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        os.close(handle)
        save_file({"features": features, "labels": labels}, tmp_name)
        os.replace(tmp_name, cache_file)
    return SourceData(features, labels, name)


# ----------------------------------------------------------------------------- embedding


def _backbone_device(backbone: Any) -> torch.device:
    try:
        return next(backbone.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def embed_token_ids(
    backbone: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over non-padding tokens of ``backbone.embed_source`` -> ``(n, d)``, in batches."""
    device = _backbone_device(backbone)
    pooled = []
    for start in range(0, len(input_ids), EMBED_BATCH):
        ids = input_ids[start : start + EMBED_BATCH].to(device)
        mask = attention_mask[start : start + EMBED_BATCH].to(device)
        tokens = backbone.embed_source({"input_ids": ids, "attention_mask": mask})
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        pooled.append(((tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)).cpu())
    return torch.cat(pooled)


@torch.no_grad()
def embed_images(backbone: Any, images: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``backbone.embed_source`` on ``(n, C, H, W)`` images -> ``(n, d)``."""
    device = _backbone_device(backbone)
    pooled = [
        backbone.embed_source(images[start : start + EMBED_BATCH].to(device)).mean(1).cpu()
        for start in range(0, len(images), EMBED_BATCH)
    ]
    return torch.cat(pooled)


def _random_token_ids(
    backbone: Any, n_samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ids for backbones without a tokenizer (tiny test models)."""
    generator = torch.Generator().manual_seed(seed)
    length = min(TEXT_MAX_TOKENS, int(getattr(backbone, "max_tokens", TEXT_MAX_TOKENS)))
    ids = torch.randint(0, int(backbone.vocab_size), (n_samples, length), generator=generator)
    return ids, torch.ones_like(ids)


def load_sentences() -> list[str]:
    """The shipped English sentences, one per line."""
    return [line for line in SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line]


@register_proxy("english-text")
def english_text_proxy(backbone: Any, n_samples: int, seed: int) -> tuple[torch.Tensor, None]:
    """Shipped English sentences (seeded sample of ``n_samples``) through the text embedding layer."""
    if getattr(backbone, "family", "text") != "text":
        raise SpecError("english-text is a proxy for text backbones", param="alignment.source")
    tokenizer = getattr(backbone, "tokenizer", None)
    if tokenizer is None:
        ids, mask = _random_token_ids(backbone, n_samples, seed)
        return embed_token_ids(backbone, ids, mask), None
    sentences = load_sentences()
    rng = np.random.default_rng(seed)
    # More samples than sentences: sample with replacement (features then repeat).
    picks = rng.choice(len(sentences), size=n_samples, replace=n_samples > len(sentences))
    encoded = tokenizer(
        [sentences[i] for i in picks],
        padding="max_length",
        truncation=True,
        max_length=TEXT_MAX_TOKENS,
        return_tensors="pt",
    )
    return embed_token_ids(backbone, encoded["input_ids"], encoded["attention_mask"]), None


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of ``(n, 3, H, W)`` images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


@register_proxy("natural-images")
def natural_images_proxy(backbone: Any, n_samples: int, seed: int) -> tuple[torch.Tensor, None]:
    """Seeded random crops (1/4 to full side) of scikit-learn's sample photos, resized and normalised."""
    from sklearn.datasets import load_sample_images

    if getattr(backbone, "family", "text") != "vision":
        raise SpecError("natural-images is a proxy for vision backbones", param="alignment.source")
    height, width = backbone.image_size
    photos = [
        torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0
        for img in load_sample_images().images
    ]
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n_samples):
        photo = photos[int(rng.integers(len(photos)))]
        _, photo_h, photo_w = photo.shape
        side = int(rng.integers(min(photo_h, photo_w) // 4, min(photo_h, photo_w) + 1))
        top = int(rng.integers(0, photo_h - side + 1))
        left = int(rng.integers(0, photo_w - side + 1))
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        crops.append(
            torch.nn.functional.interpolate(
                crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
        )
    images = normalise_images(torch.cat(crops))
    in_chans = int(getattr(backbone, "in_chans", 3))
    if in_chans != 3:
        images = images.mean(dim=1, keepdim=True).expand(-1, in_chans, -1, -1).contiguous()
    return embed_images(backbone, images), None


def _dataset_proxy(
    path: str, backbone: Any, n_samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An uploaded ``.npz`` as proxy: token ids (text) or images (vision), ``y_train`` labels."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"proxy dataset {path!r} not found", param="alignment.source")
    with np.load(file, allow_pickle=False) as npz:
        x = npz["x_train"]
        y = npz["y_train"] if "y_train" in npz.files else None
    rng = np.random.default_rng(seed)
    if len(x) > n_samples:
        picks = np.sort(rng.choice(len(x), size=n_samples, replace=False))
        x = x[picks]
        y = y[picks] if y is not None else None
    labels = None
    if y is not None and y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        labels = torch.from_numpy(np.unique(y, return_inverse=True)[1].astype(np.int64))
    if getattr(backbone, "family", "text") == "vision":
        if x.ndim != 4:
            raise SpecError(
                "a vision proxy dataset needs x_train of shape (N, C, H, W)",
                param="alignment.source",
            )
        images = torch.from_numpy(x.astype(np.float32))
        images = torch.nn.functional.interpolate(
            images, size=tuple(backbone.image_size), mode="bilinear"
        )
        return embed_images(backbone, images), labels
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise SpecError(
            "a text proxy dataset needs integer token ids x_train (N, L)", param="alignment.source"
        )
    max_tokens = int(getattr(backbone, "max_tokens", x.shape[1]))
    ids = torch.from_numpy(x[:, :max_tokens].astype(np.int64)).clamp(
        0, int(backbone.vocab_size) - 1
    )
    return embed_token_ids(backbone, ids, torch.ones_like(ids)), labels
