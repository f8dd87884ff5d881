"""The HDRI browser (addon/hdri_browser.py) in real bpy: listing, choosing (the world's nodes),
stepping with wrap-around, clear errors, keymap, thumbnails, and the captured HDRI of a choice
against the file's own pixels."""

import math
import os

import bpy
import numpy as np
import pytest
from blender_helpers import read_exr

from addon import compat, hdri_browser, properties, world
from backend import exrio

pytestmark = pytest.mark.blender

W, H = 16, 8
NAMES = ["a_studio.hdr", "B_sky.EXR", "c_dusk.exr"]  # the expected listing: by name, case ignored
COLOURS = {"a_studio.hdr": (0.3, 0.6, 1.2), "B_sky.EXR": (2.0, 1.0, 0.5), "c_dusk.exr": (0.8, 0.4, 0.9)}


def pattern(colour, k):
    """A smooth positive (H, W, 3) image, top row first, of mean about ``colour``."""
    col = np.sin(2 * np.pi * (np.arange(W) + 0.5) / W + k)
    row = np.cos(np.pi * (np.arange(H) + 0.5) / H)
    shade = (1 + 0.3 * col)[None, :] * (1 + 0.2 * row)[:, None]
    return (shade[..., None] * np.array(colour)).astype(np.float32)


def write_hdr(path, rgb):
    """Radiance RGBE, flat scanlines (no RLE); returns the pixels as Blender decodes them: byte x 2^(e-136)
    (Ward's reference decoder adds half a step; Blender does not), hence rounded, not floored, here."""
    top = rgb.max(axis=-1)
    mantissa, exponent = np.frexp(top)
    scale = (mantissa * 256 / top)[..., None]
    rgbe = np.empty((H, W, 4), np.uint8)
    rgbe[..., :3] = np.minimum(np.round(rgb * scale), 255)
    rgbe[..., 3] = exponent + 128
    with open(path, "wb") as f:
        f.write(f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {H} +X {W}\n".encode())
        f.write(rgbe.tobytes())
    return (rgbe[..., :3] * np.ldexp(1.0, rgbe[..., 3:].astype(int) - 136)).astype(np.float32)


def solid_angle_mean(pixels):
    """Mean radiance over the sphere of an equirectangular (H, W, 3) image, top row first."""
    edges = np.linspace(0, np.pi, len(pixels) + 1)
    weights = np.cos(edges[:-1]) - np.cos(edges[1:])
    return np.einsum("hwc,h->c", pixels.astype(np.float64), weights) / (weights.sum() * pixels.shape[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three tiny HDRIs plus things that are not: a text file, a .txt named like an EXR, a folder
    named like an HDRI. Returns (folder, {name: pixels as the file holds them})."""
    root = tmp_path_factory.mktemp("hdris")
    pixels = {}
    for k, name in enumerate(NAMES):
        rgb = pattern(COLOURS[name], k)
        if name.endswith(".hdr"):
            pixels[name] = write_hdr(root / name, rgb)
        else:
            exrio.write_exr(root / name, {c: rgb[..., i] for i, c in enumerate("RGB")})
            pixels[name] = rgb
    (root / "notes.txt").write_text("not an image")
    (root / "d.exr.txt").write_text("not an image either")
    (root / "e.hdr").mkdir()
    return root, pixels


@pytest.fixture(scope="module", autouse=True)
def registered():
    properties.register()
    hdri_browser.register()
    yield
    hdri_browser.unregister()
    properties.unregister()


@pytest.fixture
def scene(folder):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.pbnds.hdri_folder = str(folder[0])
    return scene


def env_node(scene):
    tree = scene.world.node_tree
    output = world._active_output(tree, "ShaderNodeOutputWorld")
    background = world.source_socket(output.inputs["Surface"]).node
    assert background.bl_idname == "ShaderNodeBackground"
    env = world.source_socket(background.inputs["Color"]).node
    assert env.bl_idname == "ShaderNodeTexEnvironment"
    return env


def image_path(scene):
    return os.path.normpath(bpy.path.abspath(env_node(scene).image.filepath))


def _new_world(name):
    """A new world with its node tree (4.x: switched on)."""
    w = bpy.data.worlds.new(name)
    compat.node_tree(w)
    return w


def rotated_world(name="User World", rotation=math.radians(40.0)):
    """A world as users build it: Texture Coordinate -> Mapping (rotated) -> Environment Texture ->
    Background (strength 1.5), plus nodes of the user's own that light nothing."""
    w = _new_world(name)
    tree = w.node_tree
    background = tree.nodes["Background"]
    background.inputs["Strength"].default_value = 1.5
    env = tree.nodes.new("ShaderNodeTexEnvironment")
    mapping = tree.nodes.new("ShaderNodeMapping")
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, rotation)
    coords = tree.nodes.new("ShaderNodeTexCoord")
    tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    tree.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
    tree.links.new(env.outputs["Color"], background.inputs["Color"])
    tree.nodes.new("ShaderNodeRGB").name = "User Colour"
    tree.nodes.new("NodeFrame").name = "User Frame"
    return w


def test_listing_only_hdris_sorted(folder):
    root, _ = folder
    assert hdri_browser.list_hdris(str(root)) == NAMES
    assert hdri_browser.list_hdris(str(root / "missing")) == []
    assert hdri_browser.list_hdris("") == []


def test_enum_items_are_the_listing_with_thumbnails(scene, folder):
    root, _ = folder
    hdri_browser.free_previews()
    assert "collection" not in hdri_browser._previews  # nothing made before the browser is shown
    items = hdri_browser.preview_items(scene.pbnds, bpy.context)
    assert [(i[0], i[2], i[4]) for i in items] == [(n, str(root / n), k) for k, n in enumerate(NAMES)]
    assert [i[1] for i in items] == ["a_studio", "B_sky", "c_dusk"]
    collection = hdri_browser._previews["collection"]
    assert sorted(collection.keys()) == sorted(str(root / n) for n in NAMES)
    # an empty folder gives one placeholder item, not an empty enum
    scene.pbnds.hdri_folder = str(root / "e.hdr")
    assert [i[0] for i in hdri_browser.preview_items(scene.pbnds, bpy.context)] == ["NONE"]
    hdri_browser.free_previews()
    assert "collection" not in hdri_browser._previews


def test_choose_keeps_mapping_and_user_nodes(scene, folder):
    root, pixels = folder
    scene.world = rotated_world()
    tree = scene.world.node_tree
    env_before = env_node(scene).name
    nodes_before = sorted(n.name for n in tree.nodes)
    links_before = len(tree.links)

    bpy.ops.pbnds.hdri_choose(name="B_sky.EXR")
    assert image_path(scene) == str(root / "B_sky.EXR")
    assert scene.pbnds.hdri_file == "B_sky.EXR"
    assert env_node(scene).name == env_before  # reused, not a second node
    assert sorted(n.name for n in tree.nodes) == nodes_before
    assert len(tree.links) == links_before
    assert tuple(tree.nodes["Mapping"].inputs["Rotation"].default_value) == pytest.approx((0, 0, math.radians(40)))
    assert tree.nodes["Background"].inputs["Strength"].default_value == pytest.approx(1.5)

    # clicking a thumbnail is setting the enum
    scene.pbnds.hdri_preview = "c_dusk.exr"
    assert image_path(scene) == str(root / "c_dusk.exr")
    assert scene.pbnds.hdri_file == "c_dusk.exr" and scene.pbnds.hdri_preview == "c_dusk.exr"

    # the capture sees the rotated file (the fast path still applies: the Mapping is intact) at its strength
    captured = world.fast_lookup(scene.world, 2 * W)
    assert captured is not None
    expected = 1.5 * solid_angle_mean(pixels["c_dusk.exr"])
    assert solid_angle_mean(captured) == pytest.approx(expected, rel=0.01)


def test_next_previous_wrap_around(scene, folder):
    root, _ = folder
    seen = []
    for op in ("next", "next", "next", "next", "previous", "previous", "previous"):
        getattr(bpy.ops.pbnds, f"hdri_{op}")()
        seen.append(scene.pbnds.hdri_file)
        assert image_path(scene) == str(root / scene.pbnds.hdri_file)
    assert seen == ["a_studio.hdr", "B_sky.EXR", "c_dusk.exr", "a_studio.hdr", "c_dusk.exr", "B_sky.EXR",
                    "a_studio.hdr"]
    assert len([im for im in bpy.data.images if im.filepath]) == 3  # revisits reuse the loaded image
    scene.pbnds.hdri_file = ""
    bpy.ops.pbnds.hdri_previous()  # from none chosen, previous is the last
    assert scene.pbnds.hdri_file == "c_dusk.exr"


def test_world_without_nodes_gets_a_working_setup(scene, folder):
    root, _ = folder
    assert scene.world is None
    bpy.ops.pbnds.hdri_next()
    assert image_path(scene) == str(root / "a_studio.hdr")
    assert world.fast_lookup(scene.world, W) is not None

    empty = _new_world("Empty")
    for node in list(empty.node_tree.nodes):
        empty.node_tree.nodes.remove(node)
    scene.world = empty
    bpy.ops.pbnds.hdri_next()
    assert image_path(scene) == str(root / "B_sky.EXR")
    assert world.fast_lookup(scene.world, W) is not None

    # a sky feeding the Background: the sky node stays (unlinked), the HDRI feeds the Background
    sky = _new_world("Sky")
    tex = sky.node_tree.nodes.new("ShaderNodeTexSky")
    sky.node_tree.links.new(tex.outputs["Color"], sky.node_tree.nodes["Background"].inputs["Color"])
    scene.world = sky
    bpy.ops.pbnds.hdri_next()
    assert image_path(scene) == str(root / "c_dusk.exr")
    assert tex.name in sky.node_tree.nodes and not tex.outputs["Color"].is_linked


@pytest.mark.parametrize("case", ["unset", "missing", "empty", "unknown file"])
def test_missing_or_empty_folder_is_a_clear_report(scene, folder, case):
    root, _ = folder
    scene.pbnds.hdri_folder = {"unset": "", "missing": str(root / "nowhere"), "empty": str(root / "e.hdr"),
                               "unknown file": str(root)}[case]
    expected = {"unset": "Choose an HDRI folder", "missing": "HDRI folder not found",
                "empty": "no .hdr or .exr files in", "unknown file": "notes.txt is not an HDRI in"}[case]
    with pytest.raises(RuntimeError) as info:
        if case == "unknown file":
            bpy.ops.pbnds.hdri_choose(name="notes.txt")
        else:
            bpy.ops.pbnds.hdri_next()
    assert expected in str(info.value)
    assert "Traceback" not in str(info.value)
    assert scene.world is None  # nothing made
    message = hdri_browser.folder_message(scene.pbnds)  # what the panel shows
    assert (message == "") if case == "unknown file" else (message.lower() in str(info.value).lower())


def test_capture_of_the_chosen_hdri_is_the_files_pixels(scene, folder, tmp_path):
    """Physics round trip: the job's HDRI (capture_hdri, fast path, written and read back) holds the
    chosen file's radiance: the same mean over the sphere within 1 %, per channel, for every file."""
    _, pixels = folder
    means = {}
    for name in NAMES:
        bpy.ops.pbnds.hdri_next()
        assert scene.pbnds.hdri_file == name
        assert world.fast_lookup(scene.world, W) is not None
        captured = read_exr(world.capture_hdri(scene, tmp_path / f"{name}.capture.exr", width=W))[""]
        assert captured.shape == (H, W, 3)
        means[name] = solid_angle_mean(captured)
        assert means[name] == pytest.approx(solid_angle_mean(pixels[name]), rel=0.01)
    # the files differ far beyond the tolerance, so the check tells them apart
    assert np.abs(means["a_studio.hdr"] / means["B_sky.EXR"] - 1).max() > 0.5


def test_keymap_ctrl_shift_arrows():
    keyconfig = bpy.context.window_manager.keyconfigs.new("PBNDS test")
    try:
        hdri_browser.register_keymaps(keyconfig)
        items = [(i.idname, i.type, i.ctrl, i.shift, i.alt) for i in keyconfig.keymaps["Window"].keymap_items]
        assert items == [("pbnds.hdri_next", "RIGHT_ARROW", True, True, False),
                         ("pbnds.hdri_previous", "LEFT_ARROW", True, True, False)]
        hdri_browser.unregister_keymaps()
        assert len(keyconfig.keymaps["Window"].keymap_items) == 0
    finally:
        bpy.context.window_manager.keyconfigs.remove(keyconfig)


def test_status_line_without_ui(scene):
    hdri_browser.show_status(bpy.context, "HDRI 1/3: a_studio.hdr")  # background mode: no-op, no error
    assert not bpy.app.timers.is_registered(hdri_browser._refresh_status)
    line = hdri_browser.status_line("HDRI 1/3: a_studio.hdr")
    extra = hdri_browser.image_time()
    assert line == ("HDRI 1/3: a_studio.hdr" + (f"  |  {extra}" if extra else ""))
