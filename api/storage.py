"""Blob storage: uploads content-addressed by sha256, model bundles and job work dirs by id.

Uploads stream into ``tmp/`` while being hashed and counted, are aborted as soon as they pass
the byte limit (memory stays constant, the temp file is removed on any failure), and are then
renamed to ``datasets/<sha[:2]>/<sha>.<ext>``. Names chosen by users never become paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

from api.config import Settings, get_settings

logger = logging.getLogger(__name__)

ALLOWED_DATASET_EXTENSIONS = ("npz", "csv", "parquet")
# Temp uploads are named after the process writing them ("upload-<pid>@<host>~<random>.<ext>")
# so a restarted API can tell its dead predecessor's leftovers from a live neighbour's uploads.
_TMP_OWNER_END = "~"


def _tmp_upload_prefix() -> str:
    return f"upload-{os.getpid()}@{socket.gethostname()}{_TMP_OWNER_END}"


def _tmp_owner_is_dead(name: str) -> bool:
    """True when a temp file's name says it belongs to a process on this host that is gone."""
    if not name.startswith("upload-") or _TMP_OWNER_END not in name:
        return False
    owner = name[len("upload-") : name.index(_TMP_OWNER_END)]
    pid_text, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class BlobTooLarge(Exception):
    """The upload passed ``limit`` bytes; nothing of it was kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredBlob:
    """Where an upload ended up and what it was."""

    key: str
    sha256: str
    bytes: int
    path: Path


class BlobWriter:
    """An upload in progress: a temp file, a running sha256 and a byte count.

    Use as a context manager; anything but a successful :meth:`commit` removes the temp file.
    """

    def __init__(self, storage: LocalStorage, *, ext: str, max_bytes: int) -> None:
        if ext not in ALLOWED_DATASET_EXTENSIONS:
            raise ValueError(f"unsupported extension {ext!r}")
        self._storage = storage
        self._ext = ext
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        tmp_dir = storage.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=_tmp_upload_prefix(), suffix=f".{ext}")
        self._tmp_path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`BlobTooLarge` (and discards everything) past the limit."""
        if self._done:
            raise RuntimeError("write after commit/abort")
        self.bytes_written += len(data)
        if self.bytes_written > self._max_bytes:
            self.abort()
            raise BlobTooLarge(self._max_bytes)
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> StoredBlob:
        """Move the temp file to its content address (an identical blob already there is reused)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha = self._hash.hexdigest()
        key = dataset_key(sha, self._ext)
        target = self._storage.path_for(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp_path, target)
        self._done = True
        return StoredBlob(key=key, sha256=sha, bytes=self.bytes_written, path=target)

    def abort(self) -> None:
        """Drop the temp file (idempotent)."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def dataset_key(sha256: str, ext: str) -> str:
    """The storage key of an uploaded dataset with this content hash."""
    return f"datasets/{sha256[:2]}/{sha256}.{ext}"


def model_key(model_id: str) -> str:
    """The storage key (a directory) of a model bundle."""
    return f"models/{_safe_id(model_id)}"


def _safe_id(value: str) -> str:
    if not value or not all(c.isalnum() or c in "_-" for c in value):
        raise ValueError(f"not a valid id: {value!r}")
    return value


@runtime_checkable
class Storage(Protocol):
    """What the service needs from blob storage (a local directory today, an object store later)."""

    def writer(self, *, ext: str, max_bytes: int) -> BlobWriter: ...
    def put_stream(self, chunks: Iterable[bytes], *, ext: str, max_bytes: int) -> StoredBlob: ...
    async def put_async_stream(
        self, chunks: AsyncIterable[bytes], *, ext: str, max_bytes: int
    ) -> StoredBlob: ...
    def path_for(self, key: str) -> Path: ...
    def dataset_key(self, sha256: str, ext: str) -> str: ...
    def model_key(self, model_id: str) -> str: ...
    def model_dir(self, model_id: str) -> Path: ...
    def job_workdir(self, job_id: str) -> Path: ...
    def delete(self, key: str) -> None: ...
    def delete_tree(self, key: str) -> None: ...
    def usage(self) -> int: ...


class LocalStorage:
    """Storage in a local directory (``Settings.resolved_storage_dir``); created lazily."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def writer(self, *, ext: str, max_bytes: int) -> BlobWriter:
        """Start a streaming upload (see :class:`BlobWriter`)."""
        return BlobWriter(self, ext=ext, max_bytes=max_bytes)

    def put_stream(self, chunks: Iterable[bytes], *, ext: str, max_bytes: int) -> StoredBlob:
        """Store an iterable of byte chunks content-addressed; :class:`BlobTooLarge` past the limit."""
        with self.writer(ext=ext, max_bytes=max_bytes) as blob:
            for chunk in chunks:
                blob.write(chunk)
            return blob.commit()

    async def put_async_stream(
        self, chunks: AsyncIterable[bytes], *, ext: str, max_bytes: int
    ) -> StoredBlob:
        """The async twin of :meth:`put_stream` (e.g. for ``request.stream()``)."""
        with self.writer(ext=ext, max_bytes=max_bytes) as blob:
            async for chunk in chunks:
                blob.write(chunk)
            return blob.commit()

    def path_for(self, key: str) -> Path:
        """The local path of ``key``; keys that would escape the storage root are refused."""
        path = (self.root / key).resolve()
        if path == self.root or not path.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    def dataset_key(self, sha256: str, ext: str) -> str:
        return dataset_key(sha256, ext)

    def model_key(self, model_id: str) -> str:
        return model_key(model_id)

    def model_dir(self, model_id: str) -> Path:
        """Where the bundle of ``model_id`` lives (``save_bundle`` creates it atomically)."""
        return self.path_for(model_key(model_id))

    def job_workdir(self, job_id: str) -> Path:
        """Stage checkpoints of a job (kept across worker restarts so a job can resume); created."""
        path = self.path_for(f"jobs/{_safe_id(job_id)}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def delete(self, key: str) -> None:
        """Remove one blob; a missing blob is not an error."""
        self.path_for(key).unlink(missing_ok=True)

    def delete_tree(self, key: str) -> None:
        """Remove a directory (a model bundle, a job work dir) and everything under it."""
        path = self.path_for(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def usage(self) -> int:
        """Bytes used under the storage root."""
        total = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                try:
                    total += (Path(dirpath) / name).stat().st_size
                except OSError:  # removed while walking
                    continue
        return total

    def sweep_stale_tmp(self, *, max_age_seconds: float) -> list[Path]:
        """Remove temp files left by crashed uploads: those of a process on this host that no
        longer runs, and anything older than ``max_age_seconds``. Returns what was removed."""
        tmp_dir = self.root / "tmp"
        if not tmp_dir.is_dir():
            return []
        removed: list[Path] = []
        cutoff = time.time() - max_age_seconds
        for path in tmp_dir.iterdir():
            try:
                if not path.is_file():
                    continue
                if _tmp_owner_is_dead(path.name) or path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            except OSError:  # removed by someone else meanwhile
                continue
        return removed

    def check_writable(self) -> None:
        """Raise ``OSError`` unless a file can be created and removed under the root."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="ready-") as handle:
            handle.write(b"ok")
            handle.flush()


def get_storage(settings: Settings | None = None) -> LocalStorage:
    """The storage configured by ``settings`` (default: the process settings)."""
    settings = settings or get_settings()
    return LocalStorage(settings.resolved_storage_dir)
