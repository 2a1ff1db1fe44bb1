"""Cursor pages over time-ordered ids: newest first for resources, ascending for job events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

RowT = TypeVar("RowT")


def fetch_page(
    db_session: Session,
    query: Select[RowT],
    *,
    id_column: InstrumentedAttribute[Any],
    limit: int,
    after: Any | None,
    ascending: bool = False,
) -> tuple[Sequence[RowT], bool]:
    """One page of ``query`` after the cursor ``after`` and whether more rows follow."""
    if after is not None:
        query = query.where(id_column > after if ascending else id_column < after)
    query = query.order_by(id_column.asc() if ascending else id_column.desc()).limit(limit + 1)
    rows = list(db_session.scalars(query))
    return rows[:limit], len(rows) > limit
