"""Shadow maps of the job's analytic lights: a depth render of the scene from each light
(docs/job-format.md, the light entry's `shadow`), so that the backend shadows with occluders the
camera does not see.

Each map is a Cycles render of a temporary copy of the scene through a camera placed as the light:
1 sample, a ~0-wide pixel filter (each texel is the depth at its centre direction), no bounces, no
world, only the Depth pass kept. Objects that cast no shadow (``visible_shadow`` off) are hidden from
that camera and lights are never seen by it; everything else keeps its materials, so alpha-clipped
leaves cast their cut-out shadows (Cycles writes depth behind surfaces more than half transparent).

- sun: an orthographic camera looking along the sunlight, framing the bounding box of the
  shadow-casting geometry as seen from the sun (the box of its objects' and instances' bounds);
- point: an equirectangular panorama at the light (one render instead of six cube faces);
- spot: a perspective camera down the cone, as wide as the cone (plus a texel), up to 150 degrees;
  wider spots get the panorama, centred on the axis;
- area: the panorama from the centre, centred on the normal (its size softens the shadow in the
  backend);
- the job's surround map: the panorama at the job camera's position, so that the screen-space shadows
  see the walls and ceilings outside the picture (docs/job-format.md, `surround`).
"""

import math
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

from . import compat, gbuffer
from .scene_state import check_cancel, preserved, temporary_copy

MAX_PERSPECTIVE = math.radians(150)  # wider spots are mapped by a panorama
SURROUND_SIZE = 256  # rows of the surround panorama (docs/job-format.md): a texel is 0.7 degrees
CLIP_START = 1e-3  # m: geometry closer to a local light than this casts no shadow
_GEOMETRY = {"MESH", "CURVE", "CURVES", "SURFACE", "META", "FONT", "POINTCLOUD", "VOLUME", "GREASEPENCIL"}


def render_shadow_maps(scene, lights, out_dir, *, size=512, frame=None, cancel_check=None, surround=None,
                       surround_size=SURROUND_SIZE):
    """Render ``out_dir``/shadow_<i>.exr for each contract light entry of ``lights`` (as
    addon/lights.py exports them) and add its ``shadow`` object to the entry in place.

    ``size``: the map's height in pixels (a panorama is twice as wide); ``frame``: the frame to
    render (default the scene's current one). A sun gets no map when nothing casts a shadow.
    ``surround``: a world position (the job camera's) whose panorama, ``surround_size`` high, is
    rendered too, into surround.exr: the job's `surround` map, whose object is returned (else None).
    The scene is left as it was.
    """
    out_dir = Path(out_dir).resolve()
    maps = [(light, f"shadow_{index}.exr", size) for index, light in enumerate(lights)]
    if surround is not None:
        maps.append(({"type": "point", "position": [float(v) for v in surround]}, "surround.exr", surround_size))
    if not maps:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    with preserved(scene) as state:
        frame = scene.frame_current if frame is None else int(frame)
        state.reevaluate_frame = frame != scene.frame_current
        temp = temporary_copy(scene, "PBNDS Shadow Maps")
        view_layer = _setup_render(temp, scene, frame)
        camera = bpy.data.objects.new("PBNDS Shadow Camera", bpy.data.cameras.new("PBNDS Shadow Camera"))
        temp.collection.objects.link(camera)
        temp.camera = camera
        corners = _caster_corners(view_layer.depsgraph)
        for light, name, size in maps:
            check_cancel(cancel_check)
            if light["type"] == "sun":
                if not len(corners):
                    continue
                projection = _sun_camera(camera, np.array(light["direction"]), corners, size)
            else:
                projection = _local_camera(camera, light, size)
            width = 2 * size if projection == "equirectangular" else size
            temp.render.resolution_x, temp.render.resolution_y = width, size
            view_layer.depsgraph.update()
            matrices = gbuffer.camera_matrices(temp, view_layer, width, size)
            path = out_dir / name
            temp.render.filepath = str(path)
            bpy.ops.render.render(write_still=True, scene=temp.name)
            light["shadow"] = {"file": path.name, "projection": projection,
                               "world_to_light": matrices["world_to_camera"], "bias": 0.0}
            if projection != "equirectangular":
                light["shadow"]["matrix"] = matrices["projection"]
    return maps[-1][0]["shadow"] if surround is not None else None


def _setup_render(temp, scene, frame):
    render = temp.render
    render.engine = "CYCLES"
    render.resolution_percentage = 100
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0
    render.use_border = False
    render.use_motion_blur = False
    render.use_compositing = False
    render.use_sequencer = False
    render.use_single_layer = True
    render.use_file_extension = False
    settings = render.image_settings
    compat.set_file_format(settings, "OPEN_EXR_MULTILAYER")
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"
    temp.world = None
    cycles = temp.cycles
    cycles.samples = 1
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    cycles.filter_width = 0.01
    cycles.max_bounces = 0
    cycles.device = scene.cycles.device
    active = [vl for vl in temp.view_layers if vl.use] or list(temp.view_layers)
    view_layer = active[0]
    for vl in temp.view_layers:
        vl.use = vl == view_layer
    for prop in view_layer.bl_rna.properties:  # the Depth pass alone
        if prop.identifier.startswith("use_pass_") and not prop.is_readonly:
            setattr(view_layer, prop.identifier, prop.identifier == "use_pass_z")
    view_layer.use_motion_blur = False
    view_layer.samples = 0
    view_layer.material_override = None
    for obj in temp.objects:  # restored by preserved(): they are the scene's objects
        visible = obj.type != "LIGHT" and obj.visible_shadow
        if obj.visible_camera != visible:
            obj.visible_camera = visible
    temp.frame_set(frame)
    view_layer.depsgraph.update()
    return view_layer


def _caster_corners(depsgraph):
    """World-space corners (N, 3) of the bounding boxes of every rendered, shadow-casting instance."""
    corners = []
    for inst in depsgraph.object_instances:
        obj = inst.object
        if obj.type not in _GEOMETRY or obj.original.hide_render or not obj.visible_shadow:
            continue
        box = np.array([tuple(corner) for corner in obj.bound_box], np.float64)
        matrix = np.array(inst.matrix_world, np.float64)
        corners.append(box @ matrix[:3, :3].T + matrix[:3, 3])
    return np.concatenate(corners) if corners else np.zeros((0, 3))


def _frame(forward, up_hint):
    """matrix_world rotation of a camera looking along ``forward`` (its -Z), +Y towards ``up_hint``."""
    back = -forward / np.linalg.norm(forward)
    if abs(back @ up_hint) > 0.99:
        up_hint = np.array([0.0, 1.0, 0.0]) if abs(back[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    right = np.cross(up_hint, back)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(back, right), back], axis=1)


def _place(camera, rotation, origin):
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, origin
    camera.matrix_world = Matrix(matrix.tolist())


def _sun_camera(camera, direction, corners, size):
    """An orthographic camera along the sunlight framing ``corners``, a texel of margin around them."""
    rotation = _frame(-direction, np.array([0.0, 0.0, 1.0]))
    local = corners @ rotation  # right, up, back (towards the sun) coordinates
    low, high = local.min(axis=0), local.max(axis=0)
    extent = max(high[0] - low[0], high[1] - low[1], 1e-3) * (1 + 2 / size)
    margin = 0.01 * max(extent, high[2] - low[2]) + 1e-3
    data = camera.data
    data.type = "ORTHO"
    data.ortho_scale = extent
    data.sensor_fit = "AUTO"
    data.shift_x = data.shift_y = 0.0
    data.clip_start = margin / 2
    data.clip_end = high[2] - low[2] + 2 * margin
    centre = (low + high) / 2
    _place(camera, rotation, rotation @ np.array([centre[0], centre[1], high[2] + margin]))
    return "orthographic"


def _local_camera(camera, light, size):
    """A camera at a point, spot or area light: perspective down a narrow enough spot, else a panorama
    centred on the spot's axis or the area's normal."""
    data = camera.data
    data.clip_start, data.clip_end = CLIP_START, 1e6
    data.shift_x = data.shift_y = 0.0
    axis = np.array(light.get("direction", light.get("normal", [0.0, 0.0, -1.0])), np.float64)
    _place(camera, _frame(axis, np.array([0.0, 0.0, 1.0])), np.array(light["position"], np.float64))
    if light["type"] == "spot" and light["spot_size"] <= MAX_PERSPECTIVE:
        data.type = "PERSP"
        data.sensor_fit = "AUTO"
        data.lens_unit = "FOV"
        data.angle = min(light["spot_size"] * (1 + 2 / size), math.radians(170))
        return "perspective"
    data.type = "PANO"
    data.panorama_type = "EQUIRECTANGULAR"
    data.latitude_min, data.latitude_max = -math.pi / 2, math.pi / 2
    data.longitude_min, data.longitude_max = -math.pi, math.pi
    return "equirectangular"
