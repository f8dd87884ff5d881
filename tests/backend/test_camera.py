"""Round trips for the camera convention: world point -> pixel -> ray -> the same world point."""

import numpy as np
import pytest

from backend.camera import camera_rays, view_directions, world_positions
from backend.jobformat import Camera
from backend.synthetic import Material, Plane, Sphere, look_at, orthographic, perspective, trace

W, H = 40, 30


def project(camera: Camera, point) -> tuple[float, float]:
    """(row, column) in pixels of a world point, with the contract's NDC convention."""
    clip = camera.projection @ camera.world_to_camera @ np.append(point, 1.0)
    x, y = clip[:2] / clip[3]
    return (1 - y) / 2 * H - 0.5, (x + 1) / 2 * W - 0.5


CAMERAS = {
    "perspective": Camera(look_at((1.0, -5.0, 2.0), (0.0, 0.0, 0.5)), perspective(40.0, W / H)),
    "lens shift": Camera(look_at((1.0, -5.0, 2.0), (0.0, 0.0, 0.5)), perspective(40.0, W / H, shift=(0.3, -0.2))),
    "orthographic": Camera(look_at((1.0, -5.0, 2.0), (0.0, 0.0, 0.5)), orthographic(2.0, W / H)),
}


@pytest.mark.parametrize("name", CAMERAS)
def test_pixel_ray_round_trip(name):
    camera = CAMERAS[name]
    origins, directions = camera_rays(camera, W, H)
    for row, col in [(0, 0), (H - 1, W - 1), (7, 23), (H // 2, W // 2)]:
        point = origins[row, col] + 3.7 * directions[row, col]
        np.testing.assert_allclose(project(camera, point), (row, col), atol=1e-6)


@pytest.mark.parametrize("name", CAMERAS)
def test_depth_to_position_round_trip(name):
    camera = CAMERAS[name]
    gbuffer = trace(camera, W, H, [Plane(0.0, 3.0, Material()), Sphere((0.0, 0.0, 0.5), 0.5)])
    positions = world_positions(camera, gbuffer.depth)
    fg = gbuffer.foreground
    np.testing.assert_allclose(positions[fg], gbuffer.position[fg], atol=1e-4)


def test_view_direction_points_to_camera():
    camera = CAMERAS["perspective"]
    wo = view_directions(camera, W, H)
    eye = np.linalg.inv(camera.world_to_camera)[:3, 3]
    gbuffer = trace(camera, W, H, [Plane(0.0, 3.0, Material())])
    fg = gbuffer.foreground
    expected = eye - gbuffer.position[fg]
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(wo[fg], expected, atol=1e-5)


def test_top_row_is_up():
    """Row 0 is the top of the image: a point above the target lands in a lower row number."""
    camera = CAMERAS["perspective"]
    high, low = project(camera, (0, 0, 1.5)), project(camera, (0, 0, -0.5))
    assert high[0] < low[0]
