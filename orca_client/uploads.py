"""Upload plumbing: arrays to a temporary ``.npz``, and a streamed ``multipart/form-data`` body.

The body is generated chunk by chunk from the open file with its exact length known up front, so a
multi-gigabyte upload never sits in memory and the service can refuse an oversize one from its
``Content-Length`` before reading it.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

UPLOAD_CHUNK_BYTES = 1024 * 1024


def write_arrays_npz(
    directory: Path,
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
) -> Path:
    """Write the splits the service expects as an uncompressed ``.npz`` (no pickled objects)."""
    given = {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": x_test,
        "y_test": y_test,
    }
    arrays = {name: np.asarray(value) for name, value in given.items() if value is not None}
    for split in ("val", "test"):
        if (f"x_{split}" in arrays) != (f"y_{split}" in arrays):
            raise ValueError(f"give both x_{split} and y_{split}, or neither")
    for name, array in arrays.items():
        if array.dtype == object:
            raise ValueError(f"{name} has dtype object; use numbers or fixed-width strings")
    path = directory / "dataset.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _quote(value: str) -> str:
    # Browsers percent-escape these in multipart header parameters; do the same.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartFileBody:
    """A ``multipart/form-data`` body of text fields plus one file, read in chunks as it is sent.

    ``on_bytes(n)`` is called after each file chunk is handed to the connection (for progress).
    """

    def __init__(
        self,
        path: Path,
        *,
        filename: str,
        fields: dict[str, str],
        file_field: str = "file",
        on_bytes: Callable[[int], None] | None = None,
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
    ) -> None:
        self.path = path
        self.file_size = path.stat().st_size
        self.on_bytes = on_bytes
        self.chunk_bytes = chunk_bytes
        self.boundary = "orca-" + secrets.token_hex(16)
        parts = [
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'
            f"{value}\r\n"
            for name, value in fields.items()
        ]
        parts.append(
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{file_field}"; filename="{_quote(filename)}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        self.head = "".join(parts).encode("utf-8")
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def content_length(self) -> int:
        return len(self.head) + self.file_size + len(self.tail)

    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, "Content-Length": str(self.content_length)}

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        with self.path.open("rb") as handle:
            yield from self._file_chunks(handle)
        yield self.tail

    def _file_chunks(self, handle: IO[bytes]) -> Iterator[bytes]:
        sent = 0
        while sent < self.file_size:
            chunk = handle.read(min(self.chunk_bytes, self.file_size - sent))
            if not chunk:
                raise OSError(f"{self.path} shrank while it was being uploaded")
            sent += len(chunk)
            yield chunk
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    """A private temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="orca-client-") as name:
        yield Path(name)


def atomic_write_stream(path: Path, chunks: Iterator[bytes]) -> int:
    """Write ``chunks`` to a temporary file beside ``path`` and rename it into place.

    A failed download leaves nothing half-written at ``path``. Returns the byte count.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    written = 0
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                written += len(chunk)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return written


def array_to_npy_bytes(array: Any) -> bytes:
    """An array as ``.npy`` bytes (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()
