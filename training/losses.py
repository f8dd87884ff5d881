"""Reconstruction losses on linear HDR radiance (docs/training.md has the measurement behind the default).

Each loss is an L1 distance after a per-value transfer curve t: mean |t(prediction) - t(target)|.
- "l1": t(x) = x, the paper's loss on linear values; bright highlights dominate the gradient.
- "log-l1" (ours): t(x) = log(1 + x), close to linear below 1 and logarithmic above, so a sun glint
  weighs like an error of a few per cent rather than hundreds of units of radiance.
- "srgb-l1": t = the sRGB transfer curve (unclipped above 1), the space display PSNR is measured in;
  it weighs dark pixels most.
Written with tensor methods only, so that importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

SRGB_KNEE = 0.0031308


def log_curve(x: Tensor) -> Tensor:
    """log(1 + x), continued linearly below 0 (slope 1, as at 0) so a negative prediction keeps a gradient."""
    return x.clamp(min=0).log1p().where(x > 0, x)


def srgb_curve(x: Tensor) -> Tensor:
    """The sRGB encoding of linear values, unclipped (1.055 x^(1/2.4) - 0.055 continues above 1)."""
    power = 1.055 * x.clamp(min=SRGB_KNEE) ** (1 / 2.4) - 0.055  # clamped: no inf gradient from the unused branch
    return power.where(x > SRGB_KNEE, 12.92 * x)


CURVES = {"log-l1": log_curve, "l1": lambda x: x, "srgb-l1": srgb_curve}
LOSSES = tuple(CURVES)


def reconstruction_loss(kind: str, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean L1 distance after the curve of `kind` over all values, or, for images (B, 3, H, W), over the
    pixels where mask (B, 1, H, W) is non-zero."""
    curve = CURVES[kind]
    error = (curve(prediction.float()) - curve(target.float())).abs()
    if mask is None:
        return error.mean()
    weight = (mask > 0).to(error.dtype)
    return (error * weight).sum() / (weight.sum() * error.shape[1]).clamp(min=1)
