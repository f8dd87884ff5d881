"""Light export calibration: Cycles renders a lit diffuse plane, the backend's Lambert shader shades the
exported job (its lights only: the world is black), and the two must agree.

The scene: a 0.8 white Diffuse BSDF plane seen straight down by an orthographic camera, a black world,
no bounces (direct light only, which is all the job's lights carry), a ~0-wide pixel filter so both
images sample the same point per pixel. The backend takes 256 samples per area light, so that what is
measured is the conversion, not its sampling (at its default 16, a 40-degree spread shows 8 % median
per-pixel noise, the mean still within 0.1 %). Tolerances: 2 % on the lit mean, 3 % median per pixel
(Cycles noise at 128 samples).
"""

import json
import math

import bpy
import numpy as np
import pytest
from blender_helpers import read_exr
from mathutils import Vector

from addon import compat, gbuffer, lights
from addon.scene_state import property_dump

pytestmark = pytest.mark.blender
torch = pytest.importorskip("torch")
from backend.jobformat import Options, load_job  # noqa: E402
from backend.renderer import Renderer  # noqa: E402

SIZE = 32
ALBEDO = 0.8


def diffuse(name, colour):
    mat = bpy.data.materials.new(name)
    tree = compat.node_tree(mat)
    tree.nodes.clear()
    bsdf = tree.nodes.new("ShaderNodeBsdfDiffuse")
    bsdf.inputs["Color"].default_value = (*colour, 1.0)
    tree.links.new(bsdf.outputs[0], tree.nodes.new("ShaderNodeOutputMaterial").inputs["Surface"])
    return mat


def plane_scene():
    """The white plane (8 x 8 m at z = 0) under an orthographic camera 6 m across, a black world."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.cycles.device = "CPU"
    scene.world = bpy.data.worlds.new("Black")
    compat.node_tree(scene.world).nodes["Background"].inputs["Color"].default_value = (0, 0, 0, 1)
    mesh = bpy.data.meshes.new("Plane")
    mesh.from_pydata([(-4, -4, 0), (4, -4, 0), (4, 4, 0), (-4, 4, 0)], [], [(0, 1, 2, 3)])
    mesh.materials.append(diffuse("White", (ALBEDO,) * 3))
    scene.collection.objects.link(bpy.data.objects.new("Plane", mesh))
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.data.type, camera.data.ortho_scale, camera.location = "ORTHO", 6.0, (0, 0, 10)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return scene


def add_light(scene, kind, location=(0, 0, 0), aim=None, scale=(1, 1, 1), **settings):
    """A light of ``kind``; ``aim`` is a point its -Z axis looks at.

    Blender 4.2 lights have no exposure, temperature or Normalize (area lights are always normalised):
    there an ``exposure`` goes into the power (the same strength), ``normalize=False`` too (x the area:
    the same radiance), and the temperature is left out (the light keeps its colour).
    """
    data = bpy.data.lights.new(f"{kind.title()} light", kind)
    if "exposure" in settings and not hasattr(data, "exposure"):
        settings["energy"] = settings.get("energy", data.energy) * 2.0 ** settings.pop("exposure")
    if "normalize" in settings and not hasattr(data, "normalize"):
        if not settings.pop("normalize"):
            size = settings.get("size", data.size)
            ellipse = settings.get("shape") in {"DISK", "ELLIPSE"}
            area = size * settings.get("size_y", size) * (math.pi / 4 if ellipse else 1.0)
            settings["energy"] = settings.get("energy", data.energy) * area * scale[0] * scale[1]
    if "use_temperature" in settings and not hasattr(data, "use_temperature"):
        settings.pop("use_temperature")
        settings.pop("temperature", None)
    for key, value in settings.items():
        setattr(data, key, value)
    obj = bpy.data.objects.new(data.name, data)
    obj.location, obj.scale = location, scale
    if aim is not None:
        obj.rotation_euler = (Vector(aim) - Vector(location)).to_track_quat("-Z", "Y").to_euler()
    scene.collection.objects.link(obj)
    return obj


def cycles_reference(scene, path, samples):
    cycles = scene.cycles
    cycles.samples, cycles.use_denoising, cycles.use_adaptive_sampling = samples, False, False
    cycles.max_bounces, cycles.filter_width = 0, 0.01
    settings = scene.render.image_settings
    compat.set_file_format(settings, "OPEN_EXR")
    settings.color_depth = "32"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    (image,) = read_exr(path).values()
    return image[..., :3]


def backend_render(job_json):
    job = load_job(job_json, Options(model="lambert", rays=1, shadows=False, sampling="uniform"))
    return Renderer("cpu", light_samples=256).render(job).shaded


CASES = {
    "sun sharp": lambda s: add_light(s, "SUN", aim=(1, 0.5, -2), energy=3.0, angle=0.0),
    "sun soft": lambda s: add_light(s, "SUN", aim=(-1, 0, -1.5), energy=2.0, angle=math.radians(25),
                                    exposure=1.0, color=(1.0, 0.6, 0.3)),
    "point": lambda s: add_light(s, "POINT", (0.4, 0.2, 1.5), energy=150.0, shadow_soft_size=0.3,
                                 use_soft_falloff=False, use_temperature=True, temperature=4000),
    "point soft falloff": lambda s: add_light(s, "POINT", (-0.3, 0.1, 0.8), energy=60.0, shadow_soft_size=0.4,
                                              use_soft_falloff=True),
    "spot blend": lambda s: add_light(s, "SPOT", (0.3, 0, 2.0), aim=(-0.2, 0.3, 0), energy=300.0, scale=(2, 2, 2),
                                      spot_size=math.radians(70), spot_blend=0.4, shadow_soft_size=0.0),
    "area square": lambda s: add_light(s, "AREA", (0.2, -0.3, 1.2), aim=(0, 0.5, 0), energy=80.0, size=1.0),
    "area rectangle unnormalised": lambda s: add_light(s, "AREA", (0, 0, 1.0), energy=20.0, shape="RECTANGLE",
                                                       size=1.2, size_y=0.5, normalize=False),
    "area ellipse spread": lambda s: add_light(s, "AREA", (-0.3, 0.2, 1.0), energy=60.0, shape="ELLIPSE", size=1.0,
                                               size_y=0.6, scale=(1.5, 1, 1), spread=math.radians(90)),
    "area disk narrow spread": lambda s: add_light(s, "AREA", (0, 0, 1.5), aim=(0.3, 0, 0), energy=40.0,
                                                   shape="DISK", size=1.0, spread=math.radians(40)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_light_shades_as_cycles_renders(tmp_path, case):
    scene = plane_scene()
    light = CASES[case](scene)
    job_json = gbuffer.export_job(scene, tmp_path / "job", samples=1, hdri_width=16)
    entries = json.loads(job_json.read_text())["lights"]
    assert [e["name"] for e in entries] == [light.name]
    ours = backend_render(job_json)
    reference = cycles_reference(scene, tmp_path / "cycles.exr", samples=128)
    lit = reference.mean(-1) > 0.02 * reference.mean(-1).max()
    assert lit.sum() > 50, f"{case}: too few lit pixels to compare"
    mean_ratio = ours[lit].mean() / reference[lit].mean()
    per_pixel = np.median(np.abs(ours[lit] - reference[lit]) / reference[lit].clip(min=1e-6))
    assert abs(mean_ratio - 1) < 0.02, f"{case}: mean {mean_ratio:.4f} x Cycles"
    assert per_pixel < 0.03, f"{case}: median per-pixel error {per_pixel:.4f}"


def test_instanced_and_hidden_lights(tmp_path):
    """An instanced collection's light is exported once per instance; lights hidden for renders are not."""
    scene = plane_scene()
    source = bpy.data.collections.new("Lamps")
    source.objects.link(bpy.data.objects.new("Lamp", bpy.data.lights.new("Lamp", "POINT")))
    for i, x in enumerate((-1.0, 1.0)):
        empty = bpy.data.objects.new(f"Instancer{i}", None)
        empty.instance_type, empty.instance_collection, empty.location = "COLLECTION", source, (x, 0, 2)
        scene.collection.objects.link(empty)
    add_light(scene, "POINT", (0, 0, 1)).hide_render = True
    hidden = bpy.data.collections.new("Off")
    hidden.hide_render = True
    scene.collection.children.link(hidden)
    hidden.objects.link(bpy.data.objects.new("Off lamp", bpy.data.lights.new("Off lamp", "SUN")))
    job_json = gbuffer.export_job(scene, tmp_path, samples=1, width=8, height=8, hdri_width=16)
    entries = json.loads(job_json.read_text())["lights"]
    assert sorted(e["position"][0] for e in entries) == pytest.approx([-1.0, 1.0])
    assert all("instanced by Instancer" in e["name"] for e in entries)


def test_warnings_name_what_the_job_leaves_out(tmp_path):
    scene = plane_scene()
    glow = diffuse("Glow", (0.5, 0.5, 0.5))
    emission = glow.node_tree.nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = 3.0
    mesh = bpy.data.meshes.new("Lamp shade")
    mesh.from_pydata([(0, 0, 1), (1, 0, 1), (0, 1, 1)], [], [(0, 1, 2)])
    mesh.materials.append(glow)
    scene.collection.objects.link(bpy.data.objects.new("Lamp shade", mesh))
    fog = bpy.data.objects.new("Fog", bpy.data.volumes.new("Fog"))
    scene.collection.objects.link(fog)
    linked = add_light(scene, "POINT", (0, 0, 2), energy=-10.0)
    linked.light_linking.receiver_collection = bpy.data.collections.new("Receivers")
    add_light(scene, "SPOT", (1, 0, 2), use_shadow=False)
    scene.view_layers[0].update()  # matrix_world of the new objects, before the dump
    before = property_dump(scene)
    warnings = []
    job_json = gbuffer.export_job(scene, tmp_path, samples=1, width=8, height=8, hdri_width=16, warnings=warnings)
    assert property_dump(scene) == before
    text = "\n".join(warnings)
    assert "'Lamp shade' is emissive" in text and "material 'Glow'" in text
    assert "volume object 'Fog'" in text
    assert "'Point light' uses light linking" in text
    assert "light 'Point light' has negative power: not exported" in text
    assert "light 'Spot light' casts no shadow" in text
    assert len(warnings) == len(set(warnings))
    assert [e["name"] for e in json.loads(job_json.read_text())["lights"]] == ["Spot light"]


def test_export_lights_without_lights_or_problems():
    scene = plane_scene()
    assert lights.export_lights(scene, scene.view_layers[0].depsgraph) == ([], [])


def test_relight_signature_changes_with_lights():
    """Relight-only keeps the job's lights, so moving or dimming a light must force a full render."""
    from addon import engine

    scene = plane_scene()
    lamp = add_light(scene, "AREA", (0, 0, 1), energy=10.0)

    def signature():
        depsgraph = bpy.context.evaluated_depsgraph_get()
        depsgraph.update()
        return engine.gbuffer_signature(depsgraph, 8, 8, 1)

    first = signature()
    assert signature() == first
    lamp.location.x = 0.5
    moved = signature()
    lamp.data.energy = 20.0
    assert len({first, moved, signature()}) == 3
