"""Training-time augmentation for small datasets: label-preserving perturbations of a batch.

Used by refinement only (never at evaluation or prediction time). Inputs arrive normalised
(per-channel unit scale), so the strengths below are fractions of one standard deviation.

* ``seq1d`` (B, C, L): per-(sample, channel) amplitude scaling, a smooth amplitude warp (a
  random gain curve through a few knots), a small additive jitter, and a random time shift of
  up to a tenth of the length with the edge values repeated (not wrapped: wrapping would glue
  the series' end onto its start). Where *when* something happens is the label, the shift
  changes the class, which is why augmentation is off by default (docs/QUALITY.md).
* ``image2d`` (B, C, H, W): a random translation of up to an eighth of each side (at least one
  pixel), zero-filled.
* tabular rows and dense tasks: none. Features of a row have no order to shift, and moving a
  dense input would need the same move on its label map.

All randomness comes from torch's global CPU generator, which the training loop seeds from the
spec and saves in its resume state, so a resumed run draws the same perturbations.
"""

from __future__ import annotations

import torch

from orca_engine.specs import augmentation_applies

SCALE_STD = 0.1
WARP_STD = 0.1
WARP_KNOTS = 4
JITTER_STD = 0.03
MAX_SHIFT_FRACTION = 0.1
MAX_TRANSLATE_FRACTION = 0.125


def _shift_sequences(x: torch.Tensor) -> torch.Tensor:
    batch, channels, length = x.shape
    max_shift = int(length * MAX_SHIFT_FRACTION)
    if max_shift < 1:
        return x
    shifts = torch.randint(-max_shift, max_shift + 1, (batch, 1))
    # Position i reads i - shift, clamped to the ends: the edge value fills the gap.
    source = (torch.arange(length).unsqueeze(0) - shifts).clamp(0, length - 1)
    index = source.to(x.device).unsqueeze(1).expand(batch, channels, length)
    return torch.gather(x, 2, index)


def _warp_curves(batch: int, channels: int, length: int) -> torch.Tensor:
    """Smooth gain curves around 1: linear interpolation through a few random knots."""
    knots = WARP_STD * torch.randn(batch, channels, WARP_KNOTS)
    if length == 1:
        return 1.0 + knots[..., :1]
    return 1.0 + torch.nn.functional.interpolate(
        knots, size=length, mode="linear", align_corners=True
    )


def _augment_sequences(x: torch.Tensor) -> torch.Tensor:
    batch, channels, length = x.shape
    gain = (1.0 + SCALE_STD * torch.randn(batch, channels, 1)) * _warp_curves(
        batch, channels, length
    )
    jitter = JITTER_STD * torch.randn(batch, channels, length)
    x = x * gain.to(x.device, x.dtype) + jitter.to(x.device, x.dtype)
    return _shift_sequences(x)


def _translate_images(x: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = x.shape
    max_dy = max(1, int(height * MAX_TRANSLATE_FRACTION)) if height > 1 else 0
    max_dx = max(1, int(width * MAX_TRANSLATE_FRACTION)) if width > 1 else 0
    if not (max_dy or max_dx):
        return x
    padded = torch.nn.functional.pad(x, (max_dx, max_dx, max_dy, max_dy))
    offsets_y = torch.randint(0, 2 * max_dy + 1, (batch,)).tolist()
    offsets_x = torch.randint(0, 2 * max_dx + 1, (batch,)).tolist()
    return torch.stack(
        [
            padded[i, :, dy : dy + height, dx : dx + width]
            for i, (dy, dx) in enumerate(zip(offsets_y, offsets_x, strict=True))
        ]
    )


def augment_batch(x: torch.Tensor, *, input_kind: str, task_type: str) -> torch.Tensor:
    """A randomly perturbed copy of a normalised training batch (``x`` itself when none applies)."""
    if not augmentation_applies(input_kind, task_type):
        return x
    if input_kind == "seq1d" and x.dim() == 3:
        return _augment_sequences(x)
    if input_kind == "image2d" and x.dim() == 4:
        return _translate_images(x)
    return x
