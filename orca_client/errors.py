"""Exceptions the client raises: one base class, so callers can catch everything ORCA-specific."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orca_client.types import Analysis, Job


class OrcaError(Exception):
    """Base class of every error this package raises."""


class ConnectionFailed(OrcaError):
    """The service could not be reached (refused, DNS, TLS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the ORCA service at {url}: {reason}")
        self.url = url
        self.reason = reason


class ApiError(OrcaError):
    """A non-2xx answer, built from the service's envelope ``{"error": {type, code, message, param}}``.

    ``report`` is the upload validation report (``{"errors": [...], "warnings": [...]}``) when the
    service rejected a dataset; ``details`` lists every field problem of a 422; ``retry_after`` is
    the ``Retry-After`` header of a 429, in seconds.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        report: dict[str, Any] | None = None,
        *,
        type: str | None = None,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (param {param})" if param else ""))
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.report = report
        self.type = type
        self.details = details or []
        self.retry_after = retry_after
        self.body = body or {}

    def to_dict(self) -> dict[str, Any]:
        """The error envelope as the service sent it (or as close as could be rebuilt)."""
        if self.body.get("error"):
            return dict(self.body)
        error: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }
        if self.report is not None:
            error["report"] = self.report
        return {"error": error, "status": self.status}


class JobFailed(OrcaError):
    """A job ended ``failed`` or ``cancelled``; ``code``/``message`` are the job's own error."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.status = job.status
        self.code = job.error.code if job.error else job.status
        self.message = job.error.message if job.error else f"job {job.id} was {job.status}"
        super().__init__(f"job {job.id} {job.status}: {self.code}: {self.message}")


class AnalysisFailed(OrcaError):
    """A dataset analysis ended ``failed``; ``code``/``message`` are its own error."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.code = analysis.error.code if analysis.error else "failed"
        self.message = analysis.error.message if analysis.error else "the analysis failed"
        super().__init__(f"analysis {analysis.id} failed: {self.code}: {self.message}")
