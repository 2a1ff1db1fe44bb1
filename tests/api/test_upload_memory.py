"""Validating a large upload must not grow the validating process's memory with the file's size.

The API validates every accepted upload with ``inspect_file``; if that mapped (or loaded) the
arrays, each 200 MB upload would add ~200 MB to the API's resident memory while it is checked.
The check runs in a fresh subprocess so the peak (``VmHWM``) belongs to the validation alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.services import datasets as dataset_service
from tests.api.helpers import upload

REPO_ROOT = Path(__file__).resolve().parents[2]

# (N, C, L) float32 series: 52,000 x 2 x 500 x 4 bytes = 208 MB.
N_SAMPLES, N_CHANNELS, LENGTH = 52_000, 2, 500
PADDED_EVERY = 1000  # every 1000th sample's channel 1 ends in NaN padding
MAX_PEAK_GROWTH_MB = 100

_MEASURE = """
import json, sys
from orca_engine.data import inspect_file

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")

before = peak_mb()
info, report = inspect_file(sys.argv[1], filename="big.npz")
after = peak_mb()
print(json.dumps({
    "growth_mb": after - before,
    "info": None if info is None else info.to_dict(),
    "report": report.to_dict(),
}))
"""


def _write_stored_member(
    archive: zipfile.ZipFile, name: str, array_blocks: list[np.ndarray]
) -> None:
    """Write one uncompressed ``.npy`` member block by block (never the whole array in memory)."""
    first = array_blocks[0]
    shape = (sum(len(block) for block in array_blocks), *first.shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {**header, "shape": shape})
        for block in array_blocks:
            member.write(np.ascontiguousarray(block).tobytes())


def _write_big_npz(path: Path) -> None:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("x_train.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False,
                    "shape": (N_SAMPLES, N_CHANNELS, LENGTH),
                },
            )
            step = 4000
            for start in range(0, N_SAMPLES, step):
                rows = min(step, N_SAMPLES - start)
                block = rng.standard_normal((rows, N_CHANNELS, LENGTH), dtype=np.float32)
                padded = (np.arange(start, start + rows) % PADDED_EVERY) == 0
                block[padded, 1, LENGTH // 2 :] = np.nan
                member.write(block.tobytes())
        _write_stored_member(archive, "y_train", [np.arange(N_SAMPLES, dtype=np.int64) % 3])


def test_validating_a_200_mb_upload_keeps_peak_memory_growth_under_100_mb(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    _write_big_npz(path)
    assert path.stat().st_size > 200e6

    completed = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    # The validation itself must still do its job on the big file ...
    assert result["report"]["errors"] == []
    n_padded = len(range(0, N_SAMPLES, PADDED_EVERY))
    assert result["report"]["warnings"] == [
        {
            "field": "x_train",
            "message": f"{n_padded} series end in NaN padding ({n_padded * (LENGTH - LENGTH // 2)} "
            "values); read as unequal-length series and filled with zeros",
        }
    ]
    assert result["info"]["sample_shape"] == [N_CHANNELS, LENGTH]
    assert result["info"]["splits"]["train"] == N_SAMPLES
    # ... without its peak resident memory growing with the 208 MB it scanned.
    assert result["growth_mb"] < MAX_PEAK_GROWTH_MB, (
        f"validating a {path.stat().st_size / 1e6:.0f} MB upload raised peak RSS by "
        f"{result['growth_mb']:.0f} MB"
    )


@pytest.mark.parametrize("limit", [1, 2])
def test_concurrent_uploads_wait_for_a_validation_slot(
    make_client: Callable[..., TestClient],
    auth: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
) -> None:
    """Six uploads sent at once are all accepted, but never more than ``limit`` are validated
    together (the real validator runs; a wrapper only counts how many are inside it)."""
    client = make_client(max_concurrent_validations=limit)
    real_inspect = dataset_service.inspect_file
    lock = threading.Lock()
    inside = [0, 0]  # [now, most at once]

    def counting_inspect(*args: Any, **kwargs: Any) -> Any:
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        try:
            time.sleep(0.2)  # keep the slot long enough for the other requests to pile up
            return real_inspect(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(dataset_service, "inspect_file", counting_inspect)
    files = []
    for seed in range(6):
        path = tmp_path / f"up{seed}.npz"
        rng = np.random.default_rng(seed)
        np.savez(path, x_train=rng.normal(size=(10, 3)).astype("f4"), y_train=np.arange(10) % 2)
        files.append(path)

    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        responses = list(pool.map(lambda path: upload(client, auth, path), files))

    assert [response.status_code for response in responses] == [201] * len(files)
    assert inside[1] == limit
