"""Blender's light objects as the job's `lights` list (docs/job-format.md, version 2), and warnings.

Units are those Cycles renders (Blender 5.0). Cycles' strength is
``S = colour x temperature colour (when Use Temperature) x Power x 2^Exposure`` (Blender 4.2 lights
have neither temperature nor exposure, and its area lights are always normalised: addon/compat.py),
and each conversion below was measured against Cycles renders (bpy 5.0.1, a diffuse plane of albedo 0.8,
max_bounces 0, black world): the rendered radiance over 1024 pixels divided by albedo / pi x E
predicted from the exported entry.

- sun: ``irradiance = S`` (W/m^2 on a surface facing the sun), ``angle`` as is; ratio 1.0000
  for a sharp sun at 30 degrees and for a 20-degree sun with exposure 1.
- point: ``intensity = S / 4pi`` (W/sr), ``radius`` = the light's radius, not scaled by the object
  (scale 0.5 and 2 changed nothing); E = I cos / d^2, ratio 1.000 for radius 0.1 and 0.5. With
  "Soft Falloff" (the default) Cycles renders E = I cos / (d^2 + r^2) (ratio 1.0000): exported
  as ``soft_falloff`` (a disc of the radius facing the surface, which gives exactly that).
- spot: as a point, plus ``spot_size``, ``spot_blend`` as is and ``direction`` = the object's -Z.
  Measured attenuation: smoothstep((cos a - cos(size/2)) / ((1 - cos(size/2)) x blend)) with no
  extra cosine (ratio 1.000 at 60/0.5, 40/0, 90/1; with an extra cosine it was 1.03-1.16).
  Uniform object scale changes nothing; a non-uniform one makes the cone elliptic (warned).
- area: ``radiance = S / (pi A)`` with A the scaled area (x y size, x pi/4 for disk and ellipse),
  or ``S / pi`` when "Normalize" is off; object scale multiplies the size. Ratio 1.0000 (square,
  2x-scaled rectangle, unnormalised squares of 1 and 4 m^2) and 1.0009 (disk, ellipse: the grid
  of the numerical integral). ``spread`` goes as is: Cycles emits radiance x g(a) at angle a from
  the normal, g = max(0, tan(s/2) - tan a) / (tan(s/2) - s/2) (3 / (s/2)^3 for s/2 <= 0.05) for
  s < pi, 1 for s = pi; measured at 60 and 5 degrees, ratio 1.000 to that shape, which
  backend/lights.py applies to the same ``radiance``.
- Diffuse/Specular/Volume factors and custom distance are EEVEE settings: Cycles ignores them
  (a diffuse factor of 0.5 rendered at full strength), so they are not exported and not warned.
  Portal area lights emit nothing and are skipped.

Lights are read from the depsgraph's object instances, so instanced collections and geometry-node
instances count. A viewport depsgraph (export_job's) also holds objects hidden from renders: those
are dropped here by their own, their instancer's and their collections' render visibility. It lacks
lights hidden only in the viewport, which a render shows: those are named in a warning.
Everything the job cannot carry becomes a warning naming the object, never silence.
"""

import math

import numpy as np

from . import compat
from .world import source_socket

_SHAPES = {"SQUARE": "rectangle", "RECTANGLE": "rectangle", "DISK": "ellipse", "ELLIPSE": "ellipse"}
_VISIBILITY = ("visible_diffuse", "visible_glossy", "visible_transmission", "visible_volume_scatter")


def export_lights(scene, depsgraph):
    """(lights, warnings): the contract's entries for the lights Cycles would render, and messages.

    ``depsgraph`` is evaluated at the frame to export (a render depsgraph, or a view layer's).
    """
    hidden = _hidden_collections(depsgraph.view_layer) if depsgraph.mode == "VIEWPORT" else None
    lights, warnings = [], []
    materials, seen = {}, set()
    for inst in depsgraph.object_instances:
        obj = inst.object
        if hidden is not None and not _renders(inst, hidden):
            continue
        seen.add(obj.original.name)
        name = obj.name if not inst.is_instance else f"{obj.name} (instanced by {inst.parent.name})"
        _linking_warnings(obj, name, warnings)
        if obj.type == "LIGHT":
            entry = _light_entry(obj, np.array(inst.matrix_world, np.float64), name, warnings)
            if entry is not None:
                lights.append(entry)
        elif obj.type == "VOLUME":
            warnings.append(f"volume object '{name}' is not shaded by PBNDS (no volumes in the job)")
        else:
            for slot in obj.material_slots:
                _material_warnings(slot.material, name, materials, warnings)
    _world_warnings(scene.world, warnings)
    if hidden is not None:
        warnings += [f"light '{obj.name}' is hidden in the viewport: not exported (unhide it to light the job)"
                     for obj in scene.objects if obj.type == "LIGHT" and obj.name not in seen
                     and not obj.hide_render and not _in_hidden(obj, hidden)]
    return lights, list(dict.fromkeys(warnings))


def _strength(light):
    colour = np.array(light.color, np.float64) * np.array(compat.light_temperature_colour(light), np.float64)
    return colour * light.energy * 2.0 ** compat.light_exposure(light)


def _unit(v):
    return (v / np.linalg.norm(v)).tolist()


def _light_entry(obj, matrix, name, warnings):
    """The contract's entry for one light instance, or None (a portal, a negative light)."""
    light = obj.data
    if light.type == "AREA" and light.cycles.is_portal:
        return None
    if light.energy < 0 or min(light.color) < 0:
        warnings.append(f"light '{name}' has negative power: not exported")
        return None
    if light.use_nodes and light.node_tree is not None:
        warnings.append(f"light '{name}' uses a node tree (emission shader, IES or texture): "
                        "exported with its colour and power only")
    if not light.use_shadow:
        warnings.append(f"light '{name}' casts no shadow in Cycles; PBNDS shadows it")
    tweaks = [attr for attr in _VISIBILITY if not getattr(obj, attr)]
    if tweaks:
        warnings.append(f"light '{name}' has ray visibility turned off ({', '.join(tweaks)}): "
                        "exported as fully visible")
    strength = _strength(light)
    axes = matrix[:3, :3]
    position = matrix[:3, 3].tolist()
    if light.type == "SUN":
        return {"type": "sun", "name": name, "direction": _unit(axes[:, 2]), "irradiance": strength.tolist(),
                "angle": float(min(light.angle, math.pi))}
    if light.type in {"POINT", "SPOT"}:
        entry = {"type": "point", "name": name, "position": position,
                 "intensity": (strength / (4 * math.pi)).tolist(), "radius": float(light.shadow_soft_size),
                 "soft_falloff": bool(light.use_soft_falloff)}
        if light.type == "POINT":
            return entry
        scale = np.linalg.norm(axes, axis=0)
        if np.ptp(scale) > 1e-4 * scale.max():
            warnings.append(f"spot light '{name}' has a non-uniform scale: Cycles renders an elliptic cone, "
                            "exported as a round one")
        return {**entry, "type": "spot", "direction": _unit(-axes[:, 2]), "spot_size": float(light.spot_size),
                "spot_blend": float(light.spot_blend)}
    return _area_entry(light, axes, position, strength, name)


def _area_entry(light, axes, position, strength, name):
    shape = _SHAPES[light.shape]
    scale = np.linalg.norm(axes[:, :2], axis=0)
    size_y = light.size_y if light.shape in {"RECTANGLE", "ELLIPSE"} else light.size
    size = np.array([light.size, size_y]) * scale
    area = size[0] * size[1] * (math.pi / 4 if shape == "ellipse" else 1.0)
    radiance = strength / (math.pi * area) if compat.area_normalize(light) else strength / math.pi
    return {"type": "area", "name": name, "position": position, "axes": [_unit(axes[:, 0]), _unit(axes[:, 1])],
            "normal": _unit(-axes[:, 2]), "size": size.tolist(), "shape": shape, "radiance": radiance.tolist(),
            "spread": float(min(light.spread, math.pi))}


# --- what the job cannot carry --------------------------------------------------------------------

def _linking_warnings(obj, name, warnings):
    linking = getattr(obj, "light_linking", None)
    if linking is None:
        return
    if linking.receiver_collection is not None:
        warnings.append(f"'{name}' uses light linking: PBNDS lights every object with every light")
    if linking.blocker_collection is not None:
        warnings.append(f"'{name}' uses shadow linking: PBNDS ignores it")


def _material_warnings(material, name, cache, warnings):
    if material is None:
        return
    if material.name not in cache:
        cache[material.name] = _material_problems(material)
    warnings.extend(f"'{name}' {problem} (material '{material.name}')" for problem in cache[material.name])


def _material_problems(material):
    tree = material.node_tree
    if tree is None:
        return []
    problems = []
    if _tree_emits(tree, set()):
        problems.append("is emissive: its light is not part of the job (only light objects and the world light)")
    output = tree.get_output_node("CYCLES")
    if output is not None and source_socket(output.inputs["Volume"]) is not None:
        problems.append("has a volume shader, which PBNDS does not shade")
    return problems


def _nonzero(socket):
    if source_socket(socket) is not None:
        return True
    value = socket.default_value
    return any(v > 0 for v in value[:3]) if hasattr(value, "__len__") else value > 0


def _tree_emits(tree, seen):
    """Whether an Emission node or a Principled BSDF with emission is in ``tree`` or its groups."""
    seen.add(tree.as_pointer())
    for node in tree.nodes:
        if node.mute:
            continue
        if node.bl_idname == "ShaderNodeEmission":
            if _nonzero(node.inputs["Strength"]) and _nonzero(node.inputs["Color"]):
                return True
        elif node.bl_idname == "ShaderNodeBsdfPrincipled":
            if _nonzero(node.inputs["Emission Strength"]) and _nonzero(node.inputs["Emission Color"]):
                return True
        elif (node.bl_idname == "ShaderNodeGroup" and node.node_tree is not None
              and node.node_tree.as_pointer() not in seen and _tree_emits(node.node_tree, seen)):
            return True
    return False


def _world_warnings(world, warnings):
    tree = world.node_tree if world is not None else None
    output = tree.get_output_node("CYCLES") if tree is not None else None
    if output is not None and source_socket(output.inputs["Volume"]) is not None:
        warnings.append(f"world '{world.name}' has a volume shader, which PBNDS does not shade")


# --- render visibility in a viewport depsgraph ----------------------------------------------------

def _hidden_collections(view_layer):
    """Pointers of the collections a render leaves out: hidden for renders, excluded, or inside one."""
    hidden = set()

    def walk(layer_collection, parent_hidden):
        collection = layer_collection.collection
        off = parent_hidden or collection.hide_render or layer_collection.exclude
        if off:
            hidden.add(collection.as_pointer())
        for child in layer_collection.children:
            walk(child, off)

    for child in view_layer.layer_collection.children:
        walk(child, False)
    return hidden


def _renders(inst, hidden):
    """Whether a render shows ``inst``: its object and its instancer are rendered."""
    objects = [inst.object] + ([inst.parent] if inst.is_instance and inst.parent is not None else [])
    for obj in objects:
        original = obj.original
        if original.hide_render:
            return False
        if inst.is_instance and obj is inst.object:
            continue  # an instanced object's own collection is the instanced one, not a scene's
        if _in_hidden(original, hidden):
            return False
    return True


def _in_hidden(obj, hidden):
    return all(c.as_pointer() in hidden for c in obj.users_collection)
