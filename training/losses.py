"""Reconstruction losses on linear HDR radiance (docs/training.md has the measurement behind the default).

L1 distances after a per-value transfer curve t: mean |t(prediction) - t(target)|.
- "l1": t(x) = x, the paper's loss on linear values; bright highlights dominate the gradient.
- "log-l1": t(x) = log(1 + x), close to linear below 1 and logarithmic above, so a sun glint
  weighs like an error of a few per cent rather than hundreds of units of radiance.
- "srgb-l1": t = the sRGB transfer curve (unclipped above 1), the space display PSNR is measured in;
  it weighs dark pixels most.
And a squared error that stays unbiased when the prediction is a Monte Carlo estimate:
- "srgb-mse" (ours): w(t) (p - t)^2 with w the squared slope of the sRGB curve at the target, i.e. the
  display-space squared error to first order. On two independent estimates p1, p2 of the same pixel
  (paired_loss) it is w (p1 - t)(p2 - t), whose expectation and gradient are those of w (E p - t)^2:
  ray noise does not bias the learned brightness, whereas any L1 loss pulls it towards the estimate's
  median, below the mean under skewed noise (a few lucky rays carrying most of the light).
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


def srgb_weight(target: Tensor) -> Tensor:
    """(d sRGB / dx)^2 at the target, constant below the sRGB knee (where the curve is linear)."""
    return (1.055 / 2.4 * target.clamp(min=SRGB_KNEE) ** (1 / 2.4 - 1)) ** 2


CURVES = {"log-l1": log_curve, "l1": lambda x: x, "srgb-l1": srgb_curve}
PAIRED = ("srgb-mse",)  # losses that take two independent estimates per pixel in stage one
LOSSES = (*PAIRED, *CURVES)


def paired_loss(first: Tensor, second: Tensor, target: Tensor) -> Tensor:
    """Mean of w(t) (p1 - t)(p2 - t) over all values: unbiased for w(t) (E p - t)^2 (module docstring)."""
    target = target.float()
    return (srgb_weight(target) * (first.float() - target) * (second.float() - target)).mean()


def reconstruction_loss(kind: str, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean loss of `kind` over all values, or, for images (B, 3, H, W), over the pixels where mask
    (B, 1, H, W) is non-zero: an L1 distance after the curve of `kind`, or for "srgb-mse" the weighted
    squared error (for deterministic predictions, as in stage two)."""
    if kind in PAIRED:
        target = target.float()
        error = srgb_weight(target) * (prediction.float() - target) ** 2
    else:
        curve = CURVES[kind]
        error = (curve(prediction.float()) - curve(target.float())).abs()
    if mask is None:
        return error.mean()
    weight = (mask > 0).to(error.dtype)
    return (error * weight).sum() / (weight.sum() * error.shape[1]).clamp(min=1)
