"""Write the small test scenes spheres.blend and suzanne.blend beside this script.

Run: .venv/bin/python blend_fixtures/make_fixtures.py  (needs the bpy wheel; deterministic). The
committed files come from bpy 5.0.1; older Blenders cannot read them faithfully, so tests/blender
makes its own copies with ``make(folder)`` there (blender_helpers.fixture).
The spheres world uses a 256x128 box-downsampled copy of the bpy wheel's CC0 `courtyard.exr`
studio light, packed into the .blend so that it opens the same on any machine.
"""

import math
import os
import sys
import tempfile
from pathlib import Path

import bpy
import numpy as np
from mathutils import Vector

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from addon import compat  # noqa: E402  (bpy only: the version differences)

HDRI = "courtyard.exr"

# name: (location, radius, base colour, metallic, roughness); used by tests/blender as ground truth.
SPHERES = {
    "RedRough": ((-1.2, 0.0, 0.5), 0.5, (0.8, 0.05, 0.05), 0.0, 0.8),
    "GoldMetal": ((0.0, 0.0, 0.5), 0.5, (1.0, 0.766, 0.336), 1.0, 0.25),
    "BlueGlossy": ((1.2, 0.0, 0.5), 0.5, (0.05, 0.1, 0.8), 0.0, 0.1),
}
CAMERA = ((0.0, -5.0, 2.0), (0.0, 0.0, 0.4))


def reset():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x = scene.render.resolution_y = 256
    scene.cycles.samples = 64
    return scene


def add_camera(scene, location, target):
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    cam.location = location
    cam.rotation_euler = (Vector(target) - Vector(location)).to_track_quat("-Z", "Y").to_euler()
    scene.collection.objects.link(cam)
    scene.camera = cam


def principled(name, base, metallic, roughness):
    mat = bpy.data.materials.new(name)
    bsdf = compat.node_tree(mat).nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*base, 1.0)
    bsdf.inputs["Metallic"].default_value = metallic
    bsdf.inputs["Roughness"].default_value = roughness
    return mat


def add_mesh(op, name, material, smooth=True, **kwargs):
    op(**kwargs)
    ob = bpy.context.object
    ob.name = name
    ob.data.materials.append(material)
    if smooth:
        ob.data.shade_smooth()
    return ob


def packed_hdri():
    """A packed 256x128 box-downsampled copy of the bundled HDRI."""
    source = bpy.data.images.load(os.path.join(
        bpy.utils.system_resource("DATAFILES", path="studiolights/world"), HDRI))
    w, h = source.size
    pixels = np.empty(w * h * 4, np.float32)
    source.pixels.foreach_get(pixels)
    small = pixels.reshape(128, h // 128, 256, w // 256, 4).mean(axis=(1, 3))
    bpy.data.images.remove(source)
    image = bpy.data.images.new("courtyard_256", 256, 128, float_buffer=True)
    image.pixels.foreach_set(small.ravel())
    settings = bpy.context.scene.render.image_settings
    compat.set_file_format(settings, "OPEN_EXR")
    settings.color_mode = "RGB"
    settings.color_depth = "16"
    settings.exr_codec = "ZIP"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "courtyard_256.exr")
        image.save_render(path)
        bpy.data.images.remove(image)
        image = bpy.data.images.load(path)
        image.pack()
    image.name = "courtyard_256.exr"
    image.filepath_raw = "//courtyard_256.exr"
    image.colorspace_settings.name = "Linear Rec.709"
    return image


def make_spheres(folder):
    scene = reset()
    for name, (location, radius, base, metallic, roughness) in SPHERES.items():
        add_mesh(bpy.ops.mesh.primitive_uv_sphere_add, name, principled(name, base, metallic, roughness),
                 segments=64, ring_count=32, radius=radius, location=location)
    add_mesh(bpy.ops.mesh.primitive_plane_add, "Ground", principled("Ground", (0.5, 0.5, 0.5), 0.0, 0.6),
             smooth=False, size=8.0)
    add_camera(scene, *CAMERA)
    world = bpy.data.worlds.new("Courtyard")
    scene.world = world
    tree = compat.node_tree(world)
    env = tree.nodes.new("ShaderNodeTexEnvironment")
    env.image = packed_hdri()
    mapping = tree.nodes.new("ShaderNodeMapping")
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, math.radians(30.0))
    coords = tree.nodes.new("ShaderNodeTexCoord")
    tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    tree.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
    tree.links.new(env.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    save(folder / "spheres.blend")


def make_suzanne(folder):
    scene = reset()
    skin = principled("Noise", (0.5, 0.5, 0.5), 0.0, 0.4)
    tree = skin.node_tree
    noise = tree.nodes.new("ShaderNodeTexNoise")
    noise.inputs["Scale"].default_value = 6.0
    ramp = tree.nodes.new("ShaderNodeValToRGB")
    ramp.color_ramp.elements[0].color = (0.1, 0.3, 0.05, 1.0)
    ramp.color_ramp.elements[1].color = (0.9, 0.7, 0.2, 1.0)
    tree.links.new(noise.outputs["Fac"], ramp.inputs["Fac"])
    tree.links.new(ramp.outputs["Color"], tree.nodes["Principled BSDF"].inputs["Base Color"])
    add_mesh(bpy.ops.mesh.primitive_monkey_add, "Suzanne", skin, size=1.0, location=(-0.8, 0.0, 0.8))
    checker = principled("Checker", (0.5, 0.5, 0.5), 0.5, 0.3)
    tree = checker.node_tree
    tex = tree.nodes.new("ShaderNodeTexChecker")
    tex.inputs["Scale"].default_value = 4.0
    tree.links.new(tex.outputs["Color"], tree.nodes["Principled BSDF"].inputs["Base Color"])
    add_mesh(bpy.ops.mesh.primitive_cube_add, "Cube", checker, smooth=False, size=0.9,
             location=(0.9, 0.3, 0.45))
    add_mesh(bpy.ops.mesh.primitive_plane_add, "Ground", principled("Ground", (0.6, 0.6, 0.6), 0.0, 0.7),
             smooth=False, size=8.0)
    add_camera(scene, (1.0, -4.5, 2.2), (0.0, 0.0, 0.6))
    world = bpy.data.worlds.new("Sky")
    scene.world = world
    tree = compat.node_tree(world)
    sky = tree.nodes.new("ShaderNodeTexSky")
    tree.links.new(sky.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    tree.nodes["Background"].inputs["Strength"].default_value = 0.3
    save(folder / "suzanne.blend")


def save(path):
    bpy.ops.wm.save_as_mainfile(filepath=str(path), compress=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def make(folder=HERE):
    """Write spheres.blend and suzanne.blend into ``folder``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    make_spheres(Path(folder))
    make_suzanne(Path(folder))


if __name__ == "__main__":
    make()
