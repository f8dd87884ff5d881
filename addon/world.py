"""Capture the scene's world as the job's equirectangular HDRI (docs/job-format.md, `hdri.exr`).

Two paths give the same image:
- the render path works for any world node tree: Cycles renders a temporary scene holding only the
  world and an equirectangular panoramic camera at the origin looking along +X with Z up, which
  makes the image centre face +X and the top row the zenith, as in the contract. The pixel filter is
  made ~0 wide so each pixel is the world radiance at its centre direction (no blur).
- the fast path, for a plain Environment Texture (optionally through a Mapping node rotating about
  Z) into a Background node: the image is resampled in numpy (bilinear at the pixel centres, as
  Cycles' Linear interpolation does), times the Background strength.
A scene without a world is an error (Cycles would render black, which is rarely what a user meant).

Negative texels are clamped to 0 on both paths: they are compression ringing, not light (Blender's own
studio-light HDRIs hold a few, down to -0.002), and the backend rejects negative radiance rather
than clamping it silently. This is the one place where a world becomes the contract's HDRI.
"""

import math
import os
from pathlib import Path

import bpy
import numpy as np

from .scene_state import ExportError, preserved

_LINEAR_SPACES = {"Linear Rec.709", "Linear", "Non-Color", "Linear CIE-XYZ E", "Linear Rec.2020"}


def capture_hdri(scene, path, width=512, samples=16, fast=True):
    """Write the world of ``scene`` as a linear float RGB EXR of ``width`` x ``width / 2`` to ``path``.

    ``fast=False`` forces the render path. Returns the path written.
    """
    path = Path(path).resolve()
    world = scene.world
    if world is None:
        raise ExportError(f"scene '{scene.name}' has no world to capture as the HDRI")
    width = max(2, int(width) // 2 * 2)
    if fast:
        pixels = fast_lookup(world, width)
        if pixels is not None:
            write_exr(np.maximum(pixels, 0.0), path, scene)
            return path
    pixels = _render_world(scene, path, width, width // 2, samples, _equirectangular_camera)
    write_exr(np.maximum(pixels, 0.0), path, scene)
    return path


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
    """Resample an equirectangular (H, W, 3) image to ``width`` x ``width/2``, rotated about Z.

    Blender's convention: a world direction at azimuth phi reads the texture at
    u = 0.5 - phi / 2pi; a Mapping node rotating the vector by ``rotation`` about Z shifts the
    lookup to u - rotation / 2pi. Bilinear with horizontal wrap and vertical clamp.
    """
    src_h, src_w, _ = source.shape
    height = width // 2
    u = (np.arange(width) + 0.5) / width - rotation / (2 * math.pi)
    v = (np.arange(height) + 0.5) / height
    x = u * src_w - 0.5
    y = np.clip(v * src_h - 0.5, 0, src_h - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx = (x - x0)[None, :, None]
    fy = (y - y0)[:, None, None]
    x0 %= src_w
    x1 = (x0 + 1) % src_w
    y1 = np.minimum(y0 + 1, src_h - 1)
    top = source[y0][:, x0] * (1 - fx) + source[y0][:, x1] * fx
    bottom = source[y1][:, x0] * (1 - fx) + source[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


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
    settings.media_type = "IMAGE"
    settings.file_format = "OPEN_EXR"
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

    return _render_world(scene, Path(path).resolve(), width, height, samples, camera, filter_width=1.5)


def _render_world(scene, path, width, height, samples, camera, filter_width=0.01):
    """Render the world of ``scene`` alone through ``camera(temp_scene)`` -> a new camera object;
    return its (H, W, 3) pixels. The default ~0-wide filter makes each pixel its centre direction."""
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
        temp.cycles.filter_width = filter_width
        temp.cycles.device = scene.cycles.device
        cam = camera(temp)
        temp.collection.objects.link(cam)
        temp.camera = cam
        path.parent.mkdir(parents=True, exist_ok=True)
        bpy.ops.render.render(write_still=True, scene=temp.name)
        capture = bpy.data.images.load(render.filepath)
        try:
            return _image_pixels(capture)
        finally:
            bpy.data.images.remove(capture)
            os.remove(render.filepath)
