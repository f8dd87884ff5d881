"""Image metrics for evaluation: one colour pipeline, foreground and full-frame variants (docs/metrics.md).

Display space: linear radiance x EXPOSURE, clipped to [0, 1], then the sRGB transfer function (what
Blender's Standard view transform shows at exposure 0). MSE, PSNR, SSIM and FLIP are computed there on
the range [0, 1]; PSNR-lin is computed on the linear values themselves (peak 1, no clipping).
"Foreground" averages over the pixels the objects cover (backend/edges.py footprint: G-buffer mask > 0,
or coverage > 0), "full" over the whole frame (background
is 0 in the ground truth and in every prediction, so full-frame scores are inflated by empty pixels).
"""

from __future__ import annotations

import math

import numpy as np

from backend.imageio import linear_to_srgb

EXPOSURE = 1.0
MSE_FLOOR = 1e-10  # PSNR is capped at 100 dB (peak 1), so identical images give a finite mean
SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # the 11x11 Gaussian window of Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03
SCORES = ("psnr", "ssim", "flip", "mse", "psnr_lin")


def to_display(linear: np.ndarray, exposure: float = EXPOSURE) -> np.ndarray:
    """Linear radiance -> sRGB-encoded values in [0, 1] (float32)."""
    return linear_to_srgb(linear * exposure).astype(np.float32)


def masked_mean(values: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over all pixels (and channels), or over the pixels where mask is true; NaN for an empty mask."""
    if mask is not None:
        if not mask.any():
            return math.nan
        values = values[mask]
    return float(values.mean())


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    return 10 * math.log10(peak**2 / max(mse, MSE_FLOOR))


def gaussian_blur(image: np.ndarray, sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Separable Gaussian filter over the first two axes, borders reflected, same size out."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="reflect")
    height, width = image.shape[:2]
    rows = sum(t * padded[i:i + height] for i, t in enumerate(taps))
    return sum(t * rows[:, i:i + width] for i, t in enumerate(taps))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-pixel SSIM (Gaussian-weighted local statistics), averaged over the colour channels: (H, W)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = gaussian_blur(a), gaussian_blur(b)
    var_a = gaussian_blur(a * a) - mu_a**2
    var_b = gaussian_blur(b * b) - mu_b**2
    cov = gaussian_blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim.mean(axis=-1) if ssim.ndim == 3 else ssim


def flip_map(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """LDR-FLIP error per pixel (H, W) in [0, 1] between two sRGB-encoded images in [0, 1] (67 pixels per degree)."""
    import flip_evaluator

    error, _, _ = flip_evaluator.evaluate(np.ascontiguousarray(reference, np.float32),
                                          np.ascontiguousarray(test, np.float32), "LDR", inputsRGB=True,
                                          applyMagma=False, computeMeanError=False)
    return error[..., 0]


def compare(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray,
            exposure: float = EXPOSURE) -> tuple[dict[str, float], np.ndarray]:
    """Scores of a linear prediction against linear ground truth, and the FLIP map (for the grids).

    Keys: f"{score}_fg" and f"{score}_full" for every score in SCORES.
    """
    foreground = mask > 0
    pred, gt = to_display(prediction, exposure), to_display(truth, exposure)
    squared = ((pred - gt) ** 2).mean(axis=-1)
    squared_linear = ((prediction.astype(np.float64) - truth) ** 2).mean(axis=-1)
    maps = {"ssim": ssim_map(pred, gt), "flip": flip_map(gt, pred)}
    scores = {}
    for region, where in (("fg", foreground), ("full", None)):
        mse = masked_mean(squared, where)
        mse_linear = masked_mean(squared_linear, where)
        scores[f"mse_{region}"] = mse
        scores[f"psnr_{region}"] = math.nan if math.isnan(mse) else psnr_from_mse(mse)
        scores[f"psnr_lin_{region}"] = math.nan if math.isnan(mse_linear) else psnr_from_mse(mse_linear)
        for name, values in maps.items():
            scores[f"{name}_{region}"] = masked_mean(values, where)
    return scores, maps["flip"]


def temporal_scores(predictions: list[np.ndarray], truths: list[np.ndarray], masks: list[np.ndarray],
                    exposure: float = EXPOSURE) -> dict[str, float]:
    """Frame-to-frame stability of a sequence (linear frames in order), in display space on the foreground.

    With d(X)_t = X_{t+1} - X_t over the pixels in both frames' masks:
    temporal_mae = mean |d(prediction) - d(truth)| (0 when the prediction changes exactly as the truth does);
    flicker = mean |d(prediction)| - mean |d(truth)| (> 0: more change from frame to frame than the truth).
    Both are averaged over the consecutive pairs.
    """
    if len(predictions) < 2:
        return {"temporal_mae": math.nan, "flicker": math.nan}
    pred = [to_display(p, exposure) for p in predictions]
    gt = [to_display(t, exposure) for t in truths]
    mae, flicker = [], []
    for t in range(len(pred) - 1):
        both = (masks[t] > 0) & (masks[t + 1] > 0)
        d_pred, d_gt = pred[t + 1] - pred[t], gt[t + 1] - gt[t]
        mae.append(masked_mean(np.abs(d_pred - d_gt), both))
        flicker.append(masked_mean(np.abs(d_pred), both) - masked_mean(np.abs(d_gt), both))
    return {"temporal_mae": float(np.nanmean(mae)), "flicker": float(np.nanmean(flicker))}
