"""Screen-space light visibility (the shadow net's physical input) against analytic ray-sphere shadows."""

import math

import numpy as np
import pytest
import torch

from backend.envmap import EnvironmentMap
from backend.models import build_shadow
from backend.renderer import PreparedGBuffer
from backend.shadow import ShadowNet
from backend.synthetic import Plane, demo_scene_job, trace
from backend.visibility import light_directions, screen_space_visibility

HEIGHT = 64
SPHERES = [((-1.1, 0.0, 0.5), 0.5), ((0.0, 0.4, 0.5), 0.5), ((1.1, 0.0, 0.5), 0.5)]  # demo_scene_job's


def sun_hdri(row, col, sky=0.01, sun=2000.0):
    """A dim sky and a 2x2-texel sun whose block's corner is at (row, col); returns (hdri, sun direction)."""
    hdri = np.full((HEIGHT, 2 * HEIGHT, 3), sky, np.float32)
    hdri[row:row + 2, col:col + 2] = sun
    theta, phi = (row + 1) / HEIGHT * math.pi, (0.5 - (col + 1) / (2 * HEIGHT)) * 2 * math.pi  # the contract's
    return hdri, np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])


def analytic_shadow(position, normal, direction):
    """Whether a ray from each point towards `direction` hits one of the spheres."""
    blocked = np.zeros(position.shape[:2], bool)
    start = position + 1e-3 * normal
    for centre, radius in SPHERES:
        offset = start - np.array(centre)
        b = offset @ direction
        disc = b * b - ((offset * offset).sum(-1) - radius**2)
        blocked |= (disc > 0) & (-b - np.sqrt(np.maximum(disc, 0)) > 0)
    return blocked


@pytest.mark.parametrize("row, col", [(16, 40), (26, 80)])  # sun behind the spheres; low, front right
def test_cast_shadows_match_ray_traced_ones_on_the_ground(row, col):
    hdri, sun = sun_hdri(row, col)
    job = demo_scene_job(128, 96, hdri=hdri)
    gbuffer = job.gbuffer
    visibility = PreparedGBuffer.build(gbuffer, job.camera, "cpu").visibility(EnvironmentMap(hdri))[0, 0].numpy()
    ground = (gbuffer.mask > 0) & (gbuffer.normal[..., 2] > 0.99) & (gbuffer.normal @ sun > 0)
    expected = analytic_shadow(gbuffer.position, gbuffer.normal, sun)[ground]
    assert 0.05 < expected.mean() < 0.6  # the case has shadows on screen, and lit ground
    assert ((visibility[ground] < 0.5) == expected).mean() > 0.93
    assert visibility[gbuffer.mask == 0].min() == 1.0


def test_nothing_blocks_an_empty_ground_and_depth_alone_gives_the_same():
    hdri, _ = sun_hdri(20, 60)
    job = demo_scene_job(64, 48, hdri=hdri)
    envmap = EnvironmentMap(hdri)
    ground = trace(job.camera, 64, 48, [Plane(0.0, 2.5)])
    assert PreparedGBuffer.build(ground, job.camera, "cpu").visibility(envmap).min() == 1.0
    with_position = PreparedGBuffer.build(job.gbuffer, job.camera, "cpu").visibility(envmap)
    job.gbuffer.position = None  # reconstructed from the depth and the camera instead
    from_depth = PreparedGBuffer.build(job.gbuffer, job.camera, "cpu").visibility(envmap)
    assert with_position.min() < 0.5 and (with_position - from_depth).abs().mean() < 0.01


def test_a_rotated_hdri_casts_the_shadows_of_rotating_the_map():
    """Relights pass a rotation instead of a rotated map: the shadows must move the same way."""
    hdri, _ = sun_hdri(26, 80)
    job = demo_scene_job(128, 96, hdri=hdri)
    prepared = PreparedGBuffer.build(job.gbuffer, job.camera, "cpu")
    envmap = EnvironmentMap(hdri)
    angle = 2 * math.pi * 24 / hdri.shape[1]  # a whole number of texels: the rotated map is exact
    by_rotation = prepared.visibility(envmap, angle)
    of_rotated_map = prepared.visibility(envmap.rotated(angle))
    assert (by_rotation < 0.5).float().mean() > 0.02  # the rotated sun still casts shadows on screen
    assert ((by_rotation < 0.5) == (of_rotated_map < 0.5)).float().mean() > 0.99
    assert ((by_rotation < 0.5) != (prepared.visibility(envmap) < 0.5)).float().mean() > 0.02  # and they moved


def test_marching_one_pixel_per_block_agrees_with_marching_every_pixel():
    hdri, _ = sun_hdri(26, 80)
    job = demo_scene_job(128, 96, hdri=hdri)
    images = PreparedGBuffer.build(job.gbuffer, job.camera, "cpu").images
    directions, weights = light_directions(EnvironmentMap(hdri))
    inputs = (images["position"], images["normal"], images["depth"], images["mask"], job.camera, directions, weights)
    every, shared = screen_space_visibility(*inputs, block=1), screen_space_visibility(*inputs, block=2)
    assert (every < 0.5).float().mean() > 0.02  # there are shadows to agree on (3% of the frame)
    assert ((every < 0.5) == (shared < 0.5)).float().mean() > 0.97 and (every - shared).abs().mean() < 0.02


def test_the_shadow_net_checks_its_visibility_input():
    images = [torch.rand(1, c, 16, 16) for c in (3, 3, 3, 1, 1, 1)]
    with pytest.raises(ValueError, match="needs a visibility input"):
        ShadowNet(visibility=True)(*images)
    with pytest.raises(ValueError, match="takes no visibility input"):
        ShadowNet()(*images, torch.ones(1, 1, 16, 16))
    # checkpoints written before the input existed have no "visibility" key: they load without it
    assert build_shadow({"arch": "unet", "base": 8, "depth": 2, "indirect": True}).visibility is False
