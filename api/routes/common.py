"""Query parameters shared by list endpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from api.models import ID_PATTERN
from api.schemas import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

Limit = Annotated[
    int,
    Query(ge=1, le=MAX_PAGE_SIZE, description=f"page size (1..{MAX_PAGE_SIZE})"),
]
After = Annotated[
    str | None,
    Query(max_length=64, pattern=ID_PATTERN, description="the last id of the previous page"),
]
DEFAULT_LIMIT = DEFAULT_PAGE_SIZE
