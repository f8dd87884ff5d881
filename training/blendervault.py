"""`pbnds export FOLDER OUT`: our dataset from a folder of arbitrary .blend files (BlenderVault-style).

Each file is one task (training.datagen runs it in its own process): open it, make it something the
exporter and the job contract can represent, then addon.dataset.export_dataset with orbit views and
random HDRIs. What is done to a file, after MaterialFusion's render script (docs/design.md section 8):
- skipped (reported, the run goes on): over 500 MB, more than 100 renderable objects or more than
  100 materials, image textures whose files are missing, files Blender cannot open, no geometry;
- animation data is cleared (the current frame's pose stays) and the root objects are moved and
  scaled so the renderable geometry's bounding box is centred at the origin with largest extent 1;
- lights are hidden from the render and the world is replaced: the job's lighting is the HDRI only,
  so nothing else may light the ground truth;
- materials: a Principled BSDF keeps its base colour, metallic, roughness, Specular IOR Level and
  normal, with transmission, sheen, subsurface, coat and emission zeroed and alpha 1; a Diffuse
  BSDF becomes a Principled with roughness 0.25; Glossy and Anisotropic BSDFs a Principled with
  metallic = 1 - roughness (1 when the roughness is textured); a Metallic BSDF a Principled metal;
  any other shader (glass, emission, translucent, toon, hair, holdout...) a grey dielectric
  (base 0.5, roughness 0.5); an Add Shader keeps its first input (as the G-buffer reads it);
  volumes are unlinked; meshes without a material get the grey one. Mix Shaders stay: the G-buffer
  mixes the two sides' parameters by the factor, a first-order match of what Cycles renders.
The split of a file (train/val/test) is drawn from a hash of its path, so it never changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

MAX_BYTES = 500 * 1024**2
MAX_OBJECTS = 100
MAX_MATERIALS = 100
GEOMETRY = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES", "POINTCLOUD"}
_ZEROED = ("Transmission Weight", "Sheen Weight", "Subsurface Weight", "Coat Weight", "Emission Strength")
_GLOSSY = {"ShaderNodeBsdfGlossy", "ShaderNodeBsdfAnisotropic"}


class Unsupported(Exception):
    """A file this exporter skips on purpose; the message is the reason."""


def _stable_unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def export_folder(args) -> dict:
    """Plan, run and summarise an export (the `pbnds export` command)."""
    from .datagen import render_settings, run_tasks, scene_complete, write_splits

    folder, out = args.folder.resolve(), args.out.resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    render = render_settings(args)
    tasks = []
    for path in sorted(folder.rglob("*.blend")):
        rel = path.relative_to(folder).with_suffix("").as_posix()
        u = _stable_unit(f"{args.seed}:{rel}")
        split = "test" if u < args.test_fraction else "val" if u < args.test_fraction + args.val_fraction else "train"
        tasks.append({"kind": "blend", "blend": str(path), "folder": f"{split}/{rel}",
                      "split": split, "seed": int(u * 1e9), "views": args.views, "lightings": args.hdris,
                      "samples": args.views * args.hdris, "render": render,
                      "low_samples": render["low_samples"] if split == "test" else []})
    done = {t["folder"] for t in tasks if scene_complete(out / t["folder"], t["samples"], t["low_samples"])}
    summary = {"files": len(tasks), "already_done": len(done), "exported": [], "skipped": [], "failed": []}

    def record():
        write_splits(out, {split: [t["folder"] for t in tasks if t["split"] == split and t["folder"] in done]
                           for split in ("train", "val", "test")})

    def on_result(task, result):
        name = str(Path(task["blend"]).relative_to(folder))
        if result.get("ok"):
            done.add(task["folder"])
            summary["exported"].append(name)
            record()
        elif result.get("skipped"):
            summary["skipped"].append({"file": name, "reason": result["skipped"]})
        else:
            summary["failed"].append({"file": name, "error": result.get("error")})

    record()
    start = time.perf_counter()
    run_tasks([t for t in tasks if t["folder"] not in done], out, args.workers, args.timeout, "export", on_result)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "export_report.json").write_text(json.dumps(summary, indent=1))
    return summary


# --- inside a worker process ------------------------------------------------------------------------

def export_file(task: dict) -> dict:
    """Open one .blend, prepare it and export its samples; ``{"ok"}`` or ``{"skipped": reason}``."""
    import bpy

    from addon import dataset

    from . import scenes
    from .datagen import hdri_folder, training_hdris

    path = Path(task["blend"])
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise Unsupported(f"file is {size / 1024**2:.0f} MB (limit {MAX_BYTES // 1024**2} MB)")
        try:
            bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False)
        except RuntimeError as error:
            raise Unsupported(f"Blender cannot open it: {str(error).strip().splitlines()[-1]}") from None
        scene = bpy.context.scene
        report = prepare(scene, task["render"]["threads"])
    except Unsupported as reason:
        return {"ok": False, "skipped": str(reason)}
    rng = random.Random(f"pbnds-export:{task['seed']}")
    lightings = [{"type": "hdri", "hdri": rng.choice(training_hdris()), "rotation_z": rng.uniform(0, 2 * math.pi),
                  "exposure": 1.0} for _ in range(task["lightings"])]
    worlds = [scenes.make_world(lighting, hdri_folder(), f"PBNDS Lighting {i}") for i, lighting in
              enumerate(lightings)]
    folder = Path(task["out"]) / task["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "export.json").write_text(json.dumps({"blend": str(path), **report, "lightings": lightings}, indent=1))
    render = task["render"]
    dataset.export_dataset(scene, folder, views=task["views"], hdris=worlds, width=render["size"],
                           height=render["size"], gt_samples=render["gt_samples"], denoise=render["denoise"],
                           gbuffer_samples=render["gbuffer_samples"], seed=task["seed"],
                           hdri_width=render["hdri_width"], low_samples=task["low_samples"],
                           filter_width=render.get("filter_width", 0.01))
    return {"ok": True, "rendered": task["samples"]}


def prepare(scene, threads: int = 0) -> dict:
    """Check and normalise the open file's ``scene`` (module docstring); return what was changed."""
    import bpy

    renderable = [ob for ob in scene.objects if ob.type in GEOMETRY and not ob.hide_render]
    if not renderable:
        raise Unsupported("no renderable geometry")
    if len(renderable) > MAX_OBJECTS:
        raise Unsupported(f"{len(renderable)} renderable objects (limit {MAX_OBJECTS})")
    if len(bpy.data.materials) > MAX_MATERIALS:
        raise Unsupported(f"{len(bpy.data.materials)} materials (limit {MAX_MATERIALS})")
    missing = sorted(image.name for image in bpy.data.images
                     if image.source in {"FILE", "SEQUENCE", "TILED"} and image.packed_file is None
                     and not Path(bpy.path.abspath(image.filepath, library=image.library)).exists())
    if missing:
        raise Unsupported(f"missing textures: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for ob in scene.objects:
        ob.animation_data_clear()
    scale, centre = _normalise(scene, renderable)
    lights = [ob for ob in scene.objects if ob.type == "LIGHT" and not ob.hide_render]
    for ob in lights:
        ob.hide_render = True
    replaced = neutralise_materials()
    bare = [ob for ob in renderable if ob.type == "MESH" and not any(slot.material for slot in ob.material_slots)]
    if bare:
        grey = _grey_material()
        for ob in bare:
            ob.data.materials.clear()
            ob.data.materials.append(grey)
    camera = bpy.data.objects.new("PBNDS Camera", bpy.data.cameras.new("PBNDS Camera"))
    scene.collection.objects.link(camera)
    scene.camera = camera
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.render.threads_mode = "FIXED" if threads else "AUTO"
    scene.render.threads = max(1, threads)
    return {"scale": scale, "centre": centre, "hidden_lights": len(lights), "replaced_nodes": replaced,
            "grey_material_objects": len(bare)}


def _normalise(scene, renderable):
    import bpy
    from mathutils import Matrix, Vector

    depsgraph = bpy.context.evaluated_depsgraph_get()
    corners = [ob.evaluated_get(depsgraph).matrix_world @ Vector(c) for ob in renderable
               for c in ob.evaluated_get(depsgraph).bound_box]
    lo = Vector([min(c[i] for c in corners) for i in range(3)])
    hi = Vector([max(c[i] for c in corners) for i in range(3)])
    extent = max(hi - lo)
    if not math.isfinite(extent) or extent <= 1e-9:
        raise Unsupported("the geometry has no extent")
    centre = (lo + hi) / 2
    transform = Matrix.Scale(1 / extent, 4) @ Matrix.Translation(-centre)
    for ob in scene.objects:
        if ob.parent is None:
            ob.matrix_world = transform @ ob.matrix_world
    return 1 / extent, list(centre)


def _grey_material():
    import bpy

    material = bpy.data.materials.new("PBNDS Grey")
    bsdf = material.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (0.5, 0.5, 0.5, 1.0)
    bsdf.inputs["Roughness"].default_value = 0.5
    return material


def _set(socket, value):
    for link in list(socket.links):
        socket.id_data.links.remove(link)
    socket.default_value = value


def _carry(tree, source, target):
    """Give ``target`` the link or the value of ``source`` (an input socket)."""
    if source.is_linked:
        tree.links.new(source.links[0].from_socket, target)
    elif hasattr(target.default_value, "__len__") == hasattr(source.default_value, "__len__"):
        target.default_value = source.default_value


def _principled(tree, node, base=None, roughness=0.5, metallic=0.0):
    """Replace shader ``node`` by a Principled BSDF; ``base``/``roughness`` are sockets or values."""
    new = tree.nodes.new("ShaderNodeBsdfPrincipled")
    new.location = node.location
    if base is None:
        new.inputs["Base Color"].default_value = (0.5, 0.5, 0.5, 1.0)
    else:
        _carry(tree, base, new.inputs["Base Color"])
    if isinstance(roughness, float):
        new.inputs["Roughness"].default_value = roughness
    else:
        _carry(tree, roughness, new.inputs["Roughness"])
    new.inputs["Metallic"].default_value = metallic
    if "Normal" in node.inputs and node.inputs["Normal"].is_linked:
        _carry(tree, node.inputs["Normal"], new.inputs["Normal"])
    for output in node.outputs:
        for link in list(output.links):
            tree.links.new(new.outputs["BSDF"], link.to_socket)
    tree.nodes.remove(node)


def neutralise_materials() -> dict[str, int]:
    """Rewrite every material and shader node group as the module docstring says; count replaced nodes."""
    import bpy

    trees = [m.node_tree for m in bpy.data.materials if m.node_tree is not None]
    trees += [g for g in bpy.data.node_groups if g.bl_idname == "ShaderNodeTree"]
    replaced: dict[str, int] = {}
    for tree in trees:
        for node in list(tree.nodes):
            kind = node.bl_idname
            shader = (kind.startswith("ShaderNode") and kind not in {"ShaderNodeGroup", "ShaderNodeMixShader"}
                      and any(s.type == "SHADER" for s in node.outputs))
            if kind == "ShaderNodeBsdfPrincipled":
                for name in _ZEROED:
                    _set(node.inputs[name], 0.0)
                _set(node.inputs["Alpha"], 1.0)
                continue
            if kind == "ShaderNodeOutputMaterial":
                for link in list(node.inputs["Volume"].links):
                    tree.links.remove(link)
                continue
            if not shader:
                continue
            replaced[kind] = replaced.get(kind, 0) + 1
            if kind == "ShaderNodeAddShader":
                first = node.inputs[0].links[0].from_socket if node.inputs[0].is_linked else None
                for link in list(node.outputs[0].links):
                    if first is not None:
                        tree.links.new(first, link.to_socket)
                    else:
                        tree.links.remove(link)
                tree.nodes.remove(node)
            elif kind == "ShaderNodeBsdfDiffuse":
                _principled(tree, node, node.inputs["Color"], 0.25)
            elif kind in _GLOSSY:
                rough = node.inputs["Roughness"]
                metallic = 1.0 if rough.is_linked else 1 - rough.default_value
                _principled(tree, node, node.inputs["Color"], rough, metallic)
            elif kind == "ShaderNodeBsdfMetallic":
                _principled(tree, node, node.inputs["Base Color"], node.inputs["Roughness"], 1.0)
            else:
                _principled(tree, node)
    return replaced
