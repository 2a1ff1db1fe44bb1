"""How a running job talks to its caller: events, progress, and cancellation checks."""

from __future__ import annotations

import logging
from typing import Any

from orca_engine.errors import JobCancelled

STAGES = ("prepare", "align", "refine", "evaluate", "export")

logger = logging.getLogger("orca_engine")


class Callbacks:
    """Default callbacks: log events, ignore progress, never cancel.

    The service subclasses this to write events/progress to its database and to poll for
    cancellation. Every method must be cheap: the engine calls them between steps.
    """

    def event(self, message: str, *, kind: str = "log", data: dict[str, Any] | None = None) -> None:
        """A human-readable line for the job's event log (``kind`` groups them: log, stage, metric, choice)."""
        logger.info("%s: %s", kind, message)

    def progress(
        self, *, stage: str, step: int, total: int, metrics: dict[str, float] | None = None
    ) -> None:
        """Progress inside ``stage``: ``step`` of ``total`` units done, with the latest metrics."""

    def cancelled(self) -> bool:
        """True when the caller wants the job stopped."""
        return False

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if the caller asked to stop."""
        if self.cancelled():
            raise JobCancelled()
