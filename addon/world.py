"""Capture the scene's world as the job's equirectangular HDRI (docs/job-format.md, `hdri.exr`),
and take the suns of Sky Textures out of it as analytic `sun` lights (`lights`, version 2).

Every captured texel is the mean radiance over the texel, so the HDRI holds the world's energy even
where light comes from spots smaller than a texel (a sun in a photographed HDRI). Two paths:
- the render path works for any world node tree: Cycles renders a temporary scene holding only the
  world and an equirectangular panoramic camera at the origin looking along +X with Z up, which
  makes the image centre face +X and the top row the zenith, as in the contract. A one-pixel box
  filter makes each pixel the mean over its (longitude, latitude) rectangle; it differs from the mean
  over solid angle only through sin(theta) varying inside the texel: second order for smooth light,
  and at most (pi / 2H) cot(theta) relative for a point-like spot theta from the zenith (0.6 % at 45
  degrees, H = 256 rows). It is unbiased but noisy: a spot covering 1/16 of a texel came out 1.6x
  too bright at 16 samples and within 0.5 % at 256 (the Nishita sun, the usual such spot, is taken out).
- the fast path, for a plain Environment Texture (optionally through a Mapping node rotating about
  Z) into a Background node: numpy integrates Cycles' bilinear reconstruction of the image exactly
  over each texel, weighted by solid angle, at any rotation (no resampling at texel centres), times
  the Background strength.
A scene without a world is an error (Cycles would render black, which is rarely what a user meant).

A Sky Texture's sun disc (Nishita: 'NISHITA' in 4.x, 'SINGLE_SCATTERING'/'MULTIPLE_SCATTERING' in
5.x; 0.545 degrees across by default, about a tenth of a 512-wide texel) is a light, not a texel:
`world_suns` measures it (a narrow box-filtered Cycles render centred on the sun with the disc on and
off, the difference integrated over solid angle: irradiance in RGB, through the atmosphere, the sun
intensity and whatever the sky feeds into, such as a Background strength) and `capture_hdri` renders
the world with those discs off, so the job holds each sun once. Measured (tests/blender/test_world.py,
bpy 5.0.1), irradiance on an upward Lambert plane, capture + suns over Cycles: default Multiple
Scattering sky, strength 0.5: RGB 1.001, 1.001, 0.999 (the previous point-sampled capture, disc on
but missed: 0.14, 0.27, 0.52); a 256 x 128 HDRI with one very hot texel captured 64 wide: fast path
1.010, render path (256 samples) 1.004 (previously 5.4: the texel centre hit the spot). Two small
renders per sun, ~1 s each here. Sky Textures inside node groups or with a linked Vector input
keep their disc in the capture, where the box filter counts it without bias but, at 16 samples for a
disc a tenth of a texel across, very noisily.

Negative texels are clamped to 0 on both paths: they are compression ringing, not light (Blender's own
studio-light HDRIs hold a few, down to -0.002), and the backend rejects negative radiance rather
than clamping it silently. This is the one place where a world becomes the contract's HDRI.
"""

import contextlib
import math
import os
import tempfile
from pathlib import Path

import bpy
import numpy as np
from mathutils import Vector

from . import compat
from .scene_state import ExportError, preserved

_LINEAR_SPACES = {"Linear Rec.709", "Linear", "Non-Color", "Linear CIE-XYZ E", "Linear Rec.2020"}
_SUN_SKY_TYPES = {"NISHITA", "SINGLE_SCATTERING", "MULTIPLE_SCATTERING"}  # 4.x, 5.x names of Nishita


def capture_hdri(scene, path, width=512, samples=16, fast=True):
    """Write the world of ``scene`` as a linear float RGB EXR of ``width`` x ``width / 2`` to ``path``.

    The sun discs that :func:`world_suns` returns are off while the world is rendered (and on again
    afterwards). ``fast=False`` forces the render path. Returns the path written.
    """
    path = Path(path).resolve()
    write_exr(capture_pixels(scene, width, samples, fast, path), path, scene)
    return path


def capture_pixels(scene, width=512, samples=16, fast=True, scratch=None):
    """The world of ``scene`` as a linear (width / 2, width, 3) float array, top row first (capture_hdri's
    image); the render path writes its scratch file to ``scratch`` (default: the temporary folder)."""
    world = scene.world
    if world is None:
        raise ExportError(f"scene '{scene.name}' has no world to capture as the HDRI")
    width = max(2, int(width) // 2 * 2)
    pixels = fast_lookup(world, width) if fast else None
    if pixels is None:
        scratch = Path(scratch or Path(tempfile.gettempdir()) / f"pbnds-world-{os.getpid()}.exr").resolve()
        with _sun_discs(_sun_skies(world), on=False):
            pixels = _render_world(scene, scratch, width, width // 2, samples, _equirectangular_camera)
    return np.maximum(pixels, 0.0).astype(np.float32)


def world_suns(scene, size=48, samples=16):
    """The contract's `sun` entries (docs/job-format.md) of the Sky Texture sun discs lighting the
    world of ``scene`` (none without a world): direction and angle from the node, irradiance measured.

    Each sun is rendered twice through a ``size``-pixel square equirectangular window centred on it,
    1.2 x its diameter across, with a one-pixel box filter: with its disc and without (every other disc
    off); the difference, weighted by each pixel's solid angle and its cosine to the sun, is the
    irradiance on a surface facing the sun. A disc that adds nothing (a single-scattering sun below
    the horizon) is left out.
    """
    skies = _sun_skies(scene.world)
    suns = []
    with tempfile.TemporaryDirectory() as scratch, _sun_discs(skies, on=False):
        path = Path(scratch) / "sun.exr"
        for sky in skies:
            direction = sun_direction(sky)
            half = 0.6 * sky.sun_size
            camera = _window_camera(direction, half)
            without = _render_world(scene, path, size, size, samples, camera)
            with _sun_discs([sky], on=True):
                radiance = _render_world(scene, path, size, size, samples, camera) - without
            irradiance = np.einsum("hwc,hw->c", radiance.astype(np.float64), _window_weights(size, half))
            if irradiance.max() > 0:
                suns.append({"type": "sun", "name": f"{scene.world.name}: {sky.name}",
                             "direction": list(direction), "irradiance": np.maximum(irradiance, 0).tolist(),
                             "angle": sky.sun_size})
    return suns


def sun_direction(sky):
    """Unit direction towards the sun of a Sky Texture: rotation 0 is +Y, and the sun turns clockwise
    seen from above (towards +X) as the rotation grows (located in Cycles renders, tests/blender)."""
    elevation, rotation = sky.sun_elevation, sky.sun_rotation
    return (math.cos(elevation) * math.sin(rotation), math.cos(elevation) * math.cos(rotation),
            math.sin(elevation))


def _sun_skies(world):
    """The Sky Textures of ``world`` with a sun disc that lights it: a Nishita sky, disc on, default
    (unlinked) vector, feeding the active World Output through unmuted nodes and links."""
    tree = world.node_tree if world is not None else None
    output = tree and _active_output(tree, "ShaderNodeOutputWorld")
    if output is None:
        return []
    return [node for node in _upstream(output.inputs["Surface"])
            if node.bl_idname == "ShaderNodeTexSky" and node.sky_type in _SUN_SKY_TYPES and node.sun_disc
            and node.sun_size > 0 and not node.inputs[0].is_linked]  # "Vector" (by name, a KeyError in 5.0.1)


def _upstream(socket):
    """The unmuted nodes that feed ``socket`` through unmuted links, directly or further up."""
    found, pending = {}, [socket]
    while pending:
        for link in pending.pop().links:
            node = link.from_node
            if link.is_muted or node.mute or node.name in found:
                continue
            found[node.name] = node
            pending.extend(node.inputs)
    return list(found.values())


@contextlib.contextmanager
def _sun_discs(skies, on):
    """Switch the sun discs of ``skies`` on or off for the duration, then back to the opposite."""
    try:
        for sky in skies:
            sky.sun_disc = on
        yield
    finally:
        for sky in skies:
            sky.sun_disc = not on


def _window_camera(direction, half):
    """A camera factory: an equirectangular window of +-``half`` radians in longitude and latitude
    centred on ``direction`` (the panorama's centre is the camera's -Z, latitude along its +Y)."""
    def camera(temp):
        cam = _equirectangular_camera(temp)
        cam.rotation_mode = "QUATERNION"
        cam.rotation_quaternion = Vector(direction).to_track_quat("-Z", "Y")
        cam.data.latitude_min, cam.data.latitude_max = -half, half
        cam.data.longitude_min, cam.data.longitude_max = -half, half
        return cam
    return camera


def _window_weights(size, half):
    """(size, size) solid angle x cosine to the window's centre of each pixel of `_window_camera`."""
    edges = np.linspace(-half, half, size + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    solid_angle = np.diff(np.sin(edges))[:, None] * np.diff(edges)[None, :]
    return solid_angle * np.cos(centres)[:, None] * np.cos(centres)[None, :]


def _equirectangular_camera(temp):
    """A panoramic camera at the origin, image centre along +X, Z up: the contract's HDRI layout."""
    cam = bpy.data.objects.new("PBNDS World Camera", bpy.data.cameras.new("PBNDS World Camera"))
    cam.data.type = "PANO"
    cam.data.panorama_type = "EQUIRECTANGULAR"
    cam.rotation_euler = (math.pi / 2, 0.0, -math.pi / 2)
    return cam


def _active_output(tree, idname):
    outputs = [n for n in tree.nodes if n.bl_idname == idname]
    active = [n for n in outputs if n.is_active_output]
    return (active or outputs or [None])[0]


def source_socket(socket):
    """The output socket linked into ``socket`` (through reroutes), or None (a muted link is none)."""
    while socket.is_linked:
        link = socket.links[0]
        if link.is_muted:
            return None
        if link.from_node.bl_idname != "NodeReroute":
            return link.from_socket
        socket = link.from_node.inputs[0]
    return None


def _source(socket):
    """The node linked into ``socket`` (through reroutes), or None."""
    linked = source_socket(socket)
    return linked.node if linked is not None else None


def fast_lookup(world, width):
    """Top-row-first float32 (H, W, 3) world radiance, or None if the world is not a plain image."""
    tree = world.node_tree
    if tree is None:
        return None
    output = _active_output(tree, "ShaderNodeOutputWorld")
    background = output and _source(output.inputs["Surface"])
    if background is None or background.bl_idname != "ShaderNodeBackground":
        return None
    if background.inputs["Strength"].is_linked:
        return None
    env = _source(background.inputs["Color"])
    if env is None or env.bl_idname != "ShaderNodeTexEnvironment" or env.projection != "EQUIRECTANGULAR":
        return None
    image = env.image
    if image is None or not image.is_float or image.colorspace_settings.name not in _LINEAR_SPACES:
        return None
    rotation = 0.0
    mapping = _source(env.inputs["Vector"])
    if mapping is not None:
        rotation = _mapping_z_rotation(mapping)
        if rotation is None:
            return None
    source = _image_pixels(image)
    if source is None:
        return None
    return lookup(source, width, rotation) * background.inputs["Strength"].default_value


def _mapping_z_rotation(mapping):
    """The lookup rotation of a Mapping node that only rotates about Z, else None."""
    if mapping.bl_idname != "ShaderNodeMapping" or mapping.vector_type not in {"POINT", "TEXTURE"}:
        return None
    # An unlinked Mapping input is the constant (0, 0, 0), not the view direction.
    coords = source_socket(mapping.inputs["Vector"])
    if coords is None or coords.node.bl_idname != "ShaderNodeTexCoord" or coords.name != "Generated":
        return None
    inputs = mapping.inputs
    if any(inputs[name].is_linked for name in ("Location", "Rotation", "Scale")):
        return None
    rx, ry, rz = inputs["Rotation"].default_value
    if (abs(rx) > 1e-6 or abs(ry) > 1e-6 or any(abs(v) > 1e-6 for v in inputs["Location"].default_value)
            or any(abs(v - 1) > 1e-6 for v in inputs["Scale"].default_value)):
        return None
    return rz if mapping.vector_type == "POINT" else -rz


def load_pixels(path):
    """Top-row-first float32 (H, W, 3) pixels of an image file, through Blender's image loader."""
    image = bpy.data.images.load(str(path))
    try:
        return _image_pixels(image)
    finally:
        bpy.data.images.remove(image)


def _image_pixels(image):
    """Top-row-first float32 (H, W, 3) pixels of a Blender image, or None if it has none."""
    w, h = image.size
    if w == 0 or h == 0:
        return None
    flat = np.empty(w * h * image.channels, np.float32)
    image.pixels.foreach_get(flat)
    pixels = flat.reshape(h, w, image.channels)[::-1]
    if image.channels == 1:
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def lookup(source, width, rotation=0.0):
    """The mean radiance over each texel of a ``width`` x ``width/2`` equirectangular grid of the
    (H, W, 3) image ``source`` rotated about Z, as Cycles' Linear interpolation reconstructs it.

    Blender's convention: a world direction at azimuth phi reads the texture at
    u = 0.5 - phi / 2pi; a Mapping node rotating the vector by ``rotation`` about Z shifts the
    lookup to u - rotation / 2pi. The bilinear reconstruction (horizontal wrap, vertical clamp) is
    integrated exactly over each texel's u range, then over its rows weighted by sin(theta) (solid
    angle), so the image's energy is kept at any size and rotation.
    """
    src_h, src_w, _ = source.shape
    height = width // 2
    columns = (np.arange(width + 1) / width - rotation / (2 * math.pi)) * src_w
    rows = np.arange(height + 1) / height * src_h
    chunk = max(1, 2**22 // src_w)  # bounds the float64 running sums to ~100 MB
    across = np.concatenate([_interval_means(source[r:r + chunk].swapaxes(0, 1), columns, wrap=True)
                             for r in range(0, src_h, chunk)], axis=1).swapaxes(0, 1)
    return _interval_means(across, rows, frequency=math.pi / src_h).astype(np.float32)


def _interval_means(samples, edges, wrap=False, frequency=0.0):
    """Means of the linear interpolant of ``samples`` along axis 0 (sample i at y = i + 0.5) over
    the intervals between consecutive ``edges``, weighted by sin(frequency y) if ``frequency``.
    Periodic if ``wrap`` (any edges; unweighted only), else constant past the first and last centres
    (edges in [0, n])."""
    ones = np.ones(len(samples))
    weights = _interval_integrals(ones, edges, wrap, frequency)
    return _interval_integrals(samples, edges, wrap, frequency) / weights.reshape(-1, *[1] * (samples.ndim - 1))


def _interval_integrals(samples, edges, wrap, frequency):
    n, a = len(samples), frequency
    samples = samples.astype(np.float64)
    pad = (samples[-1:], samples[:1]) if wrap else (samples[:1], samples[-1:])
    padded = np.concatenate([pad[0], samples, pad[1]])  # padded[k] sits at y = k - 0.5
    slope = np.diff(padded, axis=0)
    column = (-1, *[1] * (samples.ndim - 1))
    if a:  # by parts: integral of g sin(ay) = -g cos(ay) / a + (integral of g' cos(ay)) / a
        steps = slope * np.diff(np.sin(a * (np.arange(n + 2) - 0.5))).reshape(column) / a
    else:
        steps = (padded[:-1] + padded[1:]) / 2
    running = np.concatenate([np.zeros_like(samples[:1]), np.cumsum(steps, axis=0)])

    def integral(y):  # from -0.5 to y, for y in [0, n] (a constant short of it when weighted)
        k = np.floor(y + 0.5).astype(np.int64)
        t = (y + 0.5 - k).reshape(column)
        if not a:
            return running[k] + padded[k] * t + slope[k] * t * t / 2
        ya = (a * y).reshape(column)
        inside = running[k] + slope[k] * (np.sin(ya) - np.sin(a * (k - 0.5)).reshape(column)) / a
        return (inside - (padded[k] + slope[k] * t) * np.cos(ya)) / a

    period = np.floor(edges / n) if wrap else np.zeros_like(edges)
    ends = integral(np.array([0.0, n]))
    return np.diff(integral(edges - period * n) + period.reshape(column) * (ends[1] - ends[0]), axis=0)


def write_exr(pixels, path, scene):
    """Write top-row-first float (H, W, 3) ``pixels`` as a float32 RGB EXR (channels R, G, B)."""
    height, width, _ = pixels.shape
    rgba = np.ones((height, width, 4), np.float32)
    rgba[..., :3] = pixels
    with preserved(scene):
        image = bpy.data.images.new("PBNDS HDRI", width, height, alpha=False, float_buffer=True)
        image.pixels.foreach_set(rgba[::-1].ravel())
        _exr_settings(scene.render.image_settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save_render(str(path), scene=scene)


def _exr_settings(settings):
    compat.set_file_format(settings, "OPEN_EXR")
    settings.color_mode = "RGB"
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"


def render_background(scene, path, width, height, samples=4):
    """The world as the scene's camera sees it, (H, W, 3) top row first, linear.

    The neural result is black where no surface was hit; unless the film is transparent, this is what
    shows there, as in a Cycles render. A world-only render through a copy of the scene camera, at the
    scene's pixel aspect, so it is sharp (not a lookup into the job's small HDRI) and follows any
    world change, which is why relight-only renders it again too. ``path`` names a scratch file.
    """
    if scene.world is None:
        raise ExportError(f"scene '{scene.name}' has no world to render as the background")
    if scene.camera is None:
        raise ExportError(f"scene '{scene.name}' has no active camera")

    def camera(temp):
        temp.render.pixel_aspect_x = scene.render.pixel_aspect_x
        temp.render.pixel_aspect_y = scene.render.pixel_aspect_y
        cam = bpy.data.objects.new("PBNDS Background Camera", scene.camera.data.copy())
        cam.matrix_world = scene.camera.matrix_world.copy()
        return cam

    return _render_world(scene, Path(path).resolve(), width, height, samples, camera,
                         pixel_filter=("BLACKMAN_HARRIS", 1.5))


def _render_world(scene, path, width, height, samples, camera, pixel_filter=("BOX", 1.0)):
    """Render the world of ``scene`` alone through ``camera(temp_scene)`` -> a new camera object;
    return its (H, W, 3) pixels. The default one-pixel box filter makes each pixel the mean over it."""
    world = scene.world
    with preserved(scene):
        temp = bpy.data.scenes.new("PBNDS World Capture")
        temp.world = world
        render = temp.render
        render.engine = "CYCLES"
        render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
        render.film_transparent = False
        render.use_compositing = False
        render.use_sequencer = False
        render.filepath = str(path.with_name(path.stem + ".capture.exr"))
        _exr_settings(render.image_settings)
        temp.cycles.samples = samples
        temp.cycles.use_denoising = False
        temp.cycles.use_adaptive_sampling = False
        temp.cycles.pixel_filter_type, temp.cycles.filter_width = pixel_filter
        temp.cycles.device = scene.cycles.device
        cam = camera(temp)
        temp.collection.objects.link(cam)
        temp.camera = cam
        path.parent.mkdir(parents=True, exist_ok=True)
        bpy.ops.render.render(write_still=True, scene=temp.name)
        try:
            return load_pixels(render.filepath)
        finally:
            os.remove(render.filepath)
