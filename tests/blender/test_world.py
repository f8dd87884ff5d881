"""World capture: the render path against a direct lookup of the source HDRI, and the fast path."""

import math

import bpy
import numpy as np
import OpenEXR
import pytest
from blender_helpers import read_exr

from addon import dataset, world

pytestmark = pytest.mark.blender
WIDTH = 128
ROTATION = math.radians(40.0)
STRENGTH = 1.7


def log_error(a, b):
    return float(np.abs(np.log1p(a) - np.log1p(b)).mean())


def reference(source, width, rotation, strength):
    """The contract's convention written out: pixel centre -> direction d -> Rz(rotation) d -> texel.

    Nearest texel of the (4x finer) source: the captures sample bilinearly at the same centres.
    """
    height = width // 2
    theta = (np.arange(height) + 0.5) / height * np.pi
    phi = (0.5 - (np.arange(width) + 0.5) / width) * 2 * np.pi
    theta, phi = np.meshgrid(theta, phi, indexing="ij")
    d = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    c, s = math.cos(rotation), math.sin(rotation)
    d = d @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
    u = 0.5 - np.arctan2(d[..., 1], d[..., 0]) / (2 * np.pi)
    v = np.arccos(np.clip(d[..., 2], -1, 1)) / np.pi
    h, w, _ = source.shape
    return source[np.minimum((v * h).astype(int), h - 1), (u * w).astype(int) % w] * strength


def new_env_scene():
    """An empty scene lit by the first bundled HDRI, rotated and scaled."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.world = dataset._hdri_world(dataset.bundled_hdris()[0], ROTATION)
    scene.world.node_tree.nodes["Background"].inputs["Strength"].default_value = STRENGTH
    return scene


@pytest.fixture(scope="module")
def env_scene():
    return new_env_scene()


def test_render_path_matches_source_lookup(tmp_path, env_scene):
    path = world.capture_hdri(env_scene, tmp_path / "render.exr", width=WIDTH, samples=8, fast=False)
    captured = read_exr(path)[""]
    assert captured.shape == (WIDTH // 2, WIDTH, 3)
    channels = OpenEXR.File(str(dataset.bundled_hdris()[0]), separate_channels=True).parts[0].channels
    source = np.stack([channels[c].pixels for c in "RGB"], -1).astype(np.float32)
    expected = reference(source, WIDTH, ROTATION, STRENGTH)
    assert log_error(captured, expected) < 0.03
    # The test can tell orientations apart: a mirrored or rotated-the-other-way world is far off.
    assert log_error(captured[:, ::-1], expected) > 0.15
    assert log_error(captured, reference(source, WIDTH, -ROTATION, STRENGTH)) > 0.15
    assert log_error(captured[::-1], expected) > 0.15


def test_fast_path_agrees_with_render_path(tmp_path, env_scene):
    assert world.fast_lookup(env_scene.world, WIDTH) is not None
    fast = read_exr(world.capture_hdri(env_scene, tmp_path / "fast.exr", width=WIDTH))[""]
    rendered = read_exr(world.capture_hdri(env_scene, tmp_path / "r.exr", width=WIDTH, samples=8, fast=False))[""]
    assert log_error(fast, rendered) < 2e-3
    assert np.abs(fast.mean(axis=(0, 1)) / rendered.mean(axis=(0, 1)) - 1).max() < 1e-2


def test_plain_colour_and_missing_world(tmp_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.world = bpy.data.worlds.new("Plain")
    background = scene.world.node_tree.nodes["Background"]
    background.inputs["Color"].default_value = (0.2, 0.3, 0.4, 1.0)
    background.inputs["Strength"].default_value = 2.0
    assert world.fast_lookup(scene.world, 16) is None
    hdri = read_exr(world.capture_hdri(scene, tmp_path / "plain.exr", width=16, samples=1))[""]
    np.testing.assert_allclose(hdri, np.broadcast_to([0.4, 0.6, 0.8], hdri.shape), rtol=1e-3)
    scene.world = None
    with pytest.raises(world.ExportError, match="no world"):
        world.capture_hdri(scene, tmp_path / "none.exr")


def test_fixture_world_takes_the_fast_path(open_fixture):
    """The packed half-float HDRI behind a Mapping node of spheres.blend is resampled, not rendered."""
    scene = open_fixture("spheres")
    assert world.fast_lookup(scene.world, 16).shape == (8, 16, 3)
    assert world.fast_lookup(open_fixture("suzanne").world, 16) is None  # a Sky Texture


@pytest.mark.parametrize("fast", [True, False])
def test_negative_texels_are_clamped(tmp_path, fast):
    """forest.exr holds ringing below 0; the captured HDRI must pass the backend's validation."""
    forest = next(p for p in dataset.bundled_hdris() if p.stem == "forest")
    channels = OpenEXR.File(str(forest), separate_channels=True).parts[0].channels
    assert min(channels[c].pixels.min() for c in "RGB") < 0
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.world = dataset._hdri_world(forest, 0.0)
    captured = read_exr(world.capture_hdri(scene, tmp_path / "forest.exr", width=256, samples=1, fast=fast))[""]
    assert captured.min() >= 0 and captured.max() > 1


def test_background_is_the_world_a_cycles_render_of_the_camera_shows(tmp_path):
    """render_background (the backdrop behind the neural image) against Cycles rendering the same,
    object-free scene: same camera (lens, shift, pixel aspect) and orientation."""
    scene = new_env_scene()
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.location = (1.0, -2.0, 1.5)
    cam.rotation_euler = (math.radians(80), 0.0, math.radians(30))
    cam.data.lens, cam.data.shift_x = 35.0, 0.15
    scene.camera = cam
    render = scene.render
    render.engine, render.resolution_x, render.resolution_y, render.resolution_percentage = "CYCLES", 48, 32, 100
    render.pixel_aspect_x = 1.5
    render.film_transparent = False
    scene.cycles.samples = 64  # both renders anti-alias a detailed HDRI: enough samples to agree closely
    render.image_settings.file_format = "OPEN_EXR"
    render.filepath = str(tmp_path / "cycles.exr")
    bpy.ops.render.render(write_still=True)
    cycles = read_exr(tmp_path / "cycles.exr")[""][..., :3]
    objects = len(bpy.data.objects)

    background = world.render_background(scene, tmp_path / "background.exr", 48, 32, samples=64)
    assert background.shape == (32, 48, 3)
    assert log_error(background, cycles) < 0.01
    assert log_error(background[:, ::-1], cycles) > 0.05  # the comparison can see a mirrored view
    assert len(bpy.data.objects) == objects and not (tmp_path / "background.capture.exr").exists()
