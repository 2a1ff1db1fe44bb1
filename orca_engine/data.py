"""Safe loading and validation of uploaded datasets, label maps, splits and normalisers.

Nothing in an upload is trusted. ``.npz`` archives are opened with ``allow_pickle=False`` semantics
(object arrays are refused by their header, never unpickled); member count and the total
decompressed size are checked from the zip directory before any data is read; each member's
``.npy`` header is parsed on its own and checked against the size the directory declares. Members
stored uncompressed (``np.savez``) are read straight out of the archive; compressed ones
(``np.savez_compressed``) are first streamed to a temporary ``.npy`` file with a byte budget.
``inspect_file`` (the API's upload check) then scans each member by reading it in bounded chunks
into one reused buffer, never mapping it, so its memory does not grow with the size of the upload
(pages of a memory map count in the process's RSS). ``load_dataset`` memory-maps the members and
materialises float32 copies for training.

Validation collects *every* problem into a :class:`Report` (``{"errors": [...], "warnings": [...]}``
with a ``field`` naming the member or column) instead of stopping at the first.

Two repairs are made at load time and reported as warnings:

* trailing NaN padding along the last axis of ``(N, C, L)`` sequences (the usual way series of
  unequal length are stored) is filled with zeros;
* missing feature values in ``.csv`` / ``.parquet`` uploads are filled with the per-column median of
  the training rows.

numpy / pandas only (scikit-learn for the stratified split): no torch, so the API can validate uploads
without loading it.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from orca_engine.errors import DataError

logger = logging.getLogger(__name__)

GiB = 1024**3
SPLITS = ("train", "val", "test")
KNOWN_MEMBERS = tuple(f"{prefix}_{split}" for split in SPLITS for prefix in ("x", "y"))
FORMATS = {".npz": "npz", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
INPUT_KINDS = {2: "tabular", 3: "seq1d", 4: "image2d"}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}

# Upper bound on how much of a (memory-mapped) array is pulled into memory at once while checking it.
_CHUNK_BYTES = 64 * 1024**2
# Bytes ``inspect_file`` reads from disk at a time (one reused buffer per member scan).
_STREAM_CHUNK_BYTES = 4 * 1024**2
# An .npy header is a short dict literal; anything longer is not a real array header.
_MAX_NPY_HEADER = 10_000
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Zip local file header: signature, 22 bytes we skip, then file-name and extra-field lengths.
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
_MAX_LISTED = 10


@dataclass(frozen=True)
class Limits:
    """Upload limits (the service passes its Settings values; these are the SPEC §3 defaults)."""

    max_members: int = 64
    max_decompressed_bytes: int = 4 * GiB
    max_rows: int = 5_000_000
    max_columns: int = 100_000
    #: more distinct labels than this is almost always a regression target stored as integers
    max_classes: int = 1000


@dataclass
class Issue:
    """One problem: ``field`` names the npz member, CSV column or ``file``; ``message`` says what to fix."""

    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


@dataclass
class Report:
    """Every problem found in an upload. ``too_large`` marks a size-limit refusal (HTTP 413)."""

    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    too_large: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, field_name: str, message: str) -> None:
        self.errors.append(Issue(field_name, message))

    def warn(self, field_name: str, message: str) -> None:
        self.warnings.append(Issue(field_name, message))

    def to_dict(self) -> dict[str, list[dict[str, str]]]:
        return {
            "errors": [issue.to_dict() for issue in self.errors],
            "warnings": [issue.to_dict() for issue in self.warnings],
        }

    def summary(self) -> str:
        """One line for an exception message: the count and the first few errors."""
        if not self.errors:
            return "the dataset is valid"
        shown = "; ".join(f"{issue.field}: {issue.message}" for issue in self.errors[:3])
        more = f" (and {len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
        return f"the dataset has {len(self.errors)} problem(s): {shown}{more}"


@dataclass
class DatasetInfo:
    """What the engine and the service need to know about a validated dataset (JSON-able)."""

    format: str
    input_kind: str
    sample_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    task_type: str
    n_classes: int | None
    classes: list[Any] | None
    splits: dict[str, int]
    label_column: str | None = None
    has_val: bool = False
    has_test: bool = False
    #: "text", "integer" (whole numbers, incl. bool), "binary" (all 0/1, K columns) or "float"
    label_kind: str = "float"
    #: feature column names of a .csv / .parquet upload, in model input order
    feature_names: list[str] | None = None

    @property
    def out_dim(self) -> int:
        """Width of the model's output: classes, labels, or regression targets per position."""
        if self.task_type in ("classification", "dense_classification"):
            return int(self.n_classes or 0)
        if self.task_type == "dense_regression":
            return int(self.label_shape[0]) if self.label_shape else 1
        return int(math.prod(self.label_shape)) if self.label_shape else 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sample_shape"] = list(self.sample_shape)
        data["label_shape"] = list(self.label_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetInfo:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["sample_shape"] = tuple(int(v) for v in values["sample_shape"])
        values["label_shape"] = tuple(int(v) for v in values["label_shape"])
        return cls(**values)


def compatible_task_types(info: DatasetInfo) -> tuple[str, ...]:
    """Task types a user may ask for on these labels (the inferred one first)."""
    inferred = info.task_type
    numeric = info.label_kind != "text"
    allowed = [inferred]
    if inferred == "classification" and numeric:
        allowed.append("regression")
    elif inferred == "regression" and info.label_kind == "integer" and not info.label_shape:
        allowed.append("classification")
    elif inferred == "multilabel":
        allowed.append("regression")
    elif inferred == "dense_classification":
        allowed.append("dense_regression")
    return tuple(allowed)


def _to_python(value: Any) -> Any:
    """A numpy scalar as the matching JSON-able Python value."""
    return value.item() if isinstance(value, np.generic) else value


class LabelMap:
    """Original label values (ints, floats or strings) <-> contiguous class ids 0..n-1."""

    def __init__(self, classes: Sequence[Any]) -> None:
        self.classes: list[Any] = [_to_python(value) for value in classes]
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("LabelMap classes must be distinct")
        self._values = np.asarray(self.classes)
        self._order = np.argsort(self._values, kind="stable")
        self._sorted = self._values[self._order]

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def encode(self, y: np.ndarray) -> np.ndarray:
        """Class ids (int64, same shape as ``y``); ``ValueError`` names labels never seen in training."""
        values = np.asarray(y)
        if values.dtype.kind in "SO":
            values = values.astype(str)
        try:
            position = np.searchsorted(self._sorted, values)
        except TypeError as exc:
            raise ValueError(
                f"labels of dtype {values.dtype} do not match the classes: {exc}"
            ) from exc
        position = np.clip(position, 0, len(self._sorted) - 1)
        known = self._sorted[position] == values
        if not np.all(known):
            unknown = np.unique(values[~known])[:_MAX_LISTED]
            raise ValueError(f"labels not seen in training: {[_to_python(v) for v in unknown]}")
        return np.asarray(self._order[position], dtype=np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Original label values for class ids (``.tolist()`` gives JSON-able Python values)."""
        return np.asarray(self._values[np.asarray(ids, dtype=np.int64)])

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelMap:
        return cls(data["classes"])


class _ChannelScaler:
    """Per-channel mean/std: channel axis 1 of a batch (features for (N, D), C for (N, C, ...))."""

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)

    @classmethod
    def fit(cls, x: np.ndarray) -> Self:
        """Statistics of ``x`` (the training split only), accumulated in float64 chunks."""
        if len(x) == 0:
            raise ValueError("cannot fit on an empty array")
        n_channels = x.shape[1] if x.ndim >= 2 else 1
        total = np.zeros(n_channels)
        total_sq = np.zeros(n_channels)
        count = 0
        for chunk in _chunks(x):
            values = chunk.astype(np.float64).reshape(len(chunk), n_channels, -1)
            total += values.sum(axis=(0, 2))
            total_sq += (values**2).sum(axis=(0, 2))
            count += values.shape[0] * values.shape[2]
        mean = total / count
        variance = np.maximum(total_sq / count - mean**2, 0.0)
        std = np.sqrt(variance)
        # Constant channels carry no scale; dividing by ~0 would blow them up.
        std[std < 1e-8] = 1.0
        return cls(mean, std)

    def _stats(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise ValueError(f"{type(self).__name__} is not fitted")
        shape = (self.mean.size,) if ndim <= 1 else (1, self.mean.size) + (1,) * (ndim - 2)
        return self.mean.reshape(shape), self.std.reshape(shape)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` per channel, as float32 (``x`` is a batch)."""
        mean, std = self._stats(np.ndim(x))
        return np.asarray((np.asarray(x, dtype=np.float64) - mean) / std, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        mean, std = self._stats(1)
        return {"mean": mean.tolist(), "std": std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(np.asarray(data["mean"]), np.asarray(data["std"]))


class Normaliser(_ChannelScaler):
    """Input normaliser fitted on the training split; rebuilt at prediction time from ``to_dict``."""


class TargetScaler(_ChannelScaler):
    """Regression-target scaler: the model learns scaled targets, predictions are scaled back."""

    def inverse_transform(self, y: np.ndarray) -> np.ndarray:
        """Model outputs back in the units of the uploaded targets (float32)."""
        mean, std = self._stats(np.ndim(y))
        return np.asarray(np.asarray(y, dtype=np.float64) * std + mean, dtype=np.float32)


@dataclass
class Dataset:
    """Loaded splits: ``x`` raw float32 (not normalised), ``y`` class ids (int64) or float32 targets."""

    info: DatasetInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    label_map: LabelMap | None
    #: warnings found while loading (imputation, NaN padding, rare classes, ...)
    report: Report = field(default_factory=Report)


# --------------------------------------------------------------------------------------------
# Reading


def _format_bytes(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _read_exactly(stream: io.BufferedReader, view: memoryview) -> None:
    """Fill ``view`` from ``stream``; a short read means the file changed or is truncated."""
    filled = 0
    while filled < len(view):
        got = stream.readinto(view[filled:])
        if not got:
            raise OSError(f"unexpected end of file after {filled} of {len(view)} bytes")
        filled += got


class _StreamedArray:
    """An ``.npy`` member's data on disk, scanned in bounded chunks and never mapped or loaded whole.

    ``inspect_file`` validates through this so that checking a large upload costs one reused
    buffer of about ``_STREAM_CHUNK_BYTES`` instead of the member's size: the pages of a memory map
    stay resident (and count in RSS) once touched, chunks read into one buffer do not pile up.
    It carries the array facts the checks need (``shape``, ``dtype``, ``ndim``, ``len``);
    ``np.asarray`` on it reads the whole member, which the checks only do for 1-D labels.
    """

    def __init__(
        self,
        source: Path,
        offset: int,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        fortran_order: bool,
    ) -> None:
        self.source = source
        self.offset = offset
        self.shape = tuple(int(v) for v in shape)
        self.dtype = dtype
        self.fortran_order = fortran_order

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole member in memory (for small members such as 1-D labels)."""
        data = np.empty(self.size, dtype=self.dtype)
        if self.size:
            with open(self.source, "rb") as stream:
                stream.seek(self.offset)
                _read_exactly(stream, data.view(np.uint8).data)
        array = data.reshape(self.shape, order="F" if self.fortran_order else "C")
        return array if dtype is None else array.astype(dtype)

    def blocks(self, row_length: int = 1) -> Iterator[np.ndarray]:
        """The data in storage order as consecutive ``(k, row_length)`` blocks of ~4 MiB.

        Blocks hold whole rows (a single row longer than the budget is one block on its own), so a
        check along rows never straddles a boundary. Every block is a view of the same buffer:
        use it before asking for the next one.
        """
        row_bytes = max(1, row_length * self.dtype.itemsize)
        rows_per_block = max(1, _STREAM_CHUNK_BYTES // row_bytes)
        n_rows = self.size // max(1, row_length)
        buffer = np.empty(min(rows_per_block, max(1, n_rows)) * row_bytes, dtype=np.uint8)
        with open(self.source, "rb") as stream:
            stream.seek(self.offset)
            for start in range(0, n_rows, rows_per_block):
                rows = min(rows_per_block, n_rows - start)
                view = buffer.data[: rows * row_bytes]
                _read_exactly(stream, view)
                yield np.frombuffer(view, dtype=self.dtype).reshape(rows, row_length)


#: a checked member: an in-memory/mapped array, or one streamed from disk by ``inspect_file``
_Member = np.ndarray | _StreamedArray


def _chunks(array: _Member) -> Iterator[np.ndarray]:
    """Consecutive in-memory row blocks of at most ~64 MiB each.

    A streamed member yields flat ~4 MiB blocks in storage order instead: only for element-wise
    checks (counts, unique values), where the layout does not matter.
    """
    if isinstance(array, _StreamedArray):
        for block in array.blocks():
            yield block.reshape(-1)
        return
    row_bytes = max(1, int(math.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, len(array), step):
        yield np.asarray(array[start : start + step])


def _detect_format(filename: str, report: Report) -> str | None:
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        report.error(
            "file", f"unsupported file type {suffix or '(none)'!r}: upload .npz, .csv or .parquet"
        )
        return None
    return FORMATS[suffix]


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(stream)
    # The public readers cover versions 1.0 and 2.0; 3.0 (utf-8 field names) only has the private one.
    reader: Any = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if reader is None:
        private: Any = np.lib.format._read_array_header  # type: ignore[attr-defined]
        return private(stream, version, max_header_size=_MAX_NPY_HEADER)  # type: ignore[no-any-return]
    return reader(stream, max_header_size=_MAX_NPY_HEADER)  # type: ignore[no-any-return]


def _open_npz_member(
    archive: zipfile.ZipFile,
    path: Path,
    info: zipfile.ZipInfo,
    name: str,
    report: Report,
    tmp: Path,
    streamed: bool,
) -> _Member | None:
    """One ``.npy`` member after checking its header; None (and an error) if unsafe.

    ``streamed``: a :class:`_StreamedArray` reading the bytes on demand (validation); otherwise a
    memory map (loading for training).
    """
    if info.flag_bits & 0x1:
        report.error(name, "the member is encrypted")
        return None
    try:
        with archive.open(info) as stream:
            shape, fortran_order, dtype = _read_npy_header(stream)
            header_size = stream.tell()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, SyntaxError) as exc:
        report.error(name, f"not a valid .npy array: {exc}")
        return None
    if dtype.hasobject:
        report.error(
            name,
            "holds Python objects (dtype object), which can only be loaded by unpickling; "
            "uploads are never unpickled: save numbers, or strings as a fixed-width str array "
            "(e.g. y.astype(str))",
        )
        return None
    data_bytes = int(math.prod(shape)) * dtype.itemsize
    if header_size + data_bytes != info.file_size:
        report.error(
            name,
            f"header declares shape {tuple(shape)} of {dtype} ({_format_bytes(data_bytes)}) but the "
            f"member holds {_format_bytes(max(0, info.file_size - header_size))}: truncated or corrupt",
        )
        return None
    order: Literal["C", "F"] = "F" if fortran_order else "C"
    if data_bytes == 0:
        return np.empty(shape, dtype=dtype, order=order)
    if info.compress_type == zipfile.ZIP_STORED:
        # Stored members are plain .npy bytes inside the archive: map them in place.
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(
                raw.read(_ZIP_LOCAL_HEADER.size)
            )
        if signature != b"PK\x03\x04":
            report.error(name, "corrupt zip entry (bad local header)")
            return None
        offset = (
            info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length + header_size
        )
        if offset + data_bytes > path.stat().st_size:
            report.error(name, "the member's data runs past the end of the file: truncated upload")
            return None
        if streamed:
            return _StreamedArray(path, offset, tuple(shape), dtype, fortran_order)
        return np.memmap(
            path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order=order
        )
    # Compressed: stream to a temporary .npy, never past the size the directory declared.
    target = tmp / f"{name}.npy"
    written = 0
    try:
        with archive.open(info) as stream, open(target, "wb") as out:
            while block := stream.read(1 << 20):
                written += len(block)
                if written > info.file_size:
                    report.too_large = True
                    report.error(name, "decompresses to more bytes than the zip directory declares")
                    return None
                out.write(block)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        report.error(name, f"could not decompress: {exc}")
        return None
    if streamed:
        return _StreamedArray(target, header_size, tuple(shape), dtype, fortran_order)
    array: np.ndarray = np.load(target, mmap_mode="r", allow_pickle=False)
    return array


def _read_npz(
    path: Path, limits: Limits, report: Report, tmp: Path, streamed: bool
) -> tuple[dict[str, _Member], set[str]]:
    """Open every known member; returns the arrays that opened and the member names present."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        report.error("file", f"not a valid .npz (zip) archive: {exc}")
        return {}, set()
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_members:
            report.error(
                "file",
                f"the archive has {len(members)} members; at most {limits.max_members} are allowed",
            )
            return {}, set()
        declared = sum(member.file_size for member in members)
        if declared > limits.max_decompressed_bytes:
            report.too_large = True
            report.error(
                "file",
                f"the archive's decompressed size is {_format_bytes(declared)}, over the limit of "
                f"{_format_bytes(limits.max_decompressed_bytes)}",
            )
            return {}, set()
        arrays: dict[str, _Member] = {}
        present: set[str] = set()
        for member in members:
            name = member.filename.removesuffix(".npy")
            if name not in KNOWN_MEMBERS:
                report.warn(
                    name,
                    "unknown member ignored (known: x_train, y_train, x_val, y_val, x_test, y_test)",
                )
                continue
            if name in present:
                report.error(name, "appears twice in the archive")
                continue
            present.add(name)
            array = _open_npz_member(archive, path, member, name, report, tmp, streamed)
            if array is not None:
                arrays[name] = array
    return arrays, present


def _read_table_frame(path: Path, fmt: str, limits: Limits, report: Report) -> Any:
    """The table as a pandas DataFrame, with row/column limits checked before the full read."""
    import pandas as pd

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            n_rows, n_columns = parquet.metadata.num_rows, parquet.metadata.num_columns
            if n_columns > limits.max_columns:
                report.error(
                    "file", f"{n_columns} columns; at most {limits.max_columns} are allowed"
                )
            if n_rows > limits.max_rows:
                report.error("file", f"{n_rows} rows; at most {limits.max_rows} are allowed")
            return None if not report.ok else parquet.read().to_pandas()
        header = pd.read_csv(path, nrows=0)
        if len(header.columns) > limits.max_columns:
            report.error(
                "file", f"{len(header.columns)} columns; at most {limits.max_columns} are allowed"
            )
            return None
        frame = pd.read_csv(path, nrows=limits.max_rows + 1, low_memory=False)
        if len(frame) > limits.max_rows:
            report.error("file", f"more than {limits.max_rows} rows; at most that many are allowed")
            return None
        return frame
    except pd.errors.EmptyDataError:
        report.error("file", "the file is empty")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        report.error("file", f"could not parse the {fmt} file: {exc}")
    except Exception as exc:  # pyarrow raises its own ArrowException family
        report.error("file", f"could not read the {fmt} file: {exc}")
    return None


def _read_table(
    path: Path, fmt: str, label_column: str | None, limits: Limits, report: Report
) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Rows -> ``{x_<split>, y_<split>}`` arrays; median-imputes missing features (train medians)."""
    import pandas as pd

    frame = _read_table_frame(path, fmt, limits, report)
    if frame is None:
        return {}, None
    frame.columns = [str(column) for column in frame.columns]
    label = label_column or "label"
    has_label = label in frame.columns
    if not has_label:
        listed = ", ".join(repr(c) for c in list(frame.columns)[:20])
        report.error(
            label,
            f"label column {label!r} not found (columns: {listed}); name it 'label' or give "
            "label_column at upload",
        )
    split_column = "split" if "split" in frame.columns and label != "split" else None
    features = [c for c in frame.columns if c not in (label, split_column)]
    if not features:
        report.error("file", "no feature columns besides the label")

    for column in features:
        series = frame[column]
        if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
            continue
        numbers = pd.to_numeric(series, errors="coerce")
        bad = series[numbers.isna() & series.notna()]
        example = f" (e.g. {bad.iloc[0]!r} in row {bad.index[0]})" if len(bad) else ""
        report.error(
            column,
            f"feature column {column!r} is not numeric{example}; encode it as numbers or drop it",
        )

    split_of_row = None
    if split_column is not None:
        raw = frame[split_column].astype(str).str.strip().str.lower()
        split_of_row = raw.map(SPLIT_ALIASES)
        unknown = sorted(set(raw[split_of_row.isna()]))
        if unknown:
            report.error(
                split_column,
                f"unknown split values {unknown[:_MAX_LISTED]}; use train, val or test",
            )
        elif not (split_of_row == "train").any():
            report.error(split_column, "no rows have split 'train'")

    if has_label:
        missing_labels = int(frame[label].isna().sum())
        if missing_labels:
            first = int(np.flatnonzero(frame[label].isna().to_numpy())[0])
            report.error(label, f"{missing_labels} rows have no label (first: row {first})")
    if not report.ok:
        return {}, None

    x_all = frame[features].astype(np.float64).to_numpy()
    labels = frame[label]
    if pd.api.types.is_bool_dtype(labels):
        y_all = labels.to_numpy().astype(np.int64)
    elif pd.api.types.is_numeric_dtype(labels):
        y_all = labels.to_numpy()
    else:
        y_all = labels.astype(str).to_numpy().astype(str)

    row_split = np.full(len(frame), "train") if split_of_row is None else split_of_row.to_numpy()
    train_rows = row_split == "train"
    infinite = np.isinf(x_all)
    if infinite.any():
        per_column = infinite.sum(axis=0)
        for index in np.flatnonzero(per_column)[:_MAX_LISTED]:
            report.error(features[index], f"{int(per_column[index])} infinite values")
        return {}, None
    missing = np.isnan(x_all)
    if missing.any():
        per_column = missing.sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN median
            medians = np.nanmedian(np.where(train_rows[:, None], x_all, np.nan), axis=0)
        # A column with no training value at all falls back to 0.
        medians = np.where(np.isnan(medians), 0.0, medians)
        for index in np.flatnonzero(per_column):
            report.warn(
                features[index],
                f"{int(per_column[index])} missing values filled with the training median "
                f"({medians[index]:.6g})",
            )
        x_all = np.where(missing, medians[None, :], x_all)

    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        rows = row_split == split
        if split == "train" or rows.any():
            arrays[f"x_{split}"] = x_all[rows]
            arrays[f"y_{split}"] = y_all[rows]
    return arrays, features


# --------------------------------------------------------------------------------------------
# Validation


def _count_nonfinite(array: _Member) -> tuple[int, int, int]:
    """(NaN count, ±inf count, count of finite values beyond float32's range)."""
    n_nan = n_inf = n_overflow = 0
    check_overflow = array.dtype.itemsize > 4
    for chunk in _chunks(array):
        n_nan += int(np.count_nonzero(np.isnan(chunk)))
        n_inf += int(np.count_nonzero(np.isinf(chunk)))
        if check_overflow:
            with np.errstate(invalid="ignore"):
                n_overflow += int(
                    np.count_nonzero(np.isfinite(chunk) & (np.abs(chunk) > _FLOAT32_MAX))
                )
    return n_nan, n_inf, n_overflow


def nan_before_value(nan: np.ndarray) -> bool:
    """Whether a NaN along the last axis of the mask ``nan`` is followed by a number (a gap,
    not the trailing padding of a shorter series)."""
    return bool(np.any(nan[..., :-1] & ~nan[..., 1:]))


def _streamed_nan_is_trailing_padding(array: _StreamedArray) -> tuple[bool, int]:
    """:func:`_nan_is_trailing_padding` for a member read from disk in whole-series blocks."""
    if not array.fortran_order:
        # C order: each row of L values is one (sample, channel) series.
        padded_series = 0
        for block in array.blocks(array.shape[-1]):
            nan = np.isnan(block)
            if nan_before_value(nan):
                return False, 0
            padded_series += int(np.count_nonzero(nan[:, -1]))
        return True, padded_series
    # Fortran order stores the transpose (L, C, N): each row is one position along L for every
    # series, so a NaN followed by a number can also straddle two blocks.
    previous: np.ndarray | None = None
    for block in array.blocks(array.shape[0] * array.shape[1]):
        nan = np.isnan(block)
        if np.any(nan[:-1] & ~nan[1:]) or (previous is not None and np.any(previous & ~nan[0])):
            return False, 0
        previous = nan[-1].copy()
    return True, 0 if previous is None else int(np.count_nonzero(previous))


def _nan_is_trailing_padding(array: _Member) -> tuple[bool, int]:
    """Whether every NaN of an (N, C, L) array sits in a run that reaches the end of its series."""
    if isinstance(array, _StreamedArray):
        return _streamed_nan_is_trailing_padding(array)
    padded_series = 0
    for chunk in _chunks(array):
        nan = np.isnan(chunk)
        if nan_before_value(nan):
            return False, 0
        padded_series += int(np.count_nonzero(nan[..., -1]))
    return True, padded_series


def _is_whole(array: _Member) -> bool:
    """True when every value is a whole number (always for integer and bool dtypes)."""
    if array.dtype.kind in "biu":
        return True
    return all(np.all(np.mod(chunk, 1) == 0) for chunk in _chunks(array))


def _is_binary(array: _Member) -> bool:
    return all(np.all((chunk == 0) | (chunk == 1)) for chunk in _chunks(array))


def _unique(array: _Member) -> np.ndarray:
    values = np.unique(np.concatenate([np.unique(chunk) for chunk in _chunks(array)]))
    return values


def _check_x(name: str, x: _Member, report: Report) -> bool:
    """Shape, dtype and value checks on one x member; True if it passed."""
    if x.dtype.kind not in "biuf":
        report.error(name, f"dtype {x.dtype} is not numeric; x must hold numbers")
        return False
    if x.ndim not in INPUT_KINDS:
        report.error(
            name,
            f"has shape {x.shape}; expected (N, D) tabular, (N, C, L) sequence or (N, C, H, W) image",
        )
        return False
    if len(x) == 0:
        report.error(name, "is empty (0 samples)")
        return False
    if 0 in x.shape[1:]:
        report.error(name, f"has shape {x.shape}: a sample cannot have a zero-length axis")
        return False
    if x.dtype.kind != "f":
        return True
    n_nan, n_inf, n_overflow = _count_nonfinite(x)
    ok = True
    if n_inf:
        report.error(name, f"contains {n_inf} infinite values")
        ok = False
    if n_overflow:
        report.error(
            name, f"contains {n_overflow} values too large for float32 (|x| > {_FLOAT32_MAX:.3g})"
        )
        ok = False
    if n_nan:
        trailing, n_series = _nan_is_trailing_padding(x) if x.ndim == 3 else (False, 0)
        if trailing:
            report.warn(
                name,
                f"{n_series} series end in NaN padding ({n_nan} values); read as unequal-length "
                "series and filled with zeros",
            )
        else:
            where = (
                ""
                if x.ndim != 3
                else " (only trailing NaN padding along the last axis is accepted)"
            )
            report.error(name, f"contains {n_nan} NaN values{where}")
            ok = False
    return ok


def _check_y_values(name: str, y: _Member, report: Report) -> bool:
    if y.dtype.kind in "US":
        return True
    if y.dtype.kind not in "biuf":
        report.error(name, f"dtype {y.dtype} is not supported; labels must be numbers or strings")
        return False
    if len(y) == 0:
        report.error(name, "is empty (0 samples)")
        return False
    if y.dtype.kind == "f":
        n_nan, n_inf, _ = _count_nonfinite(y)
        if n_nan or n_inf:
            report.error(name, f"contains {n_nan} NaN and {n_inf} infinite values")
            return False
    return True


@dataclass
class _Labels:
    task_type: str
    label_shape: tuple[int, ...]
    label_kind: str
    classes: list[Any] | None


def _infer_labels(
    y: _Member, sample_shape: tuple[int, ...], *, from_table: bool, report: Report
) -> _Labels | None:
    """Task type and label facts from y_train's dtype, shape and values."""
    spatial = sample_shape[1:] if len(sample_shape) >= 2 else ()
    label_shape = tuple(y.shape[1:])
    text = y.dtype.kind in "US"
    dense_with_channel = (
        bool(spatial) and len(label_shape) == len(spatial) + 1 and label_shape[1:] == spatial
    )
    if spatial and (label_shape == spatial or dense_with_channel):
        if text:
            report.error("y_train", "per-position label maps must be numeric")
            return None
        whole = _is_whole(y)
        if whole and (not dense_with_channel or label_shape[0] == 1):
            return _Labels("dense_classification", spatial, "integer", None)
        shape = label_shape if dense_with_channel else (1, *spatial)
        return _Labels("dense_regression", shape, "integer" if whole else "float", None)
    if y.ndim == 1:
        if text:
            return _Labels("classification", (), "text", None)
        if not _is_whole(y):
            return _Labels("regression", (), "float", None)
        if y.dtype.kind in "biu" and not from_table:
            return _Labels("classification", (), "integer", None)
        # Whole numbers stored as float (or any CSV column): class ids only if every value repeats.
        _, counts = np.unique(np.asarray(y), return_counts=True)
        if counts.min() >= 2:
            return _Labels("classification", (), "integer", None)
        report.warn(
            "y_train",
            "labels are whole numbers but some values occur only once, so they are read as a "
            "regression target; ask for task type 'classification' if they are class ids",
        )
        return _Labels("regression", (), "integer", None)
    if y.ndim == 2:
        if text:
            report.error("y_train", f"has shape {y.shape}: (N, K) labels must be numeric")
            return None
        if _is_binary(y):
            return _Labels("multilabel", label_shape, "binary", None)
        return _Labels("regression", label_shape, "integer" if _is_whole(y) else "float", None)
    report.error(
        "y_train",
        f"has shape {y.shape}; expected (N,) labels, (N, K) targets, or a per-position map with the "
        f"spatial shape of x {spatial or '(none: x is tabular)'}",
    )
    return None


def _relabel_for_task(labels: _Labels, task_type: str) -> _Labels:
    """Label facts when the user asks for a (compatible) task type other than the inferred one."""
    shape = labels.label_shape
    if task_type == "dense_regression" and labels.task_type == "dense_classification":
        shape = (1, *shape)
    return replace(labels, task_type=task_type, label_shape=shape)


def _check_classes(
    arrays: dict[str, _Member],
    labels: _Labels,
    splits: list[str],
    limits: Limits,
    report: Report,
) -> None:
    """Class list and the classification-only checks (single class, unseen classes, rare classes)."""
    dense = labels.task_type == "dense_classification"
    y_train = arrays["y_train"]
    classes, counts = (
        (_unique(y_train), None) if dense else np.unique(np.asarray(y_train), return_counts=True)
    )
    if len(classes) > limits.max_classes:
        report.error(
            "y_train",
            f"{len(classes)} distinct labels, over the limit of {limits.max_classes} classes; "
            "if this is a continuous target, store it as float (task type regression)",
        )
        return
    if len(classes) < 2:
        report.error(
            "y_train",
            f"has a single class ({_to_python(classes[0])!r}); classification needs at least two",
        )
    for split in splits[1:]:
        seen = _unique(arrays[f"y_{split}"])
        unseen = np.setdiff1d(seen, classes)
        if len(unseen):
            listed = [_to_python(value) for value in unseen[:_MAX_LISTED]]
            report.error(f"y_{split}", f"labels {listed} never occur in y_train")
    if counts is not None and len(classes) >= 2:
        rare = classes[counts < 2]
        if len(rare):
            listed = [_to_python(value) for value in rare[:_MAX_LISTED]]
            report.warn("y_train", f"classes {listed} have fewer than 2 training samples")
    labels.classes = [_to_python(value) for value in classes]


def _validate(
    arrays: dict[str, _Member],
    present: set[str],
    *,
    fmt: str,
    from_table: bool,
    task_type: str | None,
    label_column: str | None,
    feature_names: list[str] | None,
    limits: Limits,
    report: Report,
) -> DatasetInfo | None:
    """Cross-member checks and label inference; None when any error was found."""
    for name in ("x_train", "y_train"):
        if name not in present:
            report.error(name, "is missing: every upload needs x_train and y_train")
    for split in ("val", "test"):
        x_name, y_name = f"x_{split}", f"y_{split}"
        if (x_name in present) != (y_name in present):
            given, missing = (x_name, y_name) if x_name in present else (y_name, x_name)
            report.error(missing, f"is missing: {given} is given without {missing}")

    # Text labels stored as bytes become str, so class values are JSON-able.
    for name in list(arrays):
        if name.startswith("y_") and arrays[name].dtype.kind == "S":
            try:
                arrays[name] = np.char.decode(np.asarray(arrays[name]), "utf-8")
            except UnicodeDecodeError:
                report.error(name, "byte-string labels are not valid UTF-8")
                del arrays[name]

    x_ok = {name: _check_x(name, arrays[name], report) for name in arrays if name.startswith("x_")}
    y_ok = {
        name: _check_y_values(name, arrays[name], report)
        for name in arrays
        if name.startswith("y_")
    }
    if "y_train" in arrays:
        train_is_text = arrays["y_train"].dtype.kind == "U"
        for split in ("val", "test"):
            name = f"y_{split}"
            if (
                name in arrays
                and y_ok.get(name)
                and (arrays[name].dtype.kind == "U") != train_is_text
            ):
                kinds = ("text", "numbers") if train_is_text else ("numbers", "text")
                report.error(name, f"labels are {kinds[1]} but y_train labels are {kinds[0]}")
                y_ok[name] = False
    splits = [s for s in SPLITS if f"x_{s}" in arrays and f"y_{s}" in arrays]
    usable = [s for s in splits if x_ok[f"x_{s}"] or arrays[f"x_{s}"].ndim in INPUT_KINDS]
    for split in usable:
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            report.error(f"y_{split}", f"has {n_y} samples but x_{split} has {n_x}")
    if "train" in usable:
        x_shape = arrays["x_train"].shape[1:]
        y_shape = arrays["y_train"].shape[1:]
        for split in usable[1:]:
            if arrays[f"x_{split}"].shape[1:] != x_shape:
                report.error(
                    f"x_{split}",
                    f"samples have shape {arrays[f'x_{split}'].shape[1:]} but x_train samples have "
                    f"shape {x_shape}",
                )
            if arrays[f"y_{split}"].shape[1:] != y_shape:
                report.error(
                    f"y_{split}",
                    f"labels have shape {arrays[f'y_{split}'].shape[1:]} but y_train labels have "
                    f"shape {y_shape}",
                )

    labels = None
    if "train" in usable and y_ok.get("y_train"):
        labels = _infer_labels(
            arrays["y_train"],
            tuple(arrays["x_train"].shape[1:]),
            from_table=from_table,
            report=report,
        )
    if labels is not None and task_type not in (None, "auto") and task_type != labels.task_type:
        probe = DatasetInfo(
            fmt,
            "tabular",
            (),
            labels.label_shape,
            labels.task_type,
            None,
            None,
            {},
            label_kind=labels.label_kind,
        )
        allowed = compatible_task_types(probe)
        if task_type not in allowed:
            report.error(
                "task.type",
                f"task type {task_type!r} does not fit these labels (inferred {labels.task_type!r}; "
                f"possible: {', '.join(allowed)})",
            )
            labels = None
        else:
            labels = _relabel_for_task(labels, task_type)
    if labels is not None and labels.task_type in ("classification", "dense_classification"):
        checked = [s for s in usable if y_ok.get(f"y_{s}")]
        _check_classes(arrays, labels, checked, limits, report)

    if not report.ok or labels is None:
        return None
    x_train = arrays["x_train"]
    return DatasetInfo(
        format=fmt,
        input_kind=INPUT_KINDS[x_train.ndim],
        sample_shape=tuple(int(v) for v in x_train.shape[1:]),
        label_shape=tuple(int(v) for v in labels.label_shape),
        task_type=labels.task_type,
        n_classes=len(labels.classes) if labels.classes is not None else None,
        classes=labels.classes,
        splits={split: len(arrays[f"x_{split}"]) if split in splits else 0 for split in SPLITS},
        label_column=(label_column or "label") if from_table else None,
        has_val="val" in splits,
        has_test="test" in splits,
        label_kind=labels.label_kind,
        feature_names=feature_names,
    )


def _inspect_unchecked(
    path: Path,
    *,
    filename: str,
    label_column: str | None,
    task_type: str | None,
    limits: Limits,
    tmp: Path,
    streamed: bool,
) -> tuple[DatasetInfo | None, Report, dict[str, _Member]]:
    report = Report()
    fmt = _detect_format(filename, report)
    if fmt is None:
        return None, report, {}
    feature_names = None
    arrays: dict[str, _Member]
    if fmt == "npz":
        arrays, present = _read_npz(path, limits, report, tmp, streamed)
        if report.too_large or (not present and not report.ok):
            return None, report, {}
    else:
        table, feature_names = _read_table(path, fmt, label_column, limits, report)
        if not report.ok:
            return None, report, {}
        arrays = dict(table)
        present = set(arrays)
    info = _validate(
        arrays,
        present,
        fmt=fmt,
        from_table=fmt != "npz",
        task_type=task_type,
        label_column=label_column,
        feature_names=feature_names,
        limits=limits,
        report=report,
    )
    return info, report, arrays


def _inspect(
    path: Path,
    *,
    filename: str,
    label_column: str | None,
    task_type: str | None,
    limits: Limits,
    tmp: Path,
    streamed: bool = False,
) -> tuple[DatasetInfo | None, Report, dict[str, _Member]]:
    """:func:`_inspect_unchecked`, with any unexpected failure turned into a report entry.

    ``streamed`` (validation only): ``.npz`` members are scanned from disk in bounded chunks and
    come back as :class:`_StreamedArray`; otherwise they are memory-mapped arrays.
    """
    try:
        return _inspect_unchecked(
            path,
            filename=filename,
            label_column=label_column,
            task_type=task_type,
            limits=limits,
            tmp=tmp,
            streamed=streamed,
        )
    except MemoryError:
        report = Report()
        report.error("file", "the dataset does not fit in memory for validation")
    except Exception as exc:  # the contract: bad content yields a report, never a traceback
        logger.exception("unexpected failure inspecting %s", filename)
        report = Report()
        report.error("file", f"could not read the file: {exc}")
    return None, report, {}


def inspect_file(
    path: str | Path,
    *,
    filename: str,
    label_column: str | None = None,
    limits: Limits = Limits(),
    task_type: str | None = None,
) -> tuple[DatasetInfo | None, Report]:
    """Validate an upload without keeping it in memory; never raises for bad content.

    Returns the dataset facts (None when there is any error) and a report listing every problem.
    ``filename`` (the user's name for the upload) decides the format by its extension.
    """
    with tempfile.TemporaryDirectory(prefix="orca-inspect-") as tmp:
        info, report, _ = _inspect(
            Path(path),
            filename=filename,
            label_column=label_column,
            task_type=task_type,
            limits=limits,
            tmp=Path(tmp),
            streamed=True,
        )
    return info, report


# --------------------------------------------------------------------------------------------
# Loading


def split_train_val(
    y: np.ndarray, *, task_type: str, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val row indices; stratified for classification when every class has 2+ rows.

    Keeps at least one row on each side. Indices come back sorted (sequential reads).
    """
    from sklearn.model_selection import train_test_split

    n_rows = len(y)
    if n_rows < 2:
        raise DataError(
            "need at least 2 training samples to hold out a validation split",
            report=Report(
                [Issue("x_train", "fewer than 2 samples: cannot make a validation split")]
            ),
            param="x_train",
        )
    n_val = min(max(1, round(n_rows * val_fraction)), n_rows - 1)
    stratify = None
    if task_type == "classification":
        _, counts = np.unique(y, return_counts=True)
        n_classes = len(counts)
        if counts.min() >= 2 and n_val >= n_classes and n_rows - n_val >= n_classes:
            stratify = y
    train_idx, val_idx = train_test_split(
        np.arange(n_rows), test_size=n_val, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(train_idx), np.sort(val_idx)


def _features(x: _Member) -> np.ndarray:
    """float32 copy; NaN left in x after validation can only be trailing padding -> zeros."""
    values = np.array(x, dtype=np.float32)
    if values.dtype.kind == "f":
        np.nan_to_num(values, copy=False, nan=0.0)
    return values


def _targets(y: _Member, info: DatasetInfo, label_map: LabelMap | None) -> np.ndarray:
    task_type = info.task_type
    values = np.asarray(y)
    if task_type in ("classification", "dense_classification"):
        assert label_map is not None
        if task_type == "dense_classification" and values.ndim == len(info.label_shape) + 2:
            values = values[:, 0]
        return label_map.encode(values)
    if task_type == "dense_regression" and values.ndim == len(info.label_shape):
        values = values[:, None]
    return np.asarray(values, dtype=np.float32)


def load_dataset(
    path: str | Path,
    *,
    filename: str | None = None,
    label_column: str | None = None,
    task_type: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    limits: Limits = Limits(),
) -> Dataset:
    """Validate and load every split; raises :class:`DataError` carrying the full report.

    ``task_type`` (or None / "auto") overrides the inferred task when the labels allow it. When the
    upload has no validation split, a seeded (stratified for classification) share ``val_fraction``
    of train is held out.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="orca-load-") as tmp:
        info, report, arrays = _inspect(
            path,
            filename=filename or path.name,
            label_column=label_column,
            task_type=task_type,
            limits=limits,
            tmp=Path(tmp),
        )
        if info is None:
            first = report.errors[0].field if report.errors else None
            raise DataError(report.summary(), report=report, param=first)
        label_map = LabelMap(info.classes) if info.classes is not None else None
        loaded = {
            split: (
                _features(arrays[f"x_{split}"]),
                _targets(arrays[f"y_{split}"], info, label_map),
            )
            for split in SPLITS
            if f"x_{split}" in arrays
        }
    if "val" not in loaded:
        x, y = loaded["train"]
        train_idx, val_idx = split_train_val(
            y, task_type=info.task_type, val_fraction=val_fraction, seed=seed
        )
        loaded["train"] = (x[train_idx], y[train_idx])
        loaded["val"] = (x[val_idx], y[val_idx])
        logger.info("held out %d of %d training samples for validation", len(val_idx), len(y))
    info = replace(
        info, splits={split: len(loaded[split][0]) if split in loaded else 0 for split in SPLITS}
    )
    x_test, y_test = loaded.get("test", (None, None))
    return Dataset(
        info=info,
        x_train=loaded["train"][0],
        y_train=loaded["train"][1],
        x_val=loaded["val"][0],
        y_val=loaded["val"][1],
        x_test=x_test,
        y_test=y_test,
        label_map=label_map,
        report=report,
    )


__all__ = [
    "FORMATS",
    "KNOWN_MEMBERS",
    "SPLITS",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "Issue",
    "LabelMap",
    "Limits",
    "Normaliser",
    "Report",
    "TargetScaler",
    "compatible_task_types",
    "inspect_file",
    "load_dataset",
    "nan_before_value",
    "split_train_val",
]
