"""Pictures for people: linear radiance to 8-bit sRGB PNG (previews, grids, error maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """The sRGB transfer function on [0, 1] (values outside are clipped first)."""
    x = np.clip(linear, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def to_srgb8(linear: np.ndarray, exposure: float = 1.0) -> np.ndarray:
    return (linear_to_srgb(linear * exposure) * 255 + 0.5).astype(np.uint8)


def save_png(path: str | Path, linear: np.ndarray, exposure: float = 1.0) -> None:
    """Save linear RGB (H, W, 3) or grey (H, W) as an sRGB PNG."""
    Image.fromarray(to_srgb8(linear, exposure)).save(path)
