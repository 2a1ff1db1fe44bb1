"""The one error envelope every response uses: ``{"error": {"type", "code", "message", "param"}}``.

Handlers here turn our :class:`ApiError`, FastAPI/pydantic validation errors, unknown routes,
wrong methods and any unexpected exception into that envelope. Validation errors name the field
as a dotted path (``finetune.lr``) and list every problem under ``details``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError as DatabaseDataError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

_LOCATIONS = ("body", "query", "path", "header", "cookie")


def error_type(status: int) -> str:
    """The envelope ``type`` for an HTTP status."""
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class ApiError(Exception):
    """An error a client can act on; rendered as the envelope with ``status``.

    ``extra`` keys are merged into the ``error`` object (e.g. an upload ``report``);
    ``headers`` go on the response (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """The 404 for an unknown id or another tenant's object (indistinguishable on purpose)."""
    return ApiError(404, f"{kind}_not_found", f"no {kind} with id {object_id!r}", param=param)


def envelope(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of an error response."""
    error: dict[str, Any] = {
        "type": error_type(status),
        "code": code,
        "message": message,
        "param": param,
    }
    error.update(extra or {})
    return {"error": error}


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error response carrying the envelope."""
    return JSONResponse(
        envelope(status, code, message, param, extra), status_code=status, headers=headers
    )


def field_path(loc: Sequence[Any], body: Any = None) -> str | None:
    """The dotted path a client would recognise for a pydantic error location.

    Drops the location prefix (``body``/``query``/...) and the union-member tags pydantic adds
    (``finetune.epochs.int`` → ``finetune.epochs``) by following the submitted body while it has
    the keys named in ``loc``.
    """
    parts = list(loc)
    where = parts.pop(0) if parts and parts[0] in _LOCATIONS else None
    if not parts:
        return None
    if where != "body" or not isinstance(body, dict | list):
        return ".".join(str(p) for p in parts)
    kept: list[str] = []
    node: Any = body
    for index, part in enumerate(parts):
        is_last = index == len(parts) - 1
        if isinstance(node, dict) and (part in node or (is_last and isinstance(part, str))):
            kept.append(str(part))
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(str(part))
            node = node[part]
        else:
            break
    return ".".join(kept) if kept else str(parts[0])


def _validation_message(error: Mapping[str, Any], param: str | None) -> str:
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "extra_forbidden":
        message = "unknown field"
    return f"{param}: {message}" if param else message


async def _api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.extra, exc.headers)


async def _validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    body = getattr(exc, "body", None)
    details = []
    for error in exc.errors():
        param = field_path(error.get("loc", ()), body)
        details.append(
            {
                "param": param,
                "code": error.get("type", "invalid"),
                "message": _validation_message(error, param),
            }
        )
    first = details[0] if details else {"param": None, "message": "invalid request"}
    code = "unknown_field" if first.get("code") == "extra_forbidden" else "invalid_value"
    return error_response(422, code, str(first["message"]), first["param"], {"details": details})


async def _http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400:
        # FastAPI's "could not parse the body" (bad JSON, bad encoding): content the client
        # sent is invalid, which this API always answers with 422.
        return error_response(422, "invalid_json", "the request body is not valid JSON")
    code = {
        404: "not_found",
        405: "method_not_allowed",
        401: "unauthorized",
    }.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404 and message == "Not Found":
        message = "no such route"
    return error_response(status, code, message, headers=getattr(exc, "headers", None))


async def _database_data_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the request carried (a NUL character, a string longer than
    # its column): that is the client's data, not a server fault.
    logger.info("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        422,
        "invalid_value",
        "a value in the request cannot be stored (control characters such as NUL, or too long)",
    )


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "an internal error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the envelope."""
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(DatabaseDataError, _database_data_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
