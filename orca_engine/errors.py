"""Errors the engine raises, each with a stable ``code`` a service can show to users."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base class: a problem the user can act on, never a bare traceback."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


class SpecError(EngineError):
    """A task spec field is invalid or impossible for this dataset."""

    code = "bad_hyperparameter"


class DataError(EngineError):
    """The dataset failed validation; ``report`` lists every problem found."""

    code = "dataset_invalid"

    def __init__(self, message: str, *, report: Any = None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.report = report


class BackboneUnavailable(EngineError):
    """The requested backbone (or its weights) cannot be loaded on this machine."""

    code = "backbone_unavailable"


class OutOfMemory(EngineError):
    """The device ran out of memory; a smaller batch size or max_samples may help."""

    code = "out_of_memory"


class JobCancelled(EngineError):
    """Raised between steps when the caller asked the job to stop."""

    code = "cancelled"

    def __init__(self, message: str = "the job was cancelled") -> None:
        super().__init__(message)
