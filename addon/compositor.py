"""Write a PBNDS result back into Blender: result arrays -> images -> compositor nodes.

For flows that render the G-buffer with Cycles outside the PBNDS engine (operators, batch). With
the PBNDS engine itself the passes reach the Render Layers node directly and none of this is needed.
"""

import os

import bpy
import numpy as np

from . import compat, world

OUTPUTS = (("shaded", "PBNDS Shaded"), ("unshadowed", "PBNDS Unshadowed"), ("shadow", "PBNDS Shadow"),
           ("lights", "PBNDS Lights"))


def rgba(arrays, name, transparent=False):
    """A result layer as (H, W, 4) float32, top row first; alpha is the mask when `transparent`.

    The shaded layer (premultiplied by the mask, which is the anti-aliased coverage where the job had
    it) of an opaque film goes over ``arrays["background"]`` (the world as the camera sees it, see
    add_background), as a Cycles render shows it.
    """
    data = arrays[name]
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=-1)
    if name == "shaded" and not transparent and "background" in arrays:
        data = data + (1 - arrays["mask"][..., None]) * arrays["background"]  # premultiplied over
    alpha = arrays["mask"] if transparent else np.ones(data.shape[:2], np.float32)
    return np.concatenate([data, alpha[..., None]], axis=-1).astype(np.float32)


def add_background(scene, arrays, workdir):
    """Unless the film is transparent, put the world as the camera sees it into ``arrays`` for rgba().

    It is the G-buffer render's Environment pass where this frame's export wrote one into ``workdir``
    (export_job's ``background``), else a render of the world (relight-only: the world has changed).
    """
    if not scene.render.film_transparent:
        height, width = arrays["mask"].shape
        path = os.path.join(workdir, "background.exr")
        backdrop = world.load_pixels(path) if os.path.exists(path) else None
        if backdrop is None or backdrop.shape[:2] != (height, width):
            backdrop = world.render_background(scene, path, width, height)
        arrays["background"] = backdrop
    return arrays


def array_to_image(pixels, name):
    """A new float Blender image holding (H, W, 4) `pixels` (top row first)."""
    height, width = pixels.shape[:2]
    image = bpy.data.images.new(name, width, height, alpha=True, float_buffer=True)
    image.pixels.foreach_set(np.ascontiguousarray(pixels[::-1], np.float32).ravel())
    return image


def save_image(pixels, path, scene, file_format="OPEN_EXR"):
    """Write (H, W, 4) linear `pixels` through Blender's render output path.

    `Image.save_render` with the scene applies its view transform and look to display formats
    (PNG) and keeps float formats (EXR) linear; a plain `Image.save` of a generated float image
    writes sRGB-encoded values even to EXR (measured with bpy 5.0.1). The scene's output settings
    are changed for the call and restored.
    """
    image = array_to_image(pixels, "PBNDS tmp")
    settings = scene.render.image_settings
    saved = (settings.file_format, settings.color_mode, settings.color_depth)
    try:
        compat.set_file_format(settings, file_format)
        settings.color_mode = "RGBA"
        settings.color_depth = "32" if file_format == "OPEN_EXR" else "8"
        image.save_render(str(path), scene=scene)
    finally:
        bpy.data.images.remove(image)
        compat.set_file_format(settings, saved[0])
        settings.color_mode, settings.color_depth = saved[1:]


def load_image(path, name):
    """The image datablock `name` showing file `path`, reloaded when it already exists."""
    image = bpy.data.images.get(name)
    if image is None:
        image = bpy.data.images.load(str(path))
        image.name = name
    else:
        image.filepath = str(path)
        image.reload()
    return image


def write_back(scene, arrays, directory):
    """Save the result layers as EXRs in `directory` and make the shaded one the compositor output.

    Nodes are found by name ("PBNDS Shaded", ...) and updated on later calls; the user's nodes stay
    in the tree, only the output's input link is moved to the neural image. Returns the images.
    """
    os.makedirs(directory, exist_ok=True)
    transparent = scene.render.film_transparent
    images = {}
    for key, name in OUTPUTS:
        path = os.path.join(directory, f"pbnds_{key}.exr")
        save_image(rgba(arrays, key, transparent and key == "shaded"), path, scene)
        images[key] = load_image(path, name)
    tree = compat.compositor_tree(scene)
    target = compat.compositor_output(tree)
    for i, (key, name) in enumerate(OUTPUTS):
        node = tree.nodes.get(name)
        if node is None:
            node = tree.nodes.new("CompositorNodeImage")
            node.name = node.label = name
            node.location = (target.node.location.x - 400, target.node.location.y - 300 * i)
        node.image = images[key]
    tree.links.new(tree.nodes[OUTPUTS[0][1]].outputs["Image"], target)
    scene.render.use_compositing = True
    return images

