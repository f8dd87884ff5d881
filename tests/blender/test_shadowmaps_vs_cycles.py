"""render_shadow_maps on a real scene (a sphere over a plane, lit by a sun or a point light): the maps'
depths where the geometry is, and the backend's shadow from them against Cycles' own shadow."""

import math

import bpy
import numpy as np
import pytest
from blender_helpers import dump_diff, read_exr

from addon import compat, scene_state, shadowmaps

pytestmark = pytest.mark.blender
torch = pytest.importorskip("torch")
CENTRE, RADIUS = np.array([0.0, 0.0, 1.0]), 0.5
LAMP = np.array([0.8, 0.3, 2.6])
SUN = np.array([math.sin(math.radians(30)), 0.0, math.cos(math.radians(30))])  # 30 degrees from the zenith
SIZE = 64  # the camera's image
LIGHTS = [{"type": "sun", "name": "Sun", "direction": SUN.tolist(), "irradiance": [3.0] * 3, "angle": 0.0},
          {"type": "point", "name": "Lamp", "position": LAMP.tolist(), "intensity": [10.0] * 3, "radius": 0.0},
          {"type": "spot", "name": "Spot", "position": LAMP.tolist(), "intensity": [10.0] * 3, "radius": 0.0,
           "direction": [0.0, 0.0, -1.0], "spot_size": math.radians(100), "spot_blend": 0.0}]


def build_scene():
    """Plane (6 m) + smooth sphere, a camera seeing the sphere's shadow, one light object per entry."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.world = None  # black: the lights alone
    bpy.ops.mesh.primitive_plane_add(size=6)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=RADIUS, location=tuple(CENTRE), segments=64, ring_count=32)
    bpy.ops.object.shade_smooth()
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.location = (-0.4, -3.0, 3.2)
    camera.rotation_euler = (math.radians(45), 0.0, 0.0)
    scene.collection.objects.link(camera)
    scene.camera = camera
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.rotation_euler = (0.0, math.radians(30), 0.0)  # +Z (towards the sun) tilted to +X
    sun.data.angle = 0.0
    lamp = bpy.data.objects.new("Lamp", bpy.data.lights.new("Lamp", "POINT"))
    lamp.location = tuple(LAMP)
    lamp.data.shadow_soft_size = 0.0
    lamp.data.energy = 500.0
    for light in (sun, lamp):
        scene.collection.objects.link(light)
    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x = render.resolution_y = SIZE
    scene.cycles.samples = 4
    scene.cycles.max_bounces = 0
    scene.cycles.filter_width = 0.01
    scene.view_layers[0].update()
    return scene


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    scene = build_scene()
    out = tmp_path_factory.mktemp("shadowmaps")
    before = scene_state.property_dump(scene)
    lights = [dict(light) for light in LIGHTS]
    shadowmaps.render_shadow_maps(scene, lights, out, size=256)
    assert dump_diff(before, scene_state.property_dump(scene)) == []  # the scene is as it was
    return scene, out, lights


def load(out, light):
    from backend.exrio import read_exr as read_backend_exr
    from backend.shadowmaps import parse_shadow

    return parse_shadow(light["shadow"], light["type"], light["name"], lambda name: read_backend_exr(out / name)[0])


def map_depth(shadow, point):
    """The map's depth at the texel a world point projects to, and the depth the point has in it."""
    from backend.shadowmaps import _project

    height, width = shadow.depth.shape
    x, y, depth = _project(shadow, torch.tensor(np.array([point]), dtype=torch.float32), height, width)[:3]
    return shadow.depth[int(y), int(x)], float(depth)


def test_maps_hold_the_geometry(maps):
    _, out, lights = maps
    sun, lamp, spot = (load(out, light) for light in lights)
    assert (sun.projection, lamp.projection, spot.projection) == ("orthographic", "equirectangular", "perspective")
    assert sun.depth.shape == spot.depth.shape == (256, 256) and lamp.depth.shape == (256, 512)
    texel = 2 / (sun.matrix[0, 0] * 256)
    top = CENTRE + RADIUS * SUN  # the sphere's point nearest the sun
    found, expected = map_depth(sun, top)
    assert abs(found - expected) < texel
    found, expected = map_depth(sun, [2.5, -2.5, 0.0])
    assert abs(found - expected) < texel * math.tan(math.radians(30)) + 1e-4
    nearest = CENTRE + RADIUS * (LAMP - CENTRE) / np.linalg.norm(LAMP - CENTRE)
    found, expected = map_depth(lamp, nearest)  # the ray length from the light: Cycles' panoramic Depth pass
    assert abs(expected - (np.linalg.norm(LAMP - CENTRE) - RADIUS)) < 1e-4
    assert abs(found - expected) < expected * math.pi / 256
    found, expected = map_depth(lamp, [-2.5, 2.5, 0.0])
    assert abs(found - expected) < 0.02 * expected
    found, expected = map_depth(spot, nearest)  # the view-axis depth
    assert abs(expected - (LAMP - nearest)[2]) < 1e-4
    assert abs(found - expected) < 0.01 * expected


def cycles_render(scene, path, passes=False):
    layer = scene.view_layers[0]
    layer.use_pass_position = layer.use_pass_normal = passes
    settings = scene.render.image_settings
    compat.set_file_format(settings, "OPEN_EXR_MULTILAYER")
    settings.color_depth = "32"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return {name.split(".")[-1]: value for name, value in read_exr(path).items()}


@pytest.mark.parametrize("index", [0, 1], ids=["sun", "point"])
def test_shadow_matches_cycles(maps, tmp_path, index):
    """Shadowed plane pixels by the backend (visibility < 0.5) and by Cycles (darker than half of the
    same pixel rendered with the sphere casting no shadow): IoU >= 0.8."""
    from backend.shadowmaps import visibility

    scene, out, lights = maps
    for light in scene.objects:
        if light.type == "LIGHT":
            light.hide_render = light.name != lights[index]["name"]
    sphere = scene.objects["Sphere"]
    sphere.visible_shadow = True
    shaded = cycles_render(scene, tmp_path / "shaded.exr", passes=True)
    sphere.visible_shadow = False
    unshadowed = cycles_render(scene, tmp_path / "unshadowed.exr")["Combined"][..., 0]
    plane = (shaded["Normal"][..., 2] > 0.99) & (unshadowed > 0)
    cycles = shaded["Combined"][..., 0][plane] < 0.5 * unshadowed[plane]
    positions = torch.as_tensor(shaded["Position"][plane])
    normals = torch.as_tensor(shaded["Normal"][plane])
    ours = visibility(load(out, lights[index]), positions, normals).numpy() < 0.5
    assert 0.05 < cycles.mean() < 0.5  # the shadow is in view, and lit plane around it
    assert (ours & cycles).sum() / (ours | cycles).sum() >= 0.8
