"""Fixtures shared by the engine tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from orca_engine.embedders import KernelBank


@pytest.fixture
def count_bank_rows(monkeypatch: pytest.MonkeyPatch) -> Callable[[KernelBank], list[int]]:
    """``count_bank_rows(bank)`` -> a list that gets the row count of every batch whose shares
    the bank really computes (not those it answers from memory)."""

    def install(bank: KernelBank) -> list[int]:
        computed: list[int] = []
        real = bank._pooled_shares

        def counted(x: torch.Tensor) -> torch.Tensor:
            computed.append(len(x))
            return real(x)

        monkeypatch.setattr(bank, "_pooled_shares", counted)
        return computed

    return install
