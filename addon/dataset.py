"""Export a training dataset from a scene: job folders plus Cycles ground truth.

Layout of ``out_dir``::

    dataset.json                 the index (below), rewritten after every sample
    v000_h00/                    one sample: view 0 lit by HDRI 0
        job.json gbuffer.exr hdri.exr   a job exactly as gbuffer.export_job writes it
        gt_full.exr              Cycles render, linear float RGB (R, G, B), opaque film: the world
                                 is behind the objects (the loader zeroes it, as in the backend's result)
        gt_unshadowed.exr        the same with shadow rays off (``visible_shadow = False`` on
                                 every object): the stage-one target of the neural shader

        cycles_low_<N>spp.exr    optional: Cycles at N samples with OpenImageDenoise, same camera and
                                 world, timed: the equal-time peer of the neural shader

``dataset.json``: ``{"format": "pbnds-dataset", "version": 1, "scene", "blend", "seed", "width",
"height", "gt_samples", "gbuffer_samples", "denoise", "filter_width", "samples": [{"name", "view", "hdri" (file
path, or null for a world), "rotation_z" (radians, the Mapping rotation of the HDRI world),
"world" (what lit it: a world's ``pbnds_world`` custom property if it has one, else
{"type": "hdri", "hdri", "rotation_z"} or {"type": "world", "name"}), "job", "gt_full",
"gt_unshadowed", optional "cycles_low": [{"samples", "denoise", "file", "seconds", "cpu_seconds"}]
(wall and process CPU time of the render call, scene sync included) and "frame" (with
``sequence``)}]}``, paths relative to ``out_dir``.

Lighting: each entry of ``hdris`` is None (the scene's world), an HDRI file path (an Environment
Texture world rotated about Z at random per sample) or a ``bpy.types.World`` used as it is, with the
light objects that belong to it (:func:`select_lamps`). With
``sequence=True`` the entries are consecutive frames of one animation and each sample records its
index as "frame".

Views: with ``orbit=True`` a temporary camera (a copy of the scene camera's data) looks at the
centre of the scene's renderable meshes from a random azimuth and an elevation of 10-60 degrees, at
the distance that fits their bounding sphere in the field of view; flat meshes (ground planes) are
left out of the framing when anything else is there. With ``orbit=False`` view i is the scene's
i-th camera by name. Everything is drawn from ``seed`` (and Cycles' seed from it too), so a run is
reproducible; a sample whose files exist is skipped (its cycles_low timings are kept from the previous
dataset.json), so a run is resumable.
Pixel filter: by default (``filter_width`` 0.01) the ground truth uses the G-buffer's ~0-wide pixel
filter, so both see the same pixel centres and edges are aliased alike: what training wants. With
Cycles' own 1.5 px (what users render) the ground truth's edges are anti-aliased and the G-buffer's
coverage layer is rendered with the same filter, so evaluation compares the anti-aliased image a user
gets with the one Cycles gives.
Denoised silhouettes: the film is opaque and the denoiser's albedo and normal guides are not
prefiltered. With the ~0-wide filter the guides are exact (every sample of a pixel hits the same
point), and OpenImageDenoise otherwise blends the background into the objects' outermost pixels. On
the spheres without their ground at 64x64 and 64 samples, their median against the same render
without denoising was 0.84 with a transparent film (the black background), 0.92 opaque with
prefiltered guides, and 1.01 as done here (tests/blender/test_dataset.py). Mask the ground truth
with the G-buffer's mask: the world is behind the objects.
"""

import json
import math
import random
import time
from pathlib import Path

import bpy
from mathutils import Vector

from . import compat, gbuffer
from .scene_state import ExportError, check_cancel, preserved, temporary_copy

FILES = ("job.json", "gbuffer.exr", "hdri.exr", "gt_full.exr", "gt_unshadowed.exr")


def bundled_hdris():
    """The CC0 studio-light HDRIs shipped with Blender, sorted by name."""
    folder = Path(bpy.utils.system_resource("DATAFILES", path="studiolights/world"))
    return sorted(folder.glob("*.exr"))


def export_dataset(scene, out_dir, *, views=4, hdris=(None,), orbit=True, gt_samples=64,
                   gbuffer_samples=4, width=None, height=None, seed=0, denoise=True, hdri_width=512,
                   low_samples=(), sequence=False, progress=None, cancel_check=None, filter_width=0.01):
    """Write ``views`` x ``len(hdris)`` samples into ``out_dir``; return the dataset.json path.

    ``filter_width``: the Cycles pixel filter (px) of the ground truth and of the G-buffer's coverage
    layer, see "Pixel filter" above."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = gbuffer.render_size(scene, width, height)
    cameras = None if orbit else sorted((o for o in scene.objects if o.type == "CAMERA"), key=lambda o: o.name)
    if cameras is not None:
        if not cameras:
            raise ExportError(f"scene '{scene.name}' has no camera and orbit views are off")
        views = min(views, len(cameras))
    previous = _previous_samples(out_dir / "dataset.json")
    index = {"format": "pbnds-dataset", "version": 1, "scene": scene.name, "blend": bpy.data.filepath,
             "seed": seed, "width": width, "height": height, "gt_samples": gt_samples,
             "gbuffer_samples": gbuffer_samples, "denoise": denoise, "filter_width": filter_width, "samples": []}
    total = views * len(hdris)
    for view in range(views):
        view_rng = random.Random(f"{seed}:view:{view}")
        azimuth, elevation = view_rng.uniform(0, 2 * math.pi), math.radians(view_rng.uniform(10, 60))
        for h, hdri in enumerate(hdris):
            check_cancel(cancel_check)
            name = f"v{view:03d}_h{h:02d}"
            is_file = hdri is not None and not isinstance(hdri, bpy.types.World)
            rotation = random.Random(f"{seed}:hdri:{view}:{h}").uniform(0, 2 * math.pi) if is_file else 0.0
            world_info = (_world_info(hdri if hdri is not None else scene.world) if not is_file else
                          {"type": "hdri", "hdri": Path(hdri).name, "rotation_z": rotation})
            folder = out_dir / name
            low = [{"samples": n, "denoise": True, "file": f"{name}/cycles_low_{n}spp.exr"} for n in low_samples]
            entry = {"name": name, "view": view, "hdri": str(hdri) if is_file else None,
                     "rotation_z": float(world_info.get("rotation_z", rotation)), "world": world_info,
                     "job": f"{name}/job.json", "gt_full": f"{name}/gt_full.exr",
                     "gt_unshadowed": f"{name}/gt_unshadowed.exr"}
            if sequence:
                entry["frame"] = h
            index["samples"].append(entry)
            done = len(index["samples"]) - 1
            if progress is not None:
                progress(done / total, f"Sample {name} ({done + 1}/{total})")
            files = list(FILES) + [Path(item["file"]).name for item in low]
            old_low = {item["samples"]: item for item in previous.get(name, {}).get("cycles_low", [])}
            if all((folder / f).exists() for f in files) and all(n in old_low for n in low_samples):
                for item in low:
                    item.update({key: old_low[item["samples"]].get(key) for key in ("seconds", "cpu_seconds")})
            else:
                with preserved(scene):
                    temp = temporary_copy(scene, "PBNDS Dataset")
                    temp.camera = (cameras[view] if cameras is not None
                                   else _orbit_camera(temp, scene.camera, azimuth, elevation, width / height))
                    if is_file:
                        temp.world = _hdri_world(hdri, rotation)
                    elif hdri is not None:
                        temp.world = hdri
                        select_lamps(temp, hdri)
                    temp.cycles.seed = (seed * 1000 + done) % 2**31
                    _export_sample(temp, folder, width, height, gt_samples, gbuffer_samples, denoise,
                                   filter_width, hdri_width, cancel_check, low)
            if low:
                entry["cycles_low"] = low
            (out_dir / "dataset.json").write_text(json.dumps(index, indent=1))
    if progress is not None:
        progress(1.0, f"Dataset written: {out_dir}")
    return out_dir / "dataset.json"


def select_lamps(scene, world):
    """Render only the light objects that belong to the lighting ``world``.

    A light object with a ``pbnds_lighting`` custom property belongs to the world of that name (the
    procedural generator's lamp lightings); others are left alone. Object flags are restored by preserved().
    """
    for ob in scene.objects:
        if "pbnds_lighting" in ob:
            ob.hide_render = ob["pbnds_lighting"] != world.name


def _export_sample(temp, folder, width, height, gt_samples, gbuffer_samples, denoise, filter_width, hdri_width,
                   cancel_check, low):
    temp.cycles.filter_width = filter_width  # before the export: its coverage layer takes the scene's filter
    gbuffer.export_job(temp, folder, samples=gbuffer_samples, width=width, height=height,
                       cancel_check=cancel_check, hdri_width=hdri_width)
    render = temp.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
    render.film_transparent = False  # opaque, and unfiltered guides below: "Denoised silhouettes" above
    render.use_compositing = False
    render.use_sequencer = False
    render.use_motion_blur = False
    settings = render.image_settings
    compat.set_file_format(settings, "OPEN_EXR")
    settings.color_mode = "RGB"
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"
    cycles = temp.cycles
    cycles.samples = gt_samples
    cycles.use_denoising = denoise
    cycles.denoising_prefilter = "NONE"
    for view_layer in temp.view_layers:
        view_layer.use = view_layer == temp.view_layers[0]
    check_cancel(cancel_check)
    render.filepath = str(folder / "gt_full.exr")
    bpy.ops.render.render(write_still=True, scene=temp.name)
    for item in low:  # before the shadow-free render changes the objects
        item["seconds"], item["cpu_seconds"] = _render_low(temp, folder / Path(item["file"]).name, item["samples"],
                                                           cancel_check)
    for ob in temp.objects:  # shared objects: restored by preserved()
        ob.visible_shadow = False
    check_cancel(cancel_check)
    cycles.samples = gt_samples
    cycles.use_denoising = denoise
    render.filepath = str(folder / "gt_unshadowed.exr")
    bpy.ops.render.render(write_still=True, scene=temp.name)


def _previous_samples(path):
    """{name: sample entry} of an earlier run's dataset.json (empty if there is none)."""
    try:
        return {entry["name"]: entry for entry in json.loads(path.read_text())["samples"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _world_info(world):
    info = world.get("pbnds_world") if world is not None else None
    if info is not None:
        return info.to_dict()
    return {"type": "world", "name": world.name if world is not None else None}


def _render_low(temp, path, samples, cancel_check):
    """Render ``temp`` (set up by _export_sample) at ``samples`` with OpenImageDenoise.

    Returns (wall seconds, CPU seconds of this process): the second is less affected by a busy machine.
    """
    check_cancel(cancel_check)
    temp.cycles.samples = samples
    temp.cycles.use_denoising = True
    temp.cycles.denoiser = "OPENIMAGEDENOISE"
    temp.render.filepath = str(path)
    start, cpu = time.perf_counter(), time.process_time()
    bpy.ops.render.render(write_still=True, scene=temp.name)
    return time.perf_counter() - start, time.process_time() - cpu


def _hdri_world(path, rotation):
    world = bpy.data.worlds.new("PBNDS Dataset World")
    tree = compat.node_tree(world)
    env = tree.nodes.new("ShaderNodeTexEnvironment")
    env.image = bpy.data.images.load(str(path), check_existing=True)
    mapping = tree.nodes.new("ShaderNodeMapping")
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, rotation)
    coords = tree.nodes.new("ShaderNodeTexCoord")
    tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    tree.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
    tree.links.new(env.outputs["Color"], tree.nodes["Background"].inputs["Color"])
    return world


def _framing(scene):
    """Centre and radius of the bounding sphere of the renderable meshes (flat ones left out)."""
    boxes = []
    for ob in scene.objects:
        if ob.type != "MESH" or ob.hide_render:
            continue
        corners = [ob.matrix_world @ Vector(c) for c in ob.bound_box]
        lo = Vector([min(c[i] for c in corners) for i in range(3)])
        hi = Vector([max(c[i] for c in corners) for i in range(3)])
        size = hi - lo
        boxes.append((lo, hi, min(size) < 0.01 * max(max(size), 1e-9)))
    if not boxes:
        raise ExportError(f"scene '{scene.name}' has no renderable mesh to orbit around")
    solid = [b for b in boxes if not b[2]] or boxes
    lo = Vector([min(b[0][i] for b in solid) for i in range(3)])
    hi = Vector([max(b[1][i] for b in solid) for i in range(3)])
    return (lo + hi) / 2, max((hi - lo).length / 2, 1e-3)


def _orbit_camera(temp, scene_camera, azimuth, elevation, aspect):
    centre, radius = _framing(temp)
    if scene_camera is not None and scene_camera.type == "CAMERA":
        data = scene_camera.data.copy()
    else:
        data = bpy.data.cameras.new("PBNDS Orbit")
    data.name = "PBNDS Orbit"
    data.type = "PERSP"
    data.shift_x = data.shift_y = 0.0
    # data.angle spans the larger image side (sensor fit AUTO); fit the sphere in the smaller one.
    half_fov = math.atan(math.tan(data.angle / 2) * min(aspect, 1 / aspect))
    distance = radius / math.sin(half_fov) * 1.05
    data.clip_start = min(data.clip_start, distance / 100)
    data.clip_end = max(data.clip_end, (distance + radius) * 2)
    cam = bpy.data.objects.new("PBNDS Orbit", data)
    direction = Vector((math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                        math.sin(elevation)))
    cam.location = centre + direction * distance
    cam.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()
    temp.collection.objects.link(cam)
    return cam
