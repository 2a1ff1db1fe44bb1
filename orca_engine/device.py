"""Where and how the engine runs models: device choice, seeding, AMP, RNG snapshots, OOM.

Every stage goes through these helpers so that "same spec + seed -> same result on CPU" and
"CUDA ran out of memory -> a message the user can act on" hold in one place.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from orca_engine.errors import OutOfMemory

#: the most samples one forward pass sees at evaluation / prediction time
EVAL_CHUNK_SIZE = 256


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (a best-so-far snapshot that training won't move)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); make cuDNN pick deterministic kernels.

    ``torch.use_deterministic_algorithms`` is left alone: on CUDA it needs process-wide
    workspace settings and is far from cheap. CPU kernels are deterministic already.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, a no-op elsewhere (CPU autocast is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state a training loop depends on, as a dict ``torch.load(weights_only=True)`` accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Undo :func:`rng_state`: the next random draw is the one the snapshot would have made."""
    random.setstate(_as_tuple(state["python"]))
    saved_numpy = state["numpy"]
    np.random.set_state(
        (
            saved_numpy["kind"],
            saved_numpy["keys"].numpy().astype(np.uint32),
            saved_numpy["pos"],
            saved_numpy["has_gauss"],
            saved_numpy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _as_tuple(value: Any) -> Any:
    # random.setstate wants tuples all the way down; serialisation may hand back lists.
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(item) for item in value)
    return value


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's CUDA OOM and the plain RuntimeErrors other allocators raise."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@contextlib.contextmanager
def out_of_memory_as_error(hint: str) -> Iterator[None]:
    """Turn a device OOM inside the block into :class:`OutOfMemory` carrying ``hint``."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(f"the device ran out of memory: {hint}") from error


def outputs_in_chunks(
    model: nn.Module,
    x: np.ndarray,
    *,
    device: torch.device,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk_size: int = EVAL_CHUNK_SIZE,
) -> np.ndarray:
    """Raw model outputs for every row of ``x`` as one float32 array on the CPU.

    Only one chunk is on the device at a time; ``transform`` (e.g. the training normaliser) is
    applied per chunk so a memory-mapped split is never copied whole. The caller sets train/eval
    mode; this runs under ``torch.inference_mode``.
    """
    pieces: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(x), chunk_size):
            chunk = np.asarray(x[start : start + chunk_size])
            if transform is not None:
                chunk = transform(chunk)
            inputs = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
            with autocast(device):
                outputs = model(inputs)
            pieces.append(outputs.float().cpu().numpy())
    if not pieces:
        raise ValueError("no samples to run the model on")
    return np.concatenate(pieces, axis=0)
