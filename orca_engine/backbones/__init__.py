"""Pretrained backbones behind one surface, built by name from a registry (timm style).

Importing this package registers every family: ``minilm-l6``, ``hf:<dir>``, ``tiny-bert``,
``tiny-roberta`` (text, :mod:`.text`) and ``timm:<arch>[@<weights>]``, ``tiny-vit``, ``tiny-swin``
(vision, :mod:`.vision`).
"""

from orca_engine.backbones import text, vision
from orca_engine.backbones.base import (
    Backbone,
    create_backbone,
    list_backbones,
    register_backbone,
    square_grid,
)

TINY_BACKBONES = ("tiny-bert", "tiny-roberta", "tiny-vit", "tiny-swin")

__all__ = [
    "TINY_BACKBONES",
    "Backbone",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "square_grid",
    "text",
    "vision",
]
