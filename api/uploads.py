"""Streaming multipart receiver for dataset uploads.

Starlette's form parser spools a whole file to a temp file before the handler runs, so a 50 GB
body would fill the disk before any limit applied. This parser feeds the request stream straight
into a :class:`~api.storage.BlobWriter`: the file is hashed and counted as it arrives and the
upload is cut off (413) as soon as it passes ``max_upload_bytes``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError
from api.storage import (
    ALLOWED_DATASET_EXTENSIONS,
    BlobTooLarge,
    BlobWriter,
    LocalStorage,
    StoredBlob,
)

logger = logging.getLogger(__name__)

FILE_FIELD = "file"
TEXT_FIELDS = ("name", "label_column")
MAX_TEXT_FIELD_BYTES = 1000
# Multipart framing and the small text fields on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


@dataclass
class ReceivedUpload:
    """An upload stored content-addressed, with the user's file name and text fields."""

    blob: StoredBlob
    filename: str
    ext: str
    fields: dict[str, str] = field(default_factory=dict)


def upload_extension(filename: str) -> str | None:
    """The supported extension of ``filename`` (lower case, no dot), or None."""
    suffix = PurePosixPath(filename.lower()).suffix.lstrip(".")
    return suffix if suffix in ALLOWED_DATASET_EXTENSIONS else None


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable())


def _display_name(filename: str) -> str:
    # Browsers may send a full client path; keep the last component, for display only.
    return _printable(PureWindowsPath(PurePosixPath(filename).name).name)[:200]


def too_large_error(limit: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"the upload exceeds the limit of {limit} bytes",
        param=FILE_FIELD,
    )


class _UploadParser:
    """Callbacks for python-multipart; problems are recorded and raised after each chunk."""

    def __init__(self, storage: LocalStorage, boundary: bytes, max_bytes: int) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self.writer: BlobWriter | None = None
        self.filename: str | None = None
        self.ext: str | None = None
        self.fields: dict[str, str] = {}
        self.error: ApiError | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part: str | None = None  # "file", a text field name, or None (skipped)
        self._buffer = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    def _fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error
        self._part = None

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._buffer = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        if self.error is not None:
            return
        _disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.writer is not None:
                self._fail(
                    ApiError(422, "invalid_upload", "send exactly one file", param=FILE_FIELD)
                )
                return
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            ext = upload_extension(filename)
            if ext is None:
                allowed = ", ".join(f".{e}" for e in ALLOWED_DATASET_EXTENSIONS)
                self._fail(
                    ApiError(
                        422,
                        "unsupported_file_type",
                        f"unsupported file type {PurePosixPath(filename).suffix or '(none)'!r}; "
                        f"upload one of {allowed}",
                        param=FILE_FIELD,
                    )
                )
                return
            self.filename, self.ext = _display_name(filename), ext
            self.writer = self.storage.writer(ext=ext, max_bytes=self.max_bytes)
            self._part = FILE_FIELD
        elif name in TEXT_FIELDS:
            self._part = name
        else:
            self._fail(
                ApiError(
                    422,
                    "unknown_field",
                    f"unknown form field {name!r} (expected file, name, label_column)",
                    param=name or None,
                )
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == FILE_FIELD and self.writer is not None:
            self.writer.write(data[start:end])
        elif self._part is not None:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_TEXT_FIELD_BYTES:
                self._fail(
                    ApiError(
                        422,
                        "field_too_long",
                        f"{self._part} is longer than {MAX_TEXT_FIELD_BYTES} bytes",
                        param=self._part,
                    )
                )

    def _on_part_end(self) -> None:
        if self._part in TEXT_FIELDS:
            self.fields[self._part] = _printable(self._buffer.decode("utf-8", "replace")).strip()
        self._part = None


async def receive_dataset_upload(
    request: Request, storage: LocalStorage, *, max_bytes: int
) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` upload (``file`` + ``name`` + ``label_column``) to storage.

    Raises :class:`ApiError`: 413 past ``max_bytes`` (or when Content-Length already says so),
    422 for a missing file, an unsupported extension or unknown fields. Nothing stays on disk
    when it raises.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            422,
            "multipart_required",
            "upload the dataset as multipart/form-data with a 'file' part",
            param=FILE_FIELD,
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise too_large_error(max_bytes)

    state = _UploadParser(storage, boundary, max_bytes)
    try:
        async for chunk in request.stream():
            state.parser.write(chunk)
            if state.error is not None:
                raise state.error
        state.parser.finalize()
        if state.error is not None:
            raise state.error
        if state.writer is None or state.filename is None or state.ext is None:
            raise ApiError(422, "missing_file", "the form has no 'file' part", param=FILE_FIELD)
        blob = state.writer.commit()
    except BlobTooLarge as exc:
        raise too_large_error(exc.limit) from None
    except MultipartParseError as exc:
        raise ApiError(
            422, "invalid_multipart", f"malformed multipart body: {exc}", param=FILE_FIELD
        ) from None
    finally:
        if state.writer is not None:
            state.writer.abort()  # no-op after a commit
    return ReceivedUpload(blob=blob, filename=state.filename, ext=state.ext, fields=state.fields)
