"""ORCA engine: align-then-refine cross-modal fine-tuning as a pure library.

Importing this package is cheap: torch, transformers and timm load only when a module that needs
them is imported (``specs`` and ``data`` are numpy/pydantic only so the API can validate uploads
without torch).
"""

__version__ = "0.1.0"
