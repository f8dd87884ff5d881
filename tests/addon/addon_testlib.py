"""Helpers for the add-on tests (imported by name: tests/addon is on sys.path under pytest)."""

import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import OpenEXR

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = sys.executable

SCENE_SCRIPT = """
import sys, math, bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.render.resolution_x = scene.render.resolution_y = 32
scene.frame_start, scene.frame_end = 1, 2
bpy.ops.mesh.primitive_uv_sphere_add(radius=0.5, location=(0, 0, 0.5))
sphere = bpy.context.object
sphere.location.x = 0.0
sphere.keyframe_insert("location", frame=1)
sphere.location.x = 0.3
sphere.keyframe_insert("location", frame=2)
bpy.ops.mesh.primitive_plane_add(size=4)
for obj, colour in ((sphere, (0.8, 0.2, 0.1, 1)), (bpy.context.object, (0.6, 0.6, 0.6, 1))):
    mat = bpy.data.materials.new(obj.name)
    mat.use_nodes = True
    mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = colour
    obj.data.materials.append(mat)
cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
scene.collection.objects.link(cam)
cam.location = (3, -3, 2.5)
cam.rotation_euler = (math.radians(60), 0, math.radians(45))
scene.camera = cam
world = bpy.data.worlds.new("World")
world.use_nodes = True
env = world.node_tree.nodes.new("ShaderNodeTexEnvironment")
env.image = bpy.data.images.load(
    bpy.utils.system_resource("DATAFILES", path="studiolights/world") + "/city.exr")
world.node_tree.links.new(env.outputs["Color"], world.node_tree.nodes["Background"].inputs["Color"])
scene.world = world
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])
"""


def run_python(code, *args, env=None, timeout=180, check=True):
    """Run `code` in a fresh interpreter (bpy state is per process), from the repository root."""
    proc = subprocess.run([PYTHON, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def read_exr_parts(path):
    """{'<pass>.<channel>': array} over every part of a (multi-part) EXR, view layer prefix dropped."""
    out = {}
    with OpenEXR.File(str(path), separate_channels=True) as f:
        for part in f.parts:
            for name, channel in part.channels.items():
                out[name.removeprefix("ViewLayer.")] = channel.pixels
    return out
