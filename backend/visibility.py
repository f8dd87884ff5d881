"""Screen-space light visibility: the fraction of the HDRI's direct light that reaches each pixel.

The shadow estimator sees only images; from the unshadowed shading alone it cannot tell where a cast
shadow falls (that depends on where the light comes from and what stands in its way). This module
gives it that as a physical input. A few light directions are importance-sampled from the HDRI's
luminance (shared by all pixels); from each pixel's world position a short ray is marched towards
each of them through the depth buffer, as screen-space shadows are in real-time renderers: a step
that lands behind a foreground surface (within a thickness) is blocked. The input is then

    visibility = sum_k w_k cos_k V_k / sum_k w_k cos_k,   w_k = luminance(L(d_k)) / pdf(d_k),

the visible share of the pixel's cosine-weighted direct light, 1 where nothing blocks. What the
camera does not see (off-screen occluders, the backs of objects) cannot block: the network corrects
what it can. Lengths scale with the median foreground depth, so the feature does not depend on the
scene's units. To keep the march affordable (it depends on the lighting, so a relight cannot cache it),
one foreground pixel per BLOCK x BLOCK block marches and the block shares which lights it found blocked;
each pixel keeps its own cosine weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .envmap import EnvironmentMap, luminance
from .jobformat import Camera
from .sampling import make_rays

LIGHTS = 32  # light directions per image
STEPS = 8  # march steps per direction
REACH = 0.5  # march length, x median foreground depth
THICKNESS = 0.1  # a surface blocks points up to this far behind it, x median foreground depth
OFFSET = 0.005  # start this far off the surface along its normal, x the pixel's depth
BLOCK = 2  # one pixel per BLOCK x BLOCK block marches (4x fewer marches)
CHUNK = 1024  # marching pixels at a time (small chunks stay in cache: ~2x faster than 32k on this CPU)


def light_directions(envmap: EnvironmentMap, count: int = LIGHTS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (K, 3), weights (K,)): importance samples of the HDRI's luminance and their luminance / pdf."""
    rays = make_rays("importance", count, seed, envmap=envmap, device=envmap.device)
    directions = rays.directions.reshape(-1, 3)
    return directions, luminance(envmap.lookup(directions)) / rays.pdf.reshape(-1).clamp(min=1e-12)


def screen_space_visibility(position: torch.Tensor, normal: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor,
                            camera: Camera, directions: torch.Tensor, weights: torch.Tensor,
                            steps: int = STEPS, chunk: int = CHUNK, block: int = BLOCK) -> torch.Tensor:
    """Visibility (1, 1, H, W) in [0, 1] from world positions and normals (1, 3, H, W), view-axis depth and
    mask (1, 1, H, W); 1 on the background. Marching pixels go `chunk` at a time (memory: 4 x chunk x K x steps
    floats)."""
    device = position.device
    height, width = depth.shape[-2:]
    foreground = mask[0, 0] > 0
    fg = foreground.flatten()
    scale = depth[0, 0][foreground].median() if foreground.any() else depth.new_tensor(1.0)
    normals = normal[0].flatten(1).T[fg]  # (P, 3)
    # The marching pixel of each block: its first foreground pixel; `marcher[i]`: the one pixel i follows.
    rows, cols = torch.nonzero(foreground, as_tuple=True)
    block_of = (rows // block) * -(-width // block) + cols // block
    blocks, marcher = torch.unique(block_of, return_inverse=True)
    first = torch.full((len(blocks),), len(rows), device=device).scatter_reduce_(
        0, marcher, torch.arange(len(rows), device=device), "amin")
    march_pixels = fg.nonzero()[first, 0]
    start = (position[0].flatten(1).T[march_pixels]
             + normal[0].flatten(1).T[march_pixels] * (OFFSET * depth[0, 0].flatten()[march_pixels])[:, None])
    # Background and a one-pixel border beyond the image are infinitely far: a march step that leaves
    # the image (or goes behind the camera: its coordinates clamp onto the border) is never blocked.
    depth_map = F.pad(torch.where(foreground, depth[0, 0], torch.inf), (1, 1, 1, 1), value=torch.inf).flatten()
    # Homogeneous transforms are linear: clip(start + t d) = clip(start) + t clip(d, w=0); the same for
    # the view-axis depth (the camera looks down its -Z). Rows: clip x, clip y, clip w, view depth.
    world_to_camera = torch.as_tensor(camera.world_to_camera, dtype=torch.float32, device=device)
    to_screen = torch.stack([*(torch.as_tensor(camera.projection, dtype=torch.float32, device=device)
                               @ world_to_camera)[[0, 1, 3]], -world_to_camera[2]])  # (4, 4)
    distances = REACH * scale * ((torch.arange(steps, device=device) + 1) / steps) ** 2  # denser near the surface
    along = ((directions @ to_screen[:, :3].T).T[:, :, None] * distances)[:, None]  # (4, 1, K, S): the march
    free = torch.empty(len(start), len(directions), dtype=torch.bool, device=device)  # (M, K): nothing blocks
    for lo in range(0, len(start), chunk):
        hi = min(lo + chunk, len(start))
        x, y, w, view_depth = (to_screen[:, :3] @ start[lo:hi].T + to_screen[:, 3:])[:, :, None, None] + along
        w = w.clamp_(min=1e-8)
        col = x.div_(w).add_(1).mul_(width / 2).floor_().clamp_(-1, width).add_(1)  # in the padded map
        row = y.div_(w).neg_().add_(1).mul_(height / 2).floor_().clamp_(-1, height).add_(1)
        behind = view_depth - depth_map[row.mul_(width + 2).add_(col).long()]
        free[lo:hi] = ~((behind > 0.01 * view_depth) & (behind < THICKNESS * scale)).any(-1)
    light = (normals @ directions.T).clamp(min=0) * weights  # (P, K): cosine-weighted direct light
    total = light.sum(-1)
    share = torch.where(total > 0, (light * free[marcher]).sum(-1) / total.clamp(min=1e-12), 1.0)
    out = torch.ones(height * width, device=device)
    out[fg] = share
    return out.view(1, 1, height, width)
