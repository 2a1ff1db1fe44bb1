"""Fine-tuned models: list, get, delete (files too), and the bundle as a streamed zip."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import not_found
from api.models import Model, looks_like_id
from api.services.pagination import fetch_page
from api.storage import LocalStorage

logger = logging.getLogger(__name__)

ZIP_CHUNK_BYTES = 1024 * 1024
ZIP64_THRESHOLD = 2**31


def get_model(*, db_session: Session, tenant_id: str, model_id: str) -> Model:
    """The tenant's model, or 404 (also for another tenant's id)."""
    if not looks_like_id(model_id):
        raise not_found("model", model_id)
    model = db_session.scalar(
        select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id)
    )
    if model is None:
        raise not_found("model", model_id)
    return model


def list_models(
    *, db_session: Session, tenant_id: str, limit: int, after: str | None
) -> tuple[Sequence[Model], bool]:
    """The tenant's models, newest first."""
    query = select(Model).where(Model.tenant_id == tenant_id)
    return fetch_page(db_session, query, id_column=Model.id, limit=limit, after=after)


def bundle_dir(*, storage: LocalStorage, model: Model) -> Path:
    """Where a model's bundle lives on disk."""
    return storage.path_for(model.storage_key)


def delete_model(
    *, db_session: Session, storage: LocalStorage, tenant_id: str, model_id: str
) -> None:
    """Delete the model row and its bundle files; jobs keep their metrics."""
    model = get_model(db_session=db_session, tenant_id=tenant_id, model_id=model_id)
    storage_key = model.storage_key
    db_session.delete(model)
    db_session.commit()
    storage.delete_tree(storage_key)
    logger.info("deleted model %s (%s)", model_id, storage_key)


def bundle_files(directory: Path) -> list[tuple[Path, str]]:
    """Every regular file under a bundle dir with its name inside the zip."""
    return [
        (path, path.relative_to(directory).as_posix())
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.is_symlink()
    ]


class _ZipSink:
    """A write-only, non-seekable stream that hands out what was written since the last drain."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def drain(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def iter_zip(files: Sequence[tuple[Path, str]]) -> Iterator[bytes]:
    """A zip of ``files`` produced chunk by chunk (memory stays at about one chunk)."""
    sink = _ZipSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for path, arcname in files:
            info = zipfile.ZipInfo.from_file(path, arcname)
            info.compress_type = zipfile.ZIP_DEFLATED
            size = path.stat().st_size
            with (
                path.open("rb") as source,
                archive.open(info, "w", force_zip64=size >= ZIP64_THRESHOLD) as target,
            ):
                while block := source.read(ZIP_CHUNK_BYTES):
                    target.write(block)
                    if chunk := sink.drain():
                        yield chunk
            if chunk := sink.drain():
                yield chunk
    if chunk := sink.drain():
        yield chunk
