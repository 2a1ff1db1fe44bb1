"""Fixtures shared by every test package: real example datasets written as uploads would be."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests share 2 cores with each other's subprocesses; keep BLAS/torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_gunpoint_npz(path: Path) -> Path:
    """aeon's GunPoint (UCR) as an upload: train/test splits, labels as the original ints 1/2."""
    from aeon.datasets import load_gunpoint

    x_train, y_train = load_gunpoint(split="train")
    x_test, y_test = load_gunpoint(split="test")
    np.savez(
        path,
        x_train=x_train.astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=x_test.astype(np.float32),
        y_test=y_test.astype(np.int64),
    )
    return path


@pytest.fixture(scope="session")
def gunpoint_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gunpoint_npz(tmp_path_factory.mktemp("data") / "gunpoint.npz")
