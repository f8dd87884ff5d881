"""Per-pixel camera rays from the job's matrices (perspective, orthographic and lens shift alike)."""

from __future__ import annotations

import numpy as np

from .jobformat import Camera


def ndc_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """NDC (x, y) at pixel centres, each (H, W); row 0 is the top of the image (y near +1)."""
    x = (np.arange(width) + 0.5) / width * 2 - 1
    y = 1 - (np.arange(height) + 0.5) / height * 2
    return np.meshgrid(x, y)


def _unproject(camera: Camera, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """World-space points at NDC (x, y, z)."""
    clip_to_world = np.linalg.inv(camera.projection @ camera.world_to_camera)
    ndc = np.stack([x, y, np.full_like(x, z), np.ones_like(x)], axis=-1)
    world = ndc @ clip_to_world.T
    return world[..., :3] / world[..., 3:]


def camera_rays(camera: Camera, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(origins, unit directions), each (H, W, 3) in world space, through the pixel centres.

    Origins lie on the near plane; for a perspective camera they all project to its centre.
    """
    x, y = ndc_grid(width, height)
    near = _unproject(camera, x, y, -1.0)
    far = _unproject(camera, x, y, 1.0)
    direction = far - near
    return near, direction / np.linalg.norm(direction, axis=-1, keepdims=True)


def view_directions(camera: Camera, width: int, height: int) -> np.ndarray:
    """wo per pixel: unit vector from the surface towards the camera, (H, W, 3) float32."""
    return (-camera_rays(camera, width, height)[1]).astype(np.float32)


def world_positions(camera: Camera, depth: np.ndarray) -> np.ndarray:
    """World positions from view-axis depth (Cycles' Depth pass), (H, W, 3)."""
    height, width = depth.shape
    origins, directions = camera_rays(camera, width, height)
    camera_to_world = np.linalg.inv(camera.world_to_camera)
    eye = camera_to_world[:3, 3]
    view_axis = -camera_to_world[:3, 2] / np.linalg.norm(camera_to_world[:3, 2])
    # walk each ray back to the camera's plane (view-axis depth 0), then forward to `depth`
    axial = directions @ view_axis
    start = origins - (((origins - eye) @ view_axis) / axial)[..., None] * directions
    return start + (depth / axial)[..., None] * directions
