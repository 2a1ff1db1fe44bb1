"""Building job specs from a base dict plus overrides (``key.path=value`` on the command line)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` applied; nested dicts merge, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (``2``, ``1e-4``, ``true``, ``"7"``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignment(assignment: str) -> dict[str, Any]:
    """``finetune.epochs=2`` → ``{"finetune": {"epochs": 2}}``; ``ValueError`` if malformed."""
    path, sep, raw_value = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(key.strip() for key in keys):
        raise ValueError(f"expected key.path=value, got {assignment!r}")
    nested: Any = parse_value(raw_value.strip())
    for key in reversed(keys):
        nested = {key.strip(): nested}
    return dict(nested)


def apply_assignments(spec: Mapping[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """``spec`` with every ``key.path=value`` assignment applied in order."""
    result = dict(spec)
    for assignment in assignments:
        result = deep_merge(result, parse_assignment(assignment))
    return result
