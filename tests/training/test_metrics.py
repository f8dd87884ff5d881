"""Metrics: known values, the foreground mask, the temporal scores."""

import math

import numpy as np
import pytest

from training import metrics


def _image(seed=0, size=48):
    return np.random.default_rng(seed).uniform(0.0, 0.8, (size, size, 3)).astype(np.float32)


def test_identical_images():
    image, mask = _image(), np.ones((48, 48))
    scores, error = metrics.compare(image, image, mask)
    for region in ("fg", "full"):
        assert scores[f"psnr_{region}"] == 100.0 and scores[f"psnr_lin_{region}"] == 100.0  # the documented cap
        assert scores[f"ssim_{region}"] == pytest.approx(1.0, abs=1e-12)
        assert scores[f"flip_{region}"] == 0.0 and scores[f"mse_{region}"] == 0.0
    assert error.shape == (48, 48) and not error.any()


def test_known_psnr():
    mask = np.ones((16, 16))
    truth = np.full((16, 16, 3), 0.3, np.float32)
    assert metrics.compare(truth + 0.01, truth, mask)[0]["psnr_lin_fg"] == pytest.approx(40.0, abs=1e-3)
    # below 0.0031308 the sRGB curve is 12.92 x, so this is an offset of exactly 0.01 in display space
    truth = np.full((16, 16, 3), 0.001, np.float32)
    scores, _ = metrics.compare(truth + 0.01 / 12.92, truth, mask)
    assert scores["psnr_fg"] == pytest.approx(40.0, abs=1e-3) and scores["mse_fg"] == pytest.approx(1e-4, rel=1e-3)


def test_display_space_clips_at_exposure():
    assert metrics.to_display(np.array([0.0, 1.0, 5.0])).tolist() == [0.0, 1.0, 1.0]
    scores, _ = metrics.compare(np.full((8, 8, 3), 2.0), np.full((8, 8, 3), 1.0), np.ones((8, 8)))
    assert scores["psnr_fg"] == 100.0 and scores["psnr_lin_fg"] == pytest.approx(0.0)  # only the linear PSNR sees it


def test_ssim_of_constant_images():
    """Without variance SSIM is the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)."""
    c1 = 0.01**2
    value = metrics.ssim_map(np.full((20, 20, 3), 0.5), np.full((20, 20, 3), 0.6))
    assert np.allclose(value, (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1))


def test_ssim_and_flip_fall_with_noise():
    image = _image()
    noisy = image + np.random.default_rng(1).normal(0, 0.05, image.shape).astype(np.float32)
    little, _ = metrics.compare(image + 0.2 * (noisy - image), image, np.ones((48, 48)))
    much, _ = metrics.compare(noisy, image, np.ones((48, 48)))
    assert 1 > little["ssim_fg"] > much["ssim_fg"] > 0
    assert 0 < little["flip_fg"] < much["flip_fg"] < 1 and much["psnr_fg"] < little["psnr_fg"]


def test_foreground_mask():
    truth = _image(size=64)
    mask = np.zeros((64, 64))
    mask[:16, :16] = 1
    background_off = truth.copy()
    background_off[40:, 40:] += 0.3  # far from the foreground: outside SSIM's window and FLIP's filters
    scores, _ = metrics.compare(background_off, truth, mask)
    assert scores["psnr_fg"] == 100.0 and scores["mse_fg"] == 0.0
    assert scores["ssim_fg"] == pytest.approx(1.0) and scores["flip_fg"] == pytest.approx(0.0, abs=1e-6)
    assert scores["psnr_full"] < 40 and scores["ssim_full"] < 1 and scores["flip_full"] > 0
    foreground_off = truth.copy()
    foreground_off[:16, :16] += 0.05
    scores, _ = metrics.compare(foreground_off, truth, mask)
    assert scores["mse_fg"] == pytest.approx(16 * scores["mse_full"], rel=1e-4)  # 1/16 of the frame differs
    assert math.isnan(metrics.compare(truth, truth, np.zeros((64, 64)))[0]["psnr_fg"])


def test_temporal_scores():
    frames = [np.full((8, 8, 3), 0.2 + 0.05 * t, np.float32) for t in range(4)]
    masks = [np.ones((8, 8))] * 4
    assert metrics.temporal_scores(frames, frames, masks) == {"temporal_mae": 0.0, "flicker": 0.0}
    static = [frames[0]] * 4
    scores = metrics.temporal_scores(frames, static, masks)  # the prediction changes, the truth does not
    assert scores["flicker"] > 0 and scores["temporal_mae"] == pytest.approx(scores["flicker"])
    assert metrics.temporal_scores(static, frames, masks)["flicker"] < 0
    assert math.isnan(metrics.temporal_scores(frames[:1], frames[:1], masks[:1])["flicker"])
