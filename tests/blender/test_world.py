"""World capture: the render path against a direct lookup of the source HDRI, the fast path, and the
energy of the capture plus the extracted suns against Cycles lighting a Lambert plane."""

import math

import bpy
import numpy as np
import OpenEXR
import pytest
from blender_helpers import read_exr

from addon import compat, dataset, world

pytestmark = pytest.mark.blender
WIDTH = 128
ROTATION = math.radians(40.0)
STRENGTH = 1.7


def log_error(a, b):
    return float(np.abs(np.log1p(a) - np.log1p(b)).mean())


def reference(source, width, rotation, strength, sub=4):
    """The contract's convention written out: directions spread evenly over each texel (``sub`` x
    ``sub``) -> Rz(rotation) d -> nearest texel of the (4x finer) source, averaged per texel.

    The captures take the mean of Cycles' bilinear reconstruction over each texel, which this
    approximates independently.
    """
    height = width // 2
    theta = (np.arange(height * sub) + 0.5) / (height * sub) * np.pi
    phi = (0.5 - (np.arange(width * sub) + 0.5) / (width * sub)) * 2 * np.pi
    theta, phi = np.meshgrid(theta, phi, indexing="ij")
    d = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    c, s = math.cos(rotation), math.sin(rotation)
    d = d @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
    u = 0.5 - np.arctan2(d[..., 1], d[..., 0]) / (2 * np.pi)
    v = np.arccos(np.clip(d[..., 2], -1, 1)) / np.pi
    h, w, _ = source.shape
    fine = source[np.minimum((v * h).astype(int), h - 1), (u * w).astype(int) % w] * strength
    return fine.reshape(height, sub, width, sub, 3).mean(axis=(1, 3))


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
    # The render path's box filter samples each texel: 256 samples resolve this HDRI's small sun.
    rendered = read_exr(world.capture_hdri(env_scene, tmp_path / "r.exr", width=WIDTH, samples=256, fast=False))[""]
    assert log_error(fast, rendered) < 2e-3
    assert np.abs(fast.mean(axis=(0, 1)) / rendered.mean(axis=(0, 1)) - 1).max() < 1e-2


def test_plain_colour_and_missing_world(tmp_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.world = bpy.data.worlds.new("Plain")
    background = compat.node_tree(scene.world).nodes["Background"]
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


def sky_scene(**settings):
    """An empty scene lit by a default Sky Texture (Blender's default sun, 0.545 degrees) into a
    Background of strength 0.5, with ``settings`` applied to the sky."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.world = bpy.data.worlds.new("Sky")
    tree = compat.node_tree(scene.world)
    sky = tree.nodes.new("ShaderNodeTexSky")
    for name, value in settings.items():
        setattr(sky, name, value)
    tree.links.new(sky.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    tree.nodes["Background"].inputs["Strength"].default_value = 0.5
    return scene


def cycles_irradiance(scene, tmp_path, samples):
    """RGB irradiance on an upward-facing plane at the origin as Cycles renders it: a white Lambert
    plane seen from above (radiance = E / pi), direct light only, 4 x 4 pixels averaged."""
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    material = bpy.data.materials.new("White")
    tree = compat.node_tree(material)
    tree.nodes.clear()
    diffuse = tree.nodes.new("ShaderNodeBsdfDiffuse")
    diffuse.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    tree.links.new(diffuse.outputs["BSDF"], tree.nodes.new("ShaderNodeOutputMaterial").inputs["Surface"])
    bpy.context.object.data.materials.append(material)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    cam.data.type, cam.data.ortho_scale = "ORTHO", 1.0
    cam.location = (0.0, 0.0, 1.0)
    scene.collection.objects.link(cam)
    scene.camera = cam
    render = scene.render
    render.engine, render.resolution_x, render.resolution_y, render.resolution_percentage = "CYCLES", 4, 4, 100
    render.image_settings.file_format, render.image_settings.color_depth = "OPEN_EXR", "32"
    render.filepath = str(tmp_path / "plane.exr")
    scene.cycles.samples, scene.cycles.max_bounces = samples, 0
    scene.cycles.use_denoising = scene.cycles.use_adaptive_sampling = False
    bpy.ops.render.render(write_still=True)
    radiance = read_exr(tmp_path / "plane.exr")[""][..., :3].astype(np.float64).mean(axis=(0, 1))
    bpy.data.objects.remove(cam)
    bpy.data.objects.remove(bpy.data.objects["Plane"])
    return radiance * np.pi


def hdri_irradiance(hdri, suns=()):
    """RGB irradiance on an upward-facing plane from a captured HDRI (each texel constant over its
    solid angle, the cosine integrated exactly) plus the suns' irradiance x cosine."""
    height, width, _ = hdri.shape
    theta = np.arange(height + 1) / height * np.pi
    cosine_solid_angle = np.diff(np.sin(np.minimum(theta, np.pi / 2)) ** 2) / 2 * (2 * np.pi / width)
    sky = np.einsum("hwc,h->c", hdri.astype(np.float64), cosine_solid_angle)
    return sky + sum(np.array(sun["irradiance"]) * max(sun["direction"][2], 0.0) for sun in suns)


def test_sky_capture_plus_sun_is_the_irradiance_cycles_renders(tmp_path):
    """Default sky and sun: the capture holds the sky alone (~15-50 % of the light: what the point-
    sampled capture gave before), the sun entry the rest; together within 2 % of Cycles."""
    scene = sky_scene()
    expected = cycles_irradiance(scene, tmp_path, samples=64)
    suns = world.world_suns(scene)
    assert [(s["type"], s["angle"]) for s in suns] == [("sun", pytest.approx(math.radians(0.545), rel=1e-3))]
    hdri = read_exr(world.capture_hdri(scene, tmp_path / "sky.exr", width=128))[""]
    assert np.all(hdri_irradiance(hdri) < 0.6 * expected)
    np.testing.assert_allclose(hdri_irradiance(hdri, suns), expected, rtol=0.02)


def test_hdri_hot_spot_keeps_its_energy(tmp_path):
    """One very hot texel (a sun) of a 256 x 128 HDRI, rotated by a fraction of a texel, captured at a
    quarter of its width: both paths keep its energy (Cycles' plane irradiance within 2 %)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    pixels = np.broadcast_to(np.linspace(0.3, 0.05, 128)[:, None, None], (128, 256, 3)).astype(np.float32).copy()
    pixels[30, 77] = (3e4, 2.5e4, 2e4)  # ~43 degrees from the zenith: 90 % of the plane's light
    world.write_exr(pixels, tmp_path / "spot.exr", scene)
    scene.world = dataset._hdri_world(tmp_path / "spot.exr", 0.3)
    expected = cycles_irradiance(scene, tmp_path, samples=64)
    assert world.world_suns(scene) == []
    for fast, samples in ((True, 1), (False, 256)):  # the box filter needs samples to find the spot
        hdri = read_exr(world.capture_hdri(scene, tmp_path / "hdri.exr", width=64, samples=samples, fast=fast))[""]
        np.testing.assert_allclose(hdri_irradiance(hdri), expected, rtol=0.02, err_msg=f"fast={fast}")


def test_sun_direction_measurement_and_restored_disc(tmp_path):
    """A large sun (8 degrees) located and integrated in an equirectangular render with the disc on
    minus off: world_suns' direction (Blender's convention: rotation 0 is +Y, clockwise from above) and
    irradiance agree; capture_hdri renders the disc-off world and leaves the disc on."""
    scene = sky_scene(sky_type=compat.NISHITA_SKY, sun_size=math.radians(8), sun_elevation=math.radians(35),
                      sun_rotation=math.radians(60))
    sky = scene.world.node_tree.nodes["Sky Texture"]
    (sun,) = world.world_suns(scene)
    assert sky.sun_disc
    np.testing.assert_allclose(sun["direction"], [math.cos(math.radians(35)) * math.sin(math.radians(60)),
                                                  math.cos(math.radians(35)) * math.cos(math.radians(60)),
                                                  math.sin(math.radians(35))], atol=1e-6)
    with_disc = world._render_world(scene, tmp_path / "on.exr", 128, 64, 64, world._equirectangular_camera)
    sky.sun_disc = False
    without = world._render_world(scene, tmp_path / "off.exr", 128, 64, 64, world._equirectangular_camera)
    sky.sun_disc = True
    theta = (np.arange(64) + 0.5) / 64 * np.pi
    phi = (0.5 - (np.arange(128) + 0.5) / 128) * 2 * np.pi
    theta, phi = np.meshgrid(theta, phi, indexing="ij")
    d = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    solid_angle = np.diff(-np.cos(np.arange(65) / 64 * np.pi))[:, None] * (2 * np.pi / 128)
    disc = (with_disc - without).astype(np.float64) * solid_angle[..., None]
    centroid = np.einsum("hw,hwk->k", disc.sum(axis=2), d)
    assert np.dot(centroid / np.linalg.norm(centroid), sun["direction"]) > math.cos(math.radians(1))
    cosine = np.maximum(d @ np.array(sun["direction"]), 0)
    np.testing.assert_allclose(np.einsum("hwc,hw->c", disc, cosine), sun["irradiance"], rtol=0.02)

    hdri = read_exr(world.capture_hdri(scene, tmp_path / "sky.exr", width=128, samples=64))[""]
    assert sky.sun_disc
    np.testing.assert_allclose(hdri, without, rtol=1e-4, atol=1e-6)

    sky.sky_type = "PREETHAM"  # no disc in Cycles' Preetham and Hosek-Wilkie models
    assert world.world_suns(scene) == []
    sky.sky_type, sky.sun_disc = compat.NISHITA_SKY, False
    assert world.world_suns(scene) == []
