"""Anti-aliased edges from the G-buffer's coverage layer.

The G-buffer is point-sampled at pixel centres (exact surface data, but a binary mask), while Cycles
averages each pixel over its filter footprint: an edge pixel is partly object and partly what lies
behind. With the coverage layer (the fraction of the footprint the objects cover, rendered through the
scene's own pixel filter) the shaded image becomes a premultiplied one whose alpha is that coverage:
over the world behind it, it blends like Cycles' edges. Pixels whose centre missed the objects while
their footprint did not take the mean shading of their foreground neighbours (3x3); coverage with no
foreground neighbour at all (sub-pixel geometry between samples) has no shading to show and is dropped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .camera import camera_rays
from .envmap import EnvironmentMap
from .jobformat import GBuffer, Job


def footprint(gbuffer: GBuffer) -> np.ndarray:
    """(H, W) > 0 where a pixel shows some object: its mask or, where the G-buffer has one, its coverage."""
    return gbuffer.mask if gbuffer.coverage is None else np.maximum(gbuffer.mask, gbuffer.coverage)


def antialiased(images: list[torch.Tensor], foreground: torch.Tensor,
                coverage: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(H, W, 3) images shaded on the ``foreground`` (H, W) bool, and the coverage (H, W) in [0, 1]:
    the images premultiplied by the returned alpha (H, W), edge pixels outside the foreground filled."""
    weight = foreground.to(images[0].dtype)
    box = torch.ones(1, 1, 3, 3, dtype=weight.dtype, device=weight.device)
    count = F.conv2d(weight[None, None], box, padding=1)[0, 0]
    alpha = torch.where(count > 0, coverage.clamp(0, 1), 0)
    out = []
    for image in images:
        planar = (image * weight[..., None]).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
        mean = F.conv2d(planar, box, padding=1)[:, 0].permute(1, 2, 0) / count.clamp(min=1)[..., None]
        out.append(torch.where(foreground[..., None], image, mean) * alpha[..., None])
    return out, alpha


def world_background(job: Job) -> np.ndarray:
    """The job's HDRI seen through its camera, (H, W, 3): what an opaque film shows behind the objects,
    at the HDRI's resolution (the add-on takes the sharper Environment pass of its G-buffer render)."""
    directions = camera_rays(job.camera, job.width, job.height)[1]
    radiance = EnvironmentMap(job.hdri).lookup(torch.from_numpy(np.ascontiguousarray(directions, np.float32)))
    return radiance.numpy()


def over_background(premultiplied: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """A premultiplied image (H, W, 3) with its alpha (H, W) over an opaque ``background``."""
    return premultiplied + (1 - alpha[..., None]) * background
