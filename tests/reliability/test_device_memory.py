"""A cancelled or failed job gives its GPU memory back (worker.tasks._free_device_memory).

On a machine without CUDA only the guard can be checked: the CUDA cache is emptied when, and
only when, CUDA is present. The ``gpu`` test checks the real effect on a device.
"""

from __future__ import annotations

import pytest
import torch

from worker import tasks


def test_cuda_cache_is_emptied_only_when_cuda_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tasks._free_device_memory()
    assert calls == []  # a CPU-only worker never touches CUDA

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tasks._free_device_memory()
    assert calls == ["empty_cache"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_freeing_device_memory_returns_the_cached_blocks() -> None:
    block = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    assert torch.cuda.memory_reserved() >= block.numel()
    del block
    assert torch.cuda.memory_reserved() > 0  # still cached by PyTorch, unusable by others
    tasks._free_device_memory()
    assert torch.cuda.memory_reserved() == 0
