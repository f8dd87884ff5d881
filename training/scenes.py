"""Random scenes for the procedural dataset: a description drawn from a seed, then built with bpy.

:func:`describe` is pure Python (no bpy): the same seed gives the same JSON-able description, which
:func:`build` turns into objects, materials and worlds in the current Blender file. A scene is a
ground plane and 1-4 objects placed close together so they shadow each other and the ground:
spheres, cubes, bevelled boxes, cylinders, cones, tori, Suzanne, and subdivided blobs displaced by
noise. Materials are Principled BSDFs (base colour, metallic, roughness, Specular IOR Level), some
with a noise, checker, voronoi or wave texture mixing two base colours or two roughnesses.

Lighting kinds: "hdri" (one of Blender's bundled studio-light HDRIs, rotated about Z, its strength
normalising the HDRI's mean radiance to ``HDRI_MEAN`` x an exposure of 0.5-2), "sky" (Nishita
multiple-scattering sky with a sun disc of 2.5-4 degrees, random sun elevation and azimuth) and
"gradient" (a ground/horizon/zenith colour ramp plus a soft coloured key-light lobe); and
"lamps" (:func:`lamp_lighting`: real lights, for the "lamps" split and a share of the training data). The sun disc
is widened from Blender's 0.5 degrees so that the job's 512-wide HDRI capture (one direction per
texel) still holds its energy to within a few percent (at 2 degrees errors reached 20%).
"""

from __future__ import annotations

import colorsys
import math
import random

HELD_OUT_HDRIS = ("forest.exr", "night.exr")  # lighting of the "relight" split only
HDRI_MEAN = 0.6  # target mean radiance of an HDRI world at exposure 1
KINDS = ("sphere", "cube", "bevel_box", "cylinder", "cone", "torus", "suzanne", "blob")
TEXTURES = ("noise", "checker", "voronoi", "wave")


def _color(rng: random.Random, saturation=(0.0, 0.9), value=(0.05, 0.9)) -> list[float]:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return [round(c, 4) for c in rgb]


def _material(rng: random.Random) -> dict:
    roll = rng.random()
    if roll < 0.25:  # metal: bright, mostly weakly saturated base colours
        material = {"base": _color(rng, (0.0, 0.6), (0.5, 1.0)), "metallic": 1.0, "roughness": rng.uniform(0.05, 0.7)}
    elif roll < 0.35:
        material = {"base": _color(rng), "metallic": rng.uniform(0.0, 1.0), "roughness": rng.uniform(0.05, 1.0)}
    else:
        material = {"base": _color(rng), "metallic": 0.0, "roughness": rng.uniform(0.05, 1.0)}
    material["specular"] = rng.uniform(0.2, 0.8)
    if rng.random() < 0.4:
        target = rng.choice(("base", "roughness"))
        material["texture"] = {"kind": rng.choice(TEXTURES), "target": target, "scale": rng.uniform(2.0, 12.0),
                               "other": _color(rng) if target == "base" else rng.uniform(0.05, 1.0)}
    return material


def _lighting(rng: random.Random, hdris: list[str]) -> dict:
    roll = rng.random()
    if roll < 0.6:
        return {"type": "hdri", "hdri": rng.choice(hdris), "rotation_z": rng.uniform(0, 2 * math.pi),
                "exposure": math.exp(rng.uniform(math.log(0.5), math.log(2.0)))}
    if roll < 0.8:
        return {"type": "sky", "hdri": "sky", "sun_elevation": math.radians(rng.uniform(8, 70)),
                "sun_rotation": rng.uniform(0, 2 * math.pi), "sun_size": math.radians(rng.uniform(2.5, 4.0)),
                "strength": rng.uniform(0.015, 0.04), "air_density": rng.uniform(0.5, 3.0)}
    elevation, azimuth = math.radians(rng.uniform(15, 70)), rng.uniform(0, 2 * math.pi)
    return {"type": "gradient", "hdri": "gradient", "ground": _color(rng, (0, 0.5), (0.02, 0.3)),
            "horizon": _color(rng, (0, 0.6), (0.3, 1.0)), "zenith": _color(rng, (0, 0.8), (0.2, 1.0)),
            "key": _color(rng, (0, 0.4), (0.8, 1.0)), "key_power": rng.uniform(20, 300),
            "key_strength": rng.uniform(5, 40),
            "key_direction": [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                              math.sin(elevation)]}


def _aim(rng: random.Random, distance: tuple[float, float], elevation: tuple[float, float]) -> dict:
    """A place on a sphere around the scene's centre, and the unit direction from there to the centre."""
    elev, azimuth, d = math.radians(rng.uniform(*elevation)), rng.uniform(0, 2 * math.pi), rng.uniform(*distance)
    towards_light = [math.cos(elev) * math.cos(azimuth), math.cos(elev) * math.sin(azimuth), math.sin(elev)]
    return {"location": [d * c for c in towards_light], "direction": [-c for c in towards_light], "distance": d}


def _lamp(rng: random.Random, kind: str, irradiance: float) -> dict:
    """A light object aimed at the scene centre, its power set for about ``irradiance`` W/m^2 there.

    Blender's units as Cycles renders them: a Sun's strength is the irradiance itself; a point or spot
    of power P has intensity P / (4 pi^2) W/sr at the centre of its cone... (docs/addon.md); an area
    light of power P emits radiance P / (pi A) (times its spread), about P / (pi d^2) at distance d.
    """
    color = _color(rng, (0.0, 0.3), (1.0, 1.0))
    if kind in ("sun", "soft_sun"):
        angle = math.radians(0.545 if kind == "sun" else rng.uniform(3.0, 12.0))
        place = _aim(rng, (1.0, 1.0), (15, 70))
        return {"type": "SUN", "color": color, "direction": place["direction"], "angle": angle,
                "energy": irradiance}
    place = _aim(rng, (2.5, 5.0), (20, 65))
    lamp = {"color": color, "location": place["location"], "direction": place["direction"]}
    if kind == "area":
        shape = rng.choice(("SQUARE", "RECTANGLE", "DISK", "ELLIPSE"))
        size = rng.uniform(0.3, 2.0)
        size_y = size * rng.uniform(0.3, 1.0) if shape in ("RECTANGLE", "ELLIPSE") else size
        return {**lamp, "type": "AREA", "shape": shape, "size": size, "size_y": size_y,
                "energy": irradiance * math.pi * place["distance"] ** 2}
    power = irradiance * 4 * math.pi ** 2 * place["distance"] ** 2
    if kind == "spot":
        return {**lamp, "type": "SPOT", "spot_size": math.radians(rng.uniform(30, 90)),
                "spot_blend": rng.uniform(0.0, 1.0), "radius": rng.uniform(0.0, 0.2), "energy": power}
    return {**lamp, "type": "POINT", "radius": rng.uniform(0.0, 0.3), "energy": power}


LAMP_SETUPS = ("sky_sun", "sun", "soft_sun", "area", "spot", "point")


def lamp_lighting(rng: random.Random, hdris: list[str] | tuple[str, ...], setup: str | None = None) -> dict:
    """Real lights: a Nishita sky with a real-size sun (0.545 deg), or a dim HDRI fill plus light objects
    (a sharp or soft Sun lamp, an area key light, a spot, or a point light, sometimes with a second
    weaker lamp); ``setup`` one of LAMP_SETUPS (default: drawn). World type "lamps"; ``world`` is the
    fill world's own description."""
    setup = setup or rng.choice(LAMP_SETUPS)
    if setup == "sky_sun":
        world = {"type": "sky", "hdri": "sky", "sun_elevation": math.radians(rng.uniform(8, 70)),
                 "sun_rotation": rng.uniform(0, 2 * math.pi), "sun_size": math.radians(0.545),
                 "strength": rng.uniform(0.015, 0.04), "air_density": rng.uniform(0.5, 3.0)}
        return {"type": "lamps", "hdri": "sky_sun", "setup": setup, "world": world, "lamps": []}
    world = {"type": "hdri", "hdri": rng.choice(sorted(hdris)), "rotation_z": rng.uniform(0, 2 * math.pi),
             "exposure": rng.uniform(0.1, 0.4)}
    lamps = [_lamp(rng, setup, rng.uniform(1.5, 4.0))]
    if rng.random() < 0.4:
        lamps.append(_lamp(rng, rng.choice(("area", "point")), rng.uniform(0.3, 1.0)))
    return {"type": "lamps", "hdri": setup, "setup": setup, "world": world, "lamps": lamps}


def describe(seed: int, hdris: list[str] | tuple[str, ...], lightings: int = 2) -> dict:
    """A random scene: ground, 1-4 objects, ``lightings`` worlds drawn with HDRIs from ``hdris``."""
    rng = random.Random(f"pbnds-scene:{seed}")
    hdris = sorted(hdris)
    objects: list[dict] = []
    for _ in range(rng.choice((1, 2, 2, 3, 3, 4))):
        size = rng.uniform(0.35, 0.8)
        for _attempt in range(50):  # a spot near the others, overlapping them at most a little
            radius, angle = rng.uniform(0, 0.9), rng.uniform(0, 2 * math.pi)
            x, y = radius * math.cos(angle), radius * math.sin(angle)
            if all(math.hypot(x - o["location"][0], y - o["location"][1]) > 0.4 * (size + o["size"])
                   for o in objects):
                break
        kind = rng.choice(KINDS)
        objects.append({"kind": kind, "location": [x, y], "size": size, "rotation_z": rng.uniform(0, 2 * math.pi),
                        "tilt": rng.uniform(0, 0.6) if kind in ("cube", "bevel_box", "torus", "suzanne") else 0.0,
                        "displace": rng.uniform(0.05, 0.25) if kind == "blob" else 0.0,
                        "material": _material(rng)})
    ground = {"base": _color(rng, (0.0, 0.5), (0.1, 0.8)), "metallic": 0.0, "roughness": rng.uniform(0.3, 1.0),
              "specular": rng.uniform(0.2, 0.6)}
    if rng.random() < 0.5:
        ground["texture"] = {"kind": "checker", "target": "base", "scale": rng.uniform(4.0, 16.0),
                             "other": _color(rng, (0.0, 0.5), (0.1, 0.8))}
    worlds = [_lighting(rng, hdris) for _ in range(lightings)]
    return {"seed": seed, "objects": objects, "ground": ground, "lightings": worlds}


# --- building with bpy ----------------------------------------------------------------------------

def build(description: dict, hdri_folder, threads: int = 0):
    """Build ``description`` into the current (empty) Blender file; return (scene, worlds).

    ``hdri_folder`` holds the HDRI files named in the lightings; ``threads`` 0 lets Cycles use every
    core. Each world carries what lit the scene as its ``pbnds_world`` custom property.
    """
    import bpy

    from addon.dataset import select_lamps

    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.render.threads_mode = "FIXED" if threads else "AUTO"
    scene.render.threads = max(1, threads)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    scene.camera = camera
    _ground(scene, description["ground"])
    for i, spec in enumerate(description["objects"]):
        _object(scene, i, spec)
    worlds = [make_world(lighting, hdri_folder, f"Lighting {i}") for i, lighting in enumerate(description["lightings"])]
    for world, lighting in zip(worlds, description["lightings"], strict=True):
        for j, lamp in enumerate(lighting.get("lamps", [])):
            _lamp_object(scene, f"{world.name} lamp {j}", lamp)["pbnds_lighting"] = world.name
    scene.world = worlds[0]
    select_lamps(scene, worlds[0])
    return scene, worlds


def _lamp_object(scene, name, lamp):
    import bpy
    from mathutils import Vector

    light = bpy.data.lights.new(name, lamp["type"])
    light.color = lamp["color"]
    light.energy = lamp["energy"]
    if lamp["type"] == "SUN":
        light.angle = lamp["angle"]
    elif lamp["type"] == "AREA":
        light.shape, light.size, light.size_y = lamp["shape"], lamp["size"], lamp["size_y"]
    else:
        light.shadow_soft_size = lamp["radius"]
        if lamp["type"] == "SPOT":
            light.spot_size, light.spot_blend = lamp["spot_size"], lamp["spot_blend"]
    ob = bpy.data.objects.new(name, light)
    ob.location = lamp.get("location", (0.0, 0.0, 5.0))
    ob.rotation_euler = Vector(lamp["direction"]).to_track_quat("-Z", "Y").to_euler()
    scene.collection.objects.link(ob)
    return ob


def _link(scene, name, mesh, material):
    import bpy

    mesh.materials.append(material)
    ob = bpy.data.objects.new(name, mesh)
    scene.collection.objects.link(ob)
    return ob


def _ground(scene, spec):
    import bmesh
    import bpy

    mesh = bpy.data.meshes.new("Ground")
    bm = bmesh.new()
    bmesh.ops.create_grid(bm, x_segments=1, y_segments=1, size=5.0)
    bm.to_mesh(mesh)
    bm.free()
    _link(scene, "Ground", mesh, make_material(spec, "Ground"))


def _torus(mesh, major=0.7, minor=0.3, rings=48, sides=24):
    verts, faces = [], []
    for i in range(rings):
        a = 2 * math.pi * i / rings
        for j in range(sides):
            b = 2 * math.pi * j / sides
            r = major + minor * math.cos(b)
            verts.append((r * math.cos(a), r * math.sin(a), minor * math.sin(b)))
            faces.append((i * sides + j, i * sides + (j + 1) % sides, ((i + 1) % rings) * sides + (j + 1) % sides,
                          ((i + 1) % rings) * sides + j))
    mesh.from_pydata(verts, [], faces)


def _object(scene, index, spec):
    import bmesh
    import bpy
    from mathutils import Matrix

    kind = spec["kind"]
    mesh = bpy.data.meshes.new(f"{kind}.{index}")
    if kind == "torus":
        _torus(mesh)
    else:
        bm = bmesh.new()
        if kind == "sphere":
            bmesh.ops.create_uvsphere(bm, u_segments=48, v_segments=24, radius=1.0)
        elif kind in ("cube", "bevel_box"):
            bmesh.ops.create_cube(bm, size=1.6)
            if kind == "bevel_box":
                bmesh.ops.bevel(bm, geom=bm.edges[:] + bm.verts[:], offset=0.2, segments=4, affect="EDGES")
        elif kind in ("cylinder", "cone"):
            bmesh.ops.create_cone(bm, cap_ends=True, segments=48, radius1=0.8, radius2=0.8 if kind == "cylinder" else 0,
                                  depth=1.6)
        elif kind == "suzanne":
            bmesh.ops.create_monkey(bm)
            bmesh.ops.subdivide_edges(bm, edges=bm.edges[:], cuts=1, use_grid_fill=True, smooth=1.0)
        else:  # blob: an icosphere displaced along its normals by a noise texture
            bmesh.ops.create_icosphere(bm, subdivisions=4, radius=1.0)
        bm.to_mesh(mesh)
        bm.free()
    if kind in ("cube", "bevel_box"):
        mesh.shade_flat()
    else:
        mesh.shade_smooth()
        if kind in ("cylinder", "cone"):  # sharp rims around smooth sides
            mesh.set_sharp_from_angle(angle=math.radians(30))
    ob = _link(scene, f"{kind}.{index}", mesh, make_material(spec["material"], f"Material {index}"))
    if kind == "blob":
        texture = bpy.data.textures.new(f"Blob {index}", "CLOUDS")
        texture.noise_scale = 0.6
        displace = ob.modifiers.new("Displace", "DISPLACE")
        displace.texture = texture
        displace.strength = spec["displace"] * 4
        displace.mid_level = 0.5
    # Scale so the largest extent is `size`, tilt, turn, then rest on the ground at (x, y).
    extent = max(max(v.co[i] for v in mesh.vertices) - min(v.co[i] for v in mesh.vertices) for i in range(3))
    ob.matrix_world = (Matrix.Rotation(spec["rotation_z"], 4, "Z") @ Matrix.Rotation(spec["tilt"], 4, "X")
                       @ Matrix.Scale(spec["size"] / extent, 4))
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = ob.evaluated_get(depsgraph)
    lowest = min((evaluated.matrix_world @ v.co).z for v in evaluated.to_mesh().vertices)
    evaluated.to_mesh_clear()
    x, y = spec["location"]
    ob.matrix_world = Matrix.Translation((x, y, -lowest - 0.005)) @ ob.matrix_world
    return ob


def make_material(spec, name):
    """A Principled BSDF material from a description (optionally a texture mixing two values)."""
    import bpy

    material = bpy.data.materials.new(name)
    tree = material.node_tree
    bsdf = tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*spec["base"], 1.0)
    bsdf.inputs["Metallic"].default_value = spec["metallic"]
    bsdf.inputs["Roughness"].default_value = spec["roughness"]
    bsdf.inputs["Specular IOR Level"].default_value = spec["specular"]
    texture = spec.get("texture")
    if texture:
        node = tree.nodes.new({"noise": "ShaderNodeTexNoise", "checker": "ShaderNodeTexChecker",
                               "voronoi": "ShaderNodeTexVoronoi", "wave": "ShaderNodeTexWave"}[texture["kind"]])
        node.inputs["Scale"].default_value = texture["scale"]
        fac = node.outputs["Fac"] if "Fac" in node.outputs else node.outputs["Distance"]
        color = texture["target"] == "base"
        mix = tree.nodes.new("ShaderNodeMix")
        mix.data_type = "RGBA" if color else "FLOAT"
        mix.clamp_factor = True
        inputs = [s for s in mix.inputs if s.enabled]
        tree.links.new(fac, inputs[0])
        if color:
            inputs[1].default_value = (*spec["base"], 1.0)
            inputs[2].default_value = (*texture["other"], 1.0)
            tree.links.new(mix.outputs[2], bsdf.inputs["Base Color"])
        else:
            inputs[1].default_value = spec["roughness"]
            inputs[2].default_value = texture["other"]
            tree.links.new(mix.outputs[0], bsdf.inputs["Roughness"])
    return material


_HDRI_MEANS: dict[str, float] = {}


def _hdri_mean(image) -> float:
    """Mean radiance (luminance) of an equirectangular image, weighted by solid angle."""
    import numpy as np

    key = image.filepath
    if key not in _HDRI_MEANS:
        w, h = image.size
        pixels = np.empty(w * h * image.channels, np.float32)
        image.pixels.foreach_get(pixels)
        rgb = pixels.reshape(h, w, image.channels)[..., :3]
        luminance = rgb @ np.array([0.2126, 0.7152, 0.0722], np.float32)
        weight = np.sin((np.arange(h) + 0.5) / h * np.pi)[:, None]
        _HDRI_MEANS[key] = float((luminance * weight).sum() / (weight.sum() * w))
    return _HDRI_MEANS[key]


def make_world(lighting, hdri_folder, name="Lighting"):
    """A world for one lighting description, with the description (strength added) as ``pbnds_world``."""
    from pathlib import Path

    import bpy

    if lighting["type"] == "lamps":  # the fill world; build() adds the light objects
        world = make_world(lighting["world"], hdri_folder, name)
        world["pbnds_world"] = {**lighting, "world": world["pbnds_world"].to_dict()}
        return world
    world = bpy.data.worlds.new(name)
    tree = world.node_tree
    background = tree.nodes["Background"]
    coords = tree.nodes.new("ShaderNodeTexCoord")
    info = dict(lighting)
    kind = lighting["type"]
    if kind == "hdri":
        env = tree.nodes.new("ShaderNodeTexEnvironment")
        env.image = bpy.data.images.load(str(Path(hdri_folder) / lighting["hdri"]), check_existing=True)
        mapping = tree.nodes.new("ShaderNodeMapping")
        mapping.inputs["Rotation"].default_value = (0.0, 0.0, lighting["rotation_z"])
        tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
        tree.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
        tree.links.new(env.outputs["Color"], background.inputs["Color"])
        info["strength"] = HDRI_MEAN * lighting["exposure"] / max(_hdri_mean(env.image), 1e-6)
    elif kind == "sky":
        sky = tree.nodes.new("ShaderNodeTexSky")
        sky.sky_type = "MULTIPLE_SCATTERING"
        sky.sun_disc = True
        sky.sun_size = lighting["sun_size"]
        sky.sun_elevation = lighting["sun_elevation"]
        sky.sun_rotation = lighting["sun_rotation"]
        sky.air_density = lighting["air_density"]
        tree.links.new(sky.outputs["Color"], background.inputs["Color"])
        info["strength"] = lighting["strength"]
    else:
        _gradient(tree, coords, background, lighting)
        info["strength"] = 1.0
    background.inputs["Strength"].default_value = info["strength"]
    world["pbnds_world"] = info
    return world


def _gradient(tree, coords, background, lighting):
    """ramp(d.z) + key colour x key_strength x max(d . key_direction, 0) ^ key_power."""
    separate = tree.nodes.new("ShaderNodeSeparateXYZ")
    tree.links.new(coords.outputs["Generated"], separate.inputs[0])
    ramp = tree.nodes.new("ShaderNodeMapRange")  # z in [-1, 1] -> [0, 1]
    ramp.inputs["From Min"].default_value = -1.0
    tree.links.new(separate.outputs["Z"], ramp.inputs["Value"])
    colors = tree.nodes.new("ShaderNodeValToRGB")
    stops = colors.color_ramp.elements
    stops[0].position, stops[0].color = 0.45, (*lighting["ground"], 1.0)
    stops[1].position, stops[1].color = 1.0, (*lighting["zenith"], 1.0)
    horizon = stops.new(0.5)
    horizon.color = (*lighting["horizon"], 1.0)
    tree.links.new(ramp.outputs["Result"], colors.inputs["Fac"])
    dot = tree.nodes.new("ShaderNodeVectorMath")
    dot.operation = "DOT_PRODUCT"
    tree.links.new(coords.outputs["Generated"], dot.inputs[0])
    dot.inputs[1].default_value = lighting["key_direction"]
    lobe = dot.outputs["Value"]
    for operation, value in (("MAXIMUM", 0.0), ("POWER", lighting["key_power"]),
                             ("MULTIPLY", lighting["key_strength"])):
        node = tree.nodes.new("ShaderNodeMath")
        node.operation = operation
        tree.links.new(lobe, node.inputs[0])
        node.inputs[1].default_value = value
        lobe = node.outputs["Value"]
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.blend_type = "ADD"
    mix.clamp_factor = False
    inputs = [s for s in mix.inputs if s.enabled]
    tree.links.new(lobe, inputs[0])
    tree.links.new(colors.outputs["Color"], inputs[1])
    inputs[2].default_value = (*lighting["key"], 1.0)
    tree.links.new(mix.outputs[2], background.inputs["Color"])
