"""Random scenes for the procedural dataset: a description drawn from a seed, then built with bpy.

:func:`describe` is pure Python (no bpy): the same seed and family give the same JSON-able
description, which :func:`build` turns into objects, surfaces, materials and worlds in the current
Blender file. Families (docs/dataset.md, "Scene families"): "ground", "glossy-ground" (a polished
floor), "single" (one object, no ground, HDRIs), "room" (a floor and 2-3 walls), "thin-concave"
(bowls, cups, tubes, thin rings, standing planks) and "studio" (a seamless backdrop under softboxes);
HELD_OUT_FAMILIES are for the test split only. Rooms and backdrops frame their own views
(:func:`add_views`, on their open side). A "ground" scene (as every scene was before families) is a
ground plane and 1-4 objects placed close together so they shadow each other and the ground:
spheres, cubes, bevelled boxes, cylinders, cones, tori, Suzanne, and subdivided blobs displaced by
noise. Materials are Principled BSDFs (base colour, metallic, roughness, Specular IOR Level), some
with a noise, checker, voronoi or wave texture mixing two base colours or two roughnesses.

Lighting kinds: "hdri" (one of Blender's bundled studio-light HDRIs, rotated about Z, its strength
normalising the HDRI's mean radiance to ``HDRI_MEAN`` x an exposure of 0.5-2), "sky" (Nishita
multiple-scattering sky with a sun disc of 2.5-4 degrees, random sun elevation and azimuth) and
"gradient" (a ground/horizon/zenith colour ramp plus a soft coloured key-light lobe), "studio" (a
dim grey ramp plus 1-4 compact softbox lobes; the "studio" family's); and
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
FAMILIES = ("ground", "glossy-ground", "single", "room", "thin-concave", "studio")
HELD_OUT_FAMILIES = ("room", "thin-concave")  # test split only: training never sees them
TRAINING_FAMILIES = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)
THIN_KINDS = ("bowl", "cup", "tube", "ring", "plank")  # thin and concave shapes: the "thin-concave" family only


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


def _hdri_lighting(rng: random.Random, hdris: list[str]) -> dict:
    return {"type": "hdri", "hdri": rng.choice(hdris), "rotation_z": rng.uniform(0, 2 * math.pi),
            "exposure": math.exp(rng.uniform(math.log(0.5), math.log(2.0)))}


def _lighting(rng: random.Random, hdris: list[str]) -> dict:
    roll = rng.random()
    if roll < 0.6:
        return _hdri_lighting(rng, hdris)
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


def _aim(rng: random.Random, distance: tuple[float, float], elevation: tuple[float, float],
         azimuth_range=None) -> dict:
    """A place on a sphere around the scene's centre (azimuth in ``azimuth_range``, radians, default any),
    and the unit direction from there to the centre."""
    elev = math.radians(rng.uniform(*elevation))
    azimuth, d = rng.uniform(*(azimuth_range or (0, 2 * math.pi))), rng.uniform(*distance)
    towards_light = [math.cos(elev) * math.cos(azimuth), math.cos(elev) * math.sin(azimuth), math.sin(elev)]
    return {"location": [d * c for c in towards_light], "direction": [-c for c in towards_light], "distance": d}


def _lamp(rng: random.Random, kind: str, irradiance: float, azimuth=None) -> dict:
    """A light object aimed at the scene centre, its power set for about ``irradiance`` W/m^2 there.

    Blender's units as Cycles renders them: a Sun's strength is the irradiance itself; a point or spot
    of power P has intensity P / (4 pi^2) W/sr at the centre of its cone... (docs/addon.md); an area
    light of power P emits radiance P / (pi A) (times its spread), about P / (pi d^2) at distance d.
    """
    color = _color(rng, (0.0, 0.3), (1.0, 1.0))
    if kind in ("sun", "soft_sun"):
        angle = math.radians(0.545 if kind == "sun" else rng.uniform(3.0, 12.0))
        place = _aim(rng, (1.0, 1.0), (15, 70), azimuth)
        return {"type": "SUN", "color": color, "direction": place["direction"], "angle": angle,
                "energy": irradiance}
    place = _aim(rng, (2.5, 5.0), (20, 65), azimuth)
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


def lamp_lighting(rng: random.Random, hdris: list[str] | tuple[str, ...], setup: str | None = None,
                  azimuth=None) -> dict:
    """Real lights: a Nishita sky with a real-size sun (0.545 deg), or a dim HDRI fill plus light objects
    (a sharp or soft Sun lamp, an area key light, a spot, or a point light, sometimes with a second
    weaker lamp); ``setup`` one of LAMP_SETUPS (default: drawn); ``azimuth`` (radians, lo and hi) keeps
    the light objects on one side (a description's "light_azimuth": a room's or backdrop's open side).
    World type "lamps"; ``world`` is the fill world's own description."""
    setup = setup or rng.choice(LAMP_SETUPS)
    if setup == "sky_sun":
        world = {"type": "sky", "hdri": "sky", "sun_elevation": math.radians(rng.uniform(8, 70)),
                 "sun_rotation": rng.uniform(0, 2 * math.pi), "sun_size": math.radians(0.545),
                 "strength": rng.uniform(0.015, 0.04), "air_density": rng.uniform(0.5, 3.0)}
        return {"type": "lamps", "hdri": "sky_sun", "setup": setup, "world": world, "lamps": []}
    world = {"type": "hdri", "hdri": rng.choice(sorted(hdris)), "rotation_z": rng.uniform(0, 2 * math.pi),
             "exposure": rng.uniform(0.1, 0.4)}
    lamps = [_lamp(rng, setup, rng.uniform(1.5, 4.0), azimuth)]
    if rng.random() < 0.4:
        lamps.append(_lamp(rng, rng.choice(("area", "point")), rng.uniform(0.3, 1.0), azimuth))
    return {"type": "lamps", "hdri": setup, "setup": setup, "world": world, "lamps": lamps}


def describe(seed: int, hdris: list[str] | tuple[str, ...], lightings: int = 2, family: str = "ground") -> dict:
    """A random scene of ``family``: objects, surfaces, ``lightings`` worlds drawn with HDRIs from ``hdris``.

    Keys: seed, family, objects, ground (None for "single"), lightings; "room" adds walls, "studio" a
    backdrop; both add camera (the azimuth/elevation ranges their views are drawn from, radians:
    the open side) and light_azimuth (where lamp lightings may stand). "ground" is drawn exactly as
    before families existed (the same seed gives gen-v1's scene).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown scene family {family!r}; families are {', '.join(FAMILIES)}")
    rng = random.Random(f"pbnds-scene:{seed}" if family == "ground" else f"pbnds-scene:{family}:{seed}")
    body = _FAMILY_MAKERS[family](rng, sorted(hdris), lightings)
    return {"seed": seed, "family": family, **body}


def _objects(rng: random.Random, kinds, counts=(1, 2, 2, 3, 3, 4), sizes=(0.35, 0.8), spread=0.9) -> list[dict]:
    """Objects of largest extent in ``sizes`` placed within ``spread`` of the centre, overlapping little."""
    objects: list[dict] = []
    for _ in range(rng.choice(counts)):
        size = rng.uniform(*sizes)
        for _attempt in range(50):  # a spot near the others, overlapping them at most a little
            radius, angle = rng.uniform(0, spread), rng.uniform(0, 2 * math.pi)
            x, y = radius * math.cos(angle), radius * math.sin(angle)
            if all(math.hypot(x - o["location"][0], y - o["location"][1]) > 0.4 * (size + o["size"])
                   for o in objects):
                break
        objects.append(_object_spec(rng, rng.choice(kinds), [x, y], size))
    return objects


def _object_spec(rng: random.Random, kind: str, location: list[float], size: float) -> dict:
    spec = {"kind": kind, "location": location, "size": size, "rotation_z": rng.uniform(0, 2 * math.pi)}
    if kind in THIN_KINDS:  # proportions relative to the largest extent (plank: to its height)
        spec["displace"] = 0.0
        if kind == "bowl":  # an open hemisphere shell, squashed to `depth` x its radius
            spec.update(tilt=0.0, depth=rng.uniform(0.4, 1.0), thickness=rng.uniform(0.015, 0.04))
        elif kind == "cup":  # a cylinder open at the top, `height` x its diameter
            spec.update(tilt=rng.choice((0.0, 0.0, rng.uniform(0.1, 0.35))), height=rng.uniform(0.5, 1.4),
                        thickness=rng.uniform(0.015, 0.04))
        elif kind == "tube":  # a pipe open at both ends, lying on its side
            spec.update(tilt=math.pi / 2, height=rng.uniform(1.0, 2.5), thickness=rng.uniform(0.015, 0.04))
        elif kind == "ring":  # a thin torus, flat or standing
            spec.update(tilt=rng.choice((0.0, math.pi / 2)), minor=rng.uniform(0.05, 0.15))
        else:  # plank: a thin slab standing on its edge, sometimes leaning a little
            spec.update(tilt=rng.uniform(0.0, 0.15), width=rng.uniform(0.4, 1.0), thickness=rng.uniform(0.03, 0.08))
    else:
        spec["tilt"] = rng.uniform(0, 0.6) if kind in ("cube", "bevel_box", "torus", "suzanne") else 0.0
        spec["displace"] = rng.uniform(0.05, 0.25) if kind == "blob" else 0.0
    spec["material"] = _material(rng)
    return spec


def _matte_ground(rng: random.Random) -> dict:
    ground = {"base": _color(rng, (0.0, 0.5), (0.1, 0.8)), "metallic": 0.0, "roughness": rng.uniform(0.3, 1.0),
              "specular": rng.uniform(0.2, 0.6)}
    if rng.random() < 0.5:
        ground["texture"] = {"kind": "checker", "target": "base", "scale": rng.uniform(4.0, 16.0),
                             "other": _color(rng, (0.0, 0.5), (0.1, 0.8))}
    return ground


def _ground_family(rng, hdris, lightings):
    objects = _objects(rng, KINDS)
    ground = _matte_ground(rng)
    return {"objects": objects, "ground": ground, "lightings": [_lighting(rng, hdris) for _ in range(lightings)]}


def _glossy_ground_family(rng, hdris, lightings):
    """Objects on a polished floor: a dark-to-mid dielectric at roughness 0.02-0.2 or (20%) a metal."""
    objects = _objects(rng, KINDS)
    if rng.random() < 0.2:
        ground = {"base": _color(rng, (0.0, 0.3), (0.5, 0.95)), "metallic": 1.0, "roughness": rng.uniform(0.05, 0.3)}
    else:
        ground = {"base": _color(rng, (0.0, 0.6), (0.02, 0.5)), "metallic": 0.0, "roughness": rng.uniform(0.02, 0.2)}
    ground["specular"] = rng.uniform(0.5, 1.0)
    roll = rng.random()
    if roll < 0.25:  # polished tiles
        ground["texture"] = {"kind": "checker", "target": "base", "scale": rng.uniform(4.0, 16.0),
                             "other": _color(rng, (0.0, 0.5), (0.02, 0.6))}
    elif roll < 0.45:  # smudges: patches of rougher finish
        ground["texture"] = {"kind": "noise", "target": "roughness", "scale": rng.uniform(2.0, 8.0),
                             "other": rng.uniform(0.2, 0.5)}
    return {"objects": objects, "ground": ground, "lightings": [_lighting(rng, hdris) for _ in range(lightings)]}


def _single_family(rng, hdris, lightings):
    """One object at the origin in any orientation, nothing under it, lit by HDRIs (a product shot)."""
    spec = _object_spec(rng, rng.choice(KINDS), [0.0, 0.0], rng.uniform(0.6, 1.0))
    spec["tilt"] = rng.uniform(0.0, math.pi)
    return {"objects": [spec], "ground": None, "lightings": [_hdri_lighting(rng, hdris) for _ in range(lightings)]}


def _turned(point, turn: float) -> list[float]:
    c, s = math.cos(turn), math.sin(turn)
    return [c * point[0] - s * point[1], s * point[0] + c * point[1], point[2]]


def _room_family(rng, hdris, lightings):
    """A floor and 2 walls meeting in a corner, or 3 (an alcove), open towards the camera and the sky,
    turned about Z at random; objects stand within 0.4 of the centre, walls 1-1.6 away. Views from
    low (8-35 degrees) and 1.8x as far as the objects alone need, so that the walls fill the back."""
    objects = _objects(rng, KINDS, counts=(1, 2, 2, 3), sizes=(0.3, 0.6), spread=0.4)
    floor = _matte_ground(rng)
    floor["roughness"] = rng.uniform(0.15, 1.0)  # wood, tiles, carpet
    wall = {"base": _color(rng, (0.0, 0.35), (0.3, 0.9)), "metallic": 0.0, "roughness": rng.uniform(0.5, 1.0),
            "specular": rng.uniform(0.2, 0.5)}
    if rng.random() < 0.3:
        wall["texture"] = {"kind": rng.choice(("noise", "wave", "checker")), "target": "base",
                           "scale": rng.uniform(2.0, 8.0), "other": _color(rng, (0.0, 0.4), (0.2, 0.9))}
    accent = _material(rng) if rng.random() < 0.3 else wall  # the back wall painted differently
    shape = rng.choice(("corner", "alcove"))
    d, height, turn = rng.uniform(1.0, 1.6), rng.uniform(1.2, 2.5), rng.uniform(0, 2 * math.pi)
    z0 = -0.02  # walls reach under the floor: no light leaks along the seam
    if shape == "corner":  # walls on -y and -x, running on past the centre; views from the +x+y quadrant
        back_end, side_end = d + rng.uniform(1.0, 3.0), d + rng.uniform(1.0, 3.0)
        local = [("back", [back_end, -d, z0], [-(back_end + d), 0, 0], accent),
                 ("left", [-d, -d, z0], [0, side_end + d, 0], wall)]
        views, lights = (5.0, 85.0), (-20.0, 110.0)
    else:  # alcove: walls on -y, -x and +x; views from +y
        side_end = rng.uniform(0.0, d)
        local = [("back", [d, -d, z0], [-2 * d, 0, 0], accent),
                 ("left", [-d, -d, z0], [0, side_end + d, 0], wall),
                 ("right", [d, side_end, z0], [0, -(side_end + d), 0], wall)]
        views, lights = (68.0, 112.0), (20.0, 160.0)
    # each wall: corner `origin`, edges `u` (along the floor) and `v` (up); u x v faces into the room
    walls = [{"name": name, "origin": _turned(o, turn), "u": _turned(u, turn), "v": [0.0, 0.0, height + 0.02],
              "material": material} for name, o, u, material in local]
    return {"objects": objects, "ground": floor, "walls": walls,
            "room": {"shape": shape, "half_width": d, "height": height, "rotation_z": turn},
            "camera": {"azimuth": [turn + math.radians(a) for a in views],
                       "elevation": [math.radians(8.0), math.radians(35.0)], "fit": 1.8},
            "light_azimuth": [turn + math.radians(a) for a in lights],
            "lightings": [_lighting(rng, hdris) for _ in range(lightings)]}


def _thin_concave_family(rng, hdris, lightings):
    """Bowls, cups, tubes, thin rings and standing planks on a matte ground (held out: unlike any
    training shape, thin walls and cavities that shadow and reflect into themselves)."""
    objects = _objects(rng, THIN_KINDS, counts=(1, 2, 2, 3, 3), sizes=(0.4, 0.9))
    ground = _matte_ground(rng)
    return {"objects": objects, "ground": ground, "lightings": [_lighting(rng, hdris) for _ in range(lightings)]}


def _studio_family(rng, hdris, lightings):
    """1-3 objects on a seamless backdrop (a floor curving up into a back wall), lit by softboxes."""
    objects = _objects(rng, KINDS, counts=(1, 1, 2, 2, 3), spread=0.6)
    if rng.random() < 0.75:  # paper: near-neutral, matte
        paper = {"base": _color(rng, (0.0, 0.25), (0.05, 0.9)), "metallic": 0.0, "roughness": rng.uniform(0.5, 1.0),
                 "specular": rng.uniform(0.2, 0.5)}
    else:  # acrylic: glossy
        paper = {"base": _color(rng, (0.0, 0.5), (0.02, 0.6)), "metallic": 0.0, "roughness": rng.uniform(0.05, 0.3),
                 "specular": rng.uniform(0.5, 1.0)}
    turn = rng.uniform(0, 2 * math.pi)
    backdrop = {"half_width": 5.0, "front": 6.0, "back": rng.uniform(1.0, 2.0), "radius": rng.uniform(0.5, 1.2),
                "height": rng.uniform(2.5, 4.0), "rotation_z": turn, "material": paper}
    return {"objects": objects, "ground": None, "backdrop": backdrop,
            "camera": {"azimuth": [turn + math.radians(a) for a in (55.0, 125.0)],
                       "elevation": [math.radians(5.0), math.radians(35.0)], "fit": 1.0},
            "light_azimuth": [turn + math.radians(a) for a in (10.0, 170.0)],
            "lightings": [_studio_lighting(rng, hdris, turn) for _ in range(lightings)]}


def _studio_lighting(rng: random.Random, hdris, turn: float) -> dict:
    """Softboxes (75%): a dim grey ramp plus a key, and maybe a fill, a top and a rim light, each a
    compact lobe max(d.k, 0)^p (p 40-400: 2.4-6.8 degrees to half power) on the backdrop's open side,
    its strength set for an irradiance E at normal incidence (strength = E (p + 1) / 2 pi). Else
    Blender's studio HDRI."""
    if rng.random() < 0.25 and "studio.exr" in hdris:
        return _hdri_lighting(rng, ["studio.exr"])

    def box(azimuth, elevation, irradiance):
        az, el = turn + math.radians(rng.uniform(*azimuth)), math.radians(rng.uniform(*elevation))
        power = math.exp(rng.uniform(math.log(40), math.log(400)))
        gel = rng.random() < 0.2
        return {"color": _color(rng, (0.3, 0.7) if gel else (0.0, 0.12), (1.0, 1.0)),
                "direction": [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)],
                "power": power, "strength": rng.uniform(*irradiance) * (power + 1) / (2 * math.pi)}

    boxes = [box((20, 160), (20, 60), (1.5, 3.0))]  # key
    if rng.random() < 0.7:
        boxes.append(box((20, 160), (5, 40), (0.3, 1.0)))  # fill
    if rng.random() < 0.5:
        boxes.append(box((0, 360), (60, 88), (0.5, 1.5)))  # top
    if rng.random() < 0.5:
        boxes.append(box(rng.choice(((5, 40), (140, 175))), (15, 45), (0.5, 1.5)))  # rim
    grey = rng.uniform(0.01, 0.06)
    return {"type": "studio", "hdri": "softboxes", "ground": _color(rng, (0, 0.1), (grey * 0.3, grey * 0.6)),
            "horizon": _color(rng, (0, 0.1), (grey, grey)), "zenith": _color(rng, (0, 0.1), (grey, grey * 1.5)),
            "boxes": boxes}


_FAMILY_MAKERS = {"ground": _ground_family, "glossy-ground": _glossy_ground_family, "single": _single_family,
                  "room": _room_family, "thin-concave": _thin_concave_family, "studio": _studio_family}


def view_location(description: dict, view: int, seed: int, centre, radius: float, half_fov: float) -> list[float]:
    """Camera location of view ``view`` of a scene whose description has "camera" (room, studio).

    As the orbit views of addon.dataset (a seeded draw per view, the distance that fits the objects'
    bounding sphere, grown by the description's "fit", in the field of view, looking at its centre),
    but azimuth and elevation drawn from the description's ranges, and redrawn (up to 20 times, then
    the middle of the ranges) while a wall stands between the camera and the centre."""
    ranges = description["camera"]
    rng = random.Random(f"{seed}:view:{view}")
    distance = radius * ranges.get("fit", 1.0) / math.sin(half_fov) * 1.05
    for attempt in range(21):
        if attempt < 20:
            az, el = rng.uniform(*ranges["azimuth"]), rng.uniform(*ranges["elevation"])
        else:
            az, el = sum(ranges["azimuth"]) / 2, sum(ranges["elevation"]) / 2
        direction = [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
        location = [c + distance * d for c, d in zip(centre, direction, strict=True)]
        if not any(wall_blocks(wall, location, centre) for wall in description.get("walls", [])):
            break
    return location


def wall_blocks(wall: dict, a, b, margin: float = 0.1) -> bool:
    """Whether a camera at ``a`` looking at ``b`` (on the wall's inner side) has the wall rectangle in the
    way: the segment a-b crosses the wall's plane moved ``margin`` inwards, within the rectangle grown by
    ``margin`` (so a camera just in front of a wall counts too)."""
    o, u, v = wall["origin"], wall["u"], wall["v"]
    n = [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]

    def dot(p, q):
        return sum(x * y for x, y in zip(p, q, strict=True))

    length = math.sqrt(dot(n, n))
    side_a, side_b = (dot(n, [p[i] - o[i] for i in range(3)]) / length for p in (a, b))
    if side_a >= margin or side_b <= margin:
        return False
    t = (margin - side_a) / (side_b - side_a)
    p = [a[i] + t * (b[i] - a[i]) - o[i] for i in range(3)]
    s_u, s_v = dot(p, u) / dot(u, u), dot(p, v) / dot(v, v)
    grow_u, grow_v = margin / math.sqrt(dot(u, u)), margin / math.sqrt(dot(v, v))
    return -grow_u <= s_u <= 1 + grow_u and -grow_v <= s_v <= 1 + grow_v


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
    if description.get("ground") is not None:
        _ground(scene, description["ground"])
    for i, wall in enumerate(description.get("walls", [])):
        _wall(scene, i, wall)
    if description.get("backdrop"):
        _backdrop(scene, description["backdrop"])
    for i, spec in enumerate(description["objects"]):
        _object(scene, i, spec)["pbnds_object"] = True  # what views frame (add_views)
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


def _wall(scene, index, spec):
    """A rectangle: corner ``origin``, edges ``u`` and ``v``, facing u x v (into the room)."""
    import bpy
    from mathutils import Vector

    o, u, v = (Vector(spec[key]) for key in ("origin", "u", "v"))
    mesh = bpy.data.meshes.new(f"Wall {spec['name']}")
    mesh.from_pydata([o, o + u, o + u + v, o + v], [], [(0, 1, 2, 3)])
    _link(scene, f"Wall {spec['name']}", mesh, make_material(spec["material"], f"Wall {index}"))


def _backdrop(scene, spec):
    """A seamless backdrop: a floor from y = front to y = -back curving up (radius ``radius``) into a wall
    up to ``height``, 2 x ``half_width`` wide along x, turned by ``rotation_z``. Smooth-shaded, with
    short rows at each end of the curve so the floor and the wall stay flat."""
    import bpy
    from mathutils import Matrix

    back, r, h, w = spec["back"], spec["radius"], spec["height"], spec["half_width"]
    profile = [(spec["front"], 0.0), (-back + 0.2, 0.0)]  # (y, z) from the front edge up to the top
    profile += [(-back + r * math.cos(a), r + r * math.sin(a))
                for a in (-math.pi / 2 - math.pi / 2 * k / 12 for k in range(13))]
    profile += [(-back - r, r + 0.2), (-back - r, h)]
    verts = [(x, y, z) for y, z in profile for x in (-w, w)]
    faces = [(2 * i, 2 * i + 2, 2 * i + 3, 2 * i + 1) for i in range(len(profile) - 1)]  # facing up, then +y
    mesh = bpy.data.meshes.new("Backdrop")
    mesh.from_pydata(verts, [], faces)
    mesh.transform(Matrix.Rotation(spec["rotation_z"], 4, "Z"))
    mesh.shade_smooth()
    _link(scene, "Backdrop", mesh, make_material(spec["material"], "Backdrop"))


def add_views(scene, description, views: int, seed: int, aspect: float = 1.0):
    """Cameras "View 000", ... for a description with "camera" (room, studio), replacing the scene's
    placeholder camera: render them with export_dataset(orbit=False) at width / height = ``aspect``. Placed
    by :func:`view_location` around the bounding sphere of the description's objects (the walls and
    backdrop left out)."""
    import bpy
    from mathutils import Vector

    bpy.context.view_layer.update()
    corners = [ob.matrix_world @ Vector(c) for ob in scene.objects if ob.get("pbnds_object") for c in ob.bound_box]
    lo = Vector([min(c[i] for c in corners) for i in range(3)])
    hi = Vector([max(c[i] for c in corners) for i in range(3)])
    centre, radius = (lo + hi) / 2, max((hi - lo).length / 2, 1e-3)
    data = scene.camera.data  # data.angle spans the larger image side (sensor fit AUTO): fit the smaller
    half_fov = math.atan(math.tan(data.angle / 2) * min(aspect, 1 / aspect))
    bpy.data.objects.remove(scene.camera)
    cameras = []
    for view in range(views):
        location = Vector(view_location(description, view, seed, list(centre), radius, half_fov))
        cam = bpy.data.objects.new(f"View {view:03d}", data)
        cam.location = location
        cam.rotation_euler = (centre - location).to_track_quat("-Z", "Y").to_euler()
        scene.collection.objects.link(cam)
        cameras.append(cam)
    scene.camera = cameras[0]
    return cameras


def _open_shell(bm, thickness):
    """Give an open surface a wall ``thickness`` thick (bmesh's solidify: a second, offset skin and a rim)."""
    import bmesh

    bmesh.ops.solidify(bm, geom=bm.faces[:], thickness=thickness)


def _torus(mesh, major=0.7, minor=0.3, rings=48, sides=24):
    """A torus about Z whose faces wind counter-clockwise seen from outside: its normals point outwards, as
    Blender's own primitives' do."""
    verts, faces = [], []
    for i in range(rings):
        a = 2 * math.pi * i / rings
        for j in range(sides):
            b = 2 * math.pi * j / sides
            r = major + minor * math.cos(b)
            verts.append((r * math.cos(a), r * math.sin(a), minor * math.sin(b)))
            faces.append((i * sides + j, ((i + 1) % rings) * sides + j, ((i + 1) % rings) * sides + (j + 1) % sides,
                          i * sides + (j + 1) % sides))
    mesh.from_pydata(verts, [], faces)


def _object(scene, index, spec):
    import bmesh
    import bpy
    from mathutils import Matrix

    kind = spec["kind"]
    mesh = bpy.data.meshes.new(f"{kind}.{index}")
    if kind == "torus":
        _torus(mesh)
    elif kind == "ring":
        _torus(mesh, 1.0, spec["minor"], rings=64, sides=16)
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
        elif kind == "bowl":  # a hemisphere, open at the top
            bmesh.ops.create_uvsphere(bm, u_segments=48, v_segments=24, radius=1.0)
            bmesh.ops.delete(bm, geom=[v for v in bm.verts if v.co.z > 1e-4], context="VERTS")
            bmesh.ops.scale(bm, vec=(1.0, 1.0, spec["depth"]), verts=bm.verts[:])
            _open_shell(bm, spec["thickness"] * 2.0)
        elif kind in ("cup", "tube"):  # a cylinder without its top cap (cup) or without caps (tube)
            depth = spec["height"] * 2.0
            bmesh.ops.create_cone(bm, cap_ends=kind == "cup", segments=48, radius1=1.0, radius2=1.0, depth=depth)
            if kind == "cup":
                bmesh.ops.delete(bm, geom=[f for f in bm.faces if f.calc_center_median().z > depth / 2 - 1e-4],
                                 context="FACES_ONLY")
            _open_shell(bm, spec["thickness"] * max(2.0, depth))
        elif kind == "plank":  # height 1 along z, `width` along x, `thickness` along y
            bmesh.ops.create_cube(bm, size=1.0)
            bmesh.ops.scale(bm, vec=(spec["width"], spec["thickness"], 1.0), verts=bm.verts[:])
        elif kind == "suzanne":
            bmesh.ops.create_monkey(bm)
            bmesh.ops.subdivide_edges(bm, edges=bm.edges[:], cuts=1, use_grid_fill=True, smooth=1.0)
        else:  # blob: an icosphere displaced along its normals by a noise texture
            bmesh.ops.create_icosphere(bm, subdivisions=4, radius=1.0)
        bm.to_mesh(mesh)
        bm.free()
    if kind in ("cube", "bevel_box", "plank"):
        mesh.shade_flat()
    else:
        mesh.shade_smooth()
        if kind in ("cylinder", "cone", "bowl", "cup", "tube"):  # sharp rims around smooth sides
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
    elif kind == "studio":
        _studio(tree, coords, background, lighting)
        info["strength"] = 1.0
    else:
        _gradient(tree, coords, background, lighting)
        info["strength"] = 1.0
    background.inputs["Strength"].default_value = info["strength"]
    world["pbnds_world"] = info
    return world


def _gradient(tree, coords, background, lighting):
    """ramp(d.z) + key colour x key_strength x max(d . key_direction, 0) ^ key_power."""
    color = _ramp(tree, coords, lighting)
    color = _add_lobe(tree, coords, color, lighting["key"], lighting["key_direction"], lighting["key_power"],
                      lighting["key_strength"])
    tree.links.new(color, background.inputs["Color"])


def _studio(tree, coords, background, lighting):
    """ramp(d.z) + sum over the boxes of colour x strength x max(d . direction, 0) ^ power."""
    color = _ramp(tree, coords, lighting)
    for box in lighting["boxes"]:
        color = _add_lobe(tree, coords, color, box["color"], box["direction"], box["power"], box["strength"])
    tree.links.new(color, background.inputs["Color"])


def _ramp(tree, coords, lighting):
    """The ground/horizon/zenith colour ramp over d.z (stops at 0.45, 0.5, 1 of (z + 1) / 2)."""
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
    return colors.outputs["Color"]


def _add_lobe(tree, coords, color, lobe_color, direction, power, strength):
    """``color`` + lobe_color x strength x max(d . direction, 0) ^ power (an output socket)."""
    dot = tree.nodes.new("ShaderNodeVectorMath")
    dot.operation = "DOT_PRODUCT"
    tree.links.new(coords.outputs["Generated"], dot.inputs[0])
    dot.inputs[1].default_value = direction
    lobe = dot.outputs["Value"]
    for operation, value in (("MAXIMUM", 0.0), ("POWER", power), ("MULTIPLY", strength)):
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
    tree.links.new(color, inputs[1])
    inputs[2].default_value = (*lobe_color, 1.0)
    return mix.outputs[2]
