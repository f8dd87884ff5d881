"""The screen-space visibility of a real exported job against Blender's own ray casting through the scene.

Under an HDRI of twelve small lamps around the horizon over a dim sky (the kind of lighting where a few
directions carry the light), the backend's visibility from the job the add-on exports is compared with the
visibility that `Scene.ray_cast` finds from the same surface points along many directions of the same HDRI:
a sphere on a plane and a ball in the air (the light sets), and an open room whose walls behind the camera
block light (the surround map). Checks the exporter's geometry conventions, the march, the light sampling
and the surround map together.
"""

import math

import bpy
import numpy as np
import pytest
from mathutils import Vector

from addon import compat, gbuffer

pytestmark = pytest.mark.blender
torch = pytest.importorskip("torch")
WIDTH, HEIGHT = 64, 48
REFERENCE_DIRECTIONS = 512


def lamps_hdri(path):
    """A 32 x 64 HDRI: sky 0.05, twelve one-texel lamps of 400 twenty degrees above the horizon."""
    from backend.exrio import write_exr

    image = np.full((32, 64, 3), 0.05, np.float32)
    image[11, ::64 // 12] = 400.0
    write_exr(path, {c: image[..., i] for i, c in enumerate("RGB")})


def lamps_world(hdri_path):
    world = bpy.data.worlds.new("Lamps")
    tree = compat.node_tree(world)
    environment = tree.nodes.new("ShaderNodeTexEnvironment")
    environment.image = bpy.data.images.load(str(hdri_path))
    tree.links.new(environment.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    return world


def build_scene(hdri_path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_plane_add(size=8)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.5, location=(0.0, 0.0, 0.5), segments=48, ring_count=24)
    bpy.ops.object.shade_smooth()
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.3, location=(1.0, 0.6, 1.0), segments=48, ring_count=24)
    bpy.ops.object.shade_smooth()
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.location = (0.6, -4.2, 2.8)
    camera.rotation_euler = (math.radians(58), 0.0, math.radians(6))
    scene.collection.objects.link(camera)
    scene.camera = camera
    scene.world = lamps_world(hdri_path)
    return scene


def open_room(hdri_path):
    """A 4 x 4 m floor walled 2 m high all round, open to the sky, and a camera inside seeing two walls:
    the two behind it block light that nothing on screen shows."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    corners = [(-2, -2), (2, -2), (2, 2), (-2, 2)]
    vertices = [(x, y, z) for z in (0.0, 2.0) for x, y in corners]
    faces = [(0, 1, 2, 3)] + [(i, (i + 1) % 4, (i + 1) % 4 + 4, i + 4) for i in range(4)]
    mesh = bpy.data.meshes.new("Room")
    mesh.from_pydata(vertices, [], faces)
    scene.collection.objects.link(bpy.data.objects.new("Room", mesh))
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.4, location=(0.5, 0.8, 0.4), segments=48, ring_count=24)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.location = (-0.8, -1.2, 1.3)
    camera.rotation_euler = (math.radians(70), 0.0, math.radians(-30))
    scene.collection.objects.link(camera)
    scene.camera = camera
    scene.world = lamps_world(hdri_path)
    return scene


def visibility_errors(scene, folder, variants):
    """Mean |screen-space visibility - ray-cast visibility| over every third foreground pixel of the scene's
    exported job, for each variant(job) -> (directions, weights, job to shade)."""
    from backend.envmap import EnvironmentMap
    from backend.jobformat import load_job
    from backend.renderer import Renderer
    from backend.screenspace import light_directions

    gbuffer.export_job(scene, folder, samples=4, width=WIDTH, height=HEIGHT)
    job = load_job(folder)
    envmap = EnvironmentMap(job.hdri)
    reference = Renderer("cpu").prepare(job).screen_space
    directions, weights = (t[0].numpy() for t in light_directions(envmap, REFERENCE_DIRECTIONS, seed=1, sets=1))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    picked = np.arange(0, len(reference.pixels), 3)
    expected = []
    for index in picked:
        start, normal = reference.starts[index].numpy(), reference.normals[index].numpy()
        light = np.clip(directions @ normal, 0, None) * weights
        free = [not scene.ray_cast(depsgraph, Vector(start.tolist()), Vector(d.tolist()))[0] if w > 0 else True
                for d, w in zip(directions, light, strict=True)]
        expected.append((light * free).sum() / max(light.sum(), 1e-12) if light.sum() > 0 else 1.0)
    expected = np.array(expected)
    errors = []
    for variant in variants:
        light_sets, shaded = variant(job, envmap)
        space = Renderer("cpu").prepare(shaded).screen_space
        visibility = space.visibility(*light_sets)[0, 0].numpy().reshape(-1)[space.pixels.numpy()]
        errors.append(np.abs(visibility[picked] - expected).mean())
    return expected, errors


def test_visibility_matches_blender_ray_casting_under_small_lamps(tmp_path):
    """Light sets that differ between neighbours against one set for all (what the visibility did before)."""
    from backend.screenspace import light_directions

    lamps_hdri(tmp_path / "lamps.exr")
    expected, (pooled, shared) = visibility_errors(build_scene(tmp_path / "lamps.exr"), tmp_path / "job", [
        lambda job, envmap: (light_directions(envmap), job),
        lambda job, envmap: (light_directions(envmap, sets=1), job)])
    assert (expected < 0.8).mean() > 0.1  # the lamps' shadows cover much of the view
    assert pooled < 0.035 and pooled < 0.6 * shared, (pooled, shared)  # measured: 0.016 and 0.052


def test_the_surround_map_shadows_with_the_walls_behind_the_camera(tmp_path):
    """In an open room, the walls behind the camera block much of the lamps' light. The exported job's
    surround map (a depth panorama at the camera) shows them to the march; without it they are lost."""
    from dataclasses import replace

    from backend.screenspace import light_directions

    lamps_hdri(tmp_path / "lamps.exr")
    expected, (with_map, without) = visibility_errors(open_room(tmp_path / "lamps.exr"), tmp_path / "job", [
        lambda job, envmap: (light_directions(envmap), job),
        lambda job, envmap: (light_directions(envmap), replace(job, surround=None))])
    assert 0.2 < expected.mean() < 0.9
    assert with_map < 0.25 and with_map < 0.5 * without, (with_map, without)  # measured: 0.165 and 0.525
