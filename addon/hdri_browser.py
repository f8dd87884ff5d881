"""HDRI browser: a folder of HDRIs (`scene.pbnds.hdri_folder`) shown as thumbnails in the render
panel; choosing one makes it the scene world's Environment Texture, which is the relight.

- The listing is the folder's `.hdr` and `.exr` files (any case), sorted by name.
- Thumbnails come from one `bpy.utils.previews` collection, made on first use and freed on
  unregister; a preview is only a request for the image's own thumbnail (Blender makes and caches
  it when the icon is first drawn), so listing a folder reads no pixels.
- Choosing (the thumbnail view, `pbnds.hdri_choose`, `pbnds.hdri_next`, `pbnds.hdri_previous`; the
  steps wrap around) loads the file with `bpy.data.images.load(check_existing=True)` into the
  Environment Texture that feeds the world output's Background: an existing one is reused, with its
  Mapping node (rotation) and every other node as they were; a world without that gets a minimal
  Environment Texture -> Background -> World Output setup (nothing is deleted: a node that fed the
  Background's Color before is only unlinked). The world update is what relights: the viewport sees
  it, and F12 with Relight Only re-shades the cached G-buffer.
- Keys (add-on keyconfig, Window keymap, so any editor): Ctrl+Shift+Right / Ctrl+Shift+Left step to
  the next / previous HDRI. Plain and Shift arrows stay Blender's frame stepping; editors that bind
  Ctrl+Shift+arrows (text, console, file browser, clip editor, 3D text edit) keep them under the
  mouse, as editor keymaps run first. Without a folder the operators do not poll: the keys pass.
- Status bar (with a UI): the HDRI's name and, when the viewport has one, its last image time
  (`viewport.status_text()`), refreshed for a few seconds after each choice, then cleared.
"""

import os
import time

import bpy
from bpy.props import StringProperty

from . import compat, world

EXTENSIONS = (".hdr", ".exr")
KEYMAP = (("pbnds.hdri_next", "RIGHT_ARROW"), ("pbnds.hdri_previous", "LEFT_ARROW"))  # Ctrl+Shift
STATUS_SECONDS = 8.0
NO_FOLDER = "Choose an HDRI folder in the HDRI Browser panel first"


class BrowserError(Exception):
    """A folder or file problem, worded for the user."""


def folder_path(settings):
    """The absolute path of ``settings.hdri_folder`` ('' when unset)."""
    return bpy.path.abspath(settings.hdri_folder) if settings.hdri_folder else ""


def list_hdris(folder):
    """File names of the HDRIs (.hdr, .exr, any case) in ``folder``, sorted by name; [] if none or
    the folder does not exist."""
    try:
        entries = os.scandir(folder) if folder else None
    except OSError:
        return []
    if entries is None:
        return []
    with entries:
        names = [e.name for e in entries if e.name.lower().endswith(EXTENSIONS) and e.is_file()]
    return sorted(names, key=lambda name: (name.lower(), name))


def hdris(settings):
    """(folder, names) of the browser's folder; a BrowserError saying what is wrong if it has none."""
    if not settings.hdri_folder:
        raise BrowserError(f"PBNDS: {NO_FOLDER}")
    folder = folder_path(settings)
    if not os.path.isdir(folder):
        raise BrowserError(f"PBNDS: HDRI folder not found: {folder}")
    names = list_hdris(folder)
    if not names:
        raise BrowserError(f"PBNDS: no .hdr or .exr files in {folder}")
    return folder, names


def folder_message(settings):
    """What is wrong with the browser's folder, or '' when it lists HDRIs (for the panel)."""
    try:
        hdris(settings)
    except BrowserError as exc:
        return str(exc).removeprefix("PBNDS: ")
    return ""


def current_index(settings, names):
    """Index of the chosen HDRI (`hdri_file`) in ``names``, or -1."""
    try:
        return names.index(settings.hdri_file)
    except ValueError:
        return -1


# ---------------------------------------------------------------------------------------- choosing

def choose(scene, name):
    """Make the file ``name`` of the browser's folder the world's HDRI; returns the Environment
    Texture node. Raises BrowserError."""
    settings = scene.pbnds
    folder, names = hdris(settings)
    if name not in names:
        raise BrowserError(f"PBNDS: {name} is not an HDRI in {folder}")
    path = os.path.join(folder, name)
    try:
        image = bpy.data.images.load(path, check_existing=True)
    except RuntimeError as exc:
        raise BrowserError(f"PBNDS: cannot load {path}: {exc}") from None
    env = set_world_image(scene, image)
    settings.hdri_file = name
    return env


def step(scene, delta):
    """Choose the HDRI ``delta`` places after the current one (wrapping around; from none chosen,
    +1 is the first and -1 the last); returns its name. Raises BrowserError."""
    _, names = hdris(scene.pbnds)
    index = current_index(scene.pbnds, names)
    if index < 0:
        index = -1 if delta > 0 else 0
    name = names[(index + delta) % len(names)]
    choose(scene, name)
    return name


def set_world_image(scene, image):
    """Put ``image`` into the Environment Texture feeding the world output's Background, making the
    world or the nodes that are missing; returns the Environment Texture node."""
    if scene.world is None:
        scene.world = bpy.data.worlds.new("World")
    tree = compat.node_tree(scene.world)
    if tree is None:
        raise BrowserError(f"PBNDS: world '{scene.world.name}' has no node tree")
    env = _environment_node(tree)
    previous = env.image
    env.image = image
    if previous is not None and previous != image and previous.users == 0:
        previous.buffers_free()  # stepping through big HDRIs must not keep each one in memory
    return env


def _environment_node(tree):
    """The Environment Texture that lights the world: the first one feeding the Color of a
    Background upstream of the active World Output, else a new one feeding the output's Background
    (made, with the output, if missing)."""
    nodes, links = tree.nodes, tree.links
    output = world._active_output(tree, "ShaderNodeOutputWorld")
    if output is None:
        output = nodes.new("ShaderNodeOutputWorld")
        output.location = (300.0, 300.0)
    for node in world._upstream(output.inputs["Surface"]):
        if node.bl_idname == "ShaderNodeBackground":
            env = _linked_node(node.inputs["Color"])
            if env is not None and env.bl_idname == "ShaderNodeTexEnvironment":
                return env
    background = _linked_node(output.inputs["Surface"])
    if background is None or background.bl_idname != "ShaderNodeBackground":
        background = nodes.new("ShaderNodeBackground")
        background.location = output.location.x - 200.0, output.location.y
        links.new(background.outputs["Background"], output.inputs["Surface"])
    env = nodes.new("ShaderNodeTexEnvironment")
    env.location = background.location.x - 300.0, background.location.y
    links.new(env.outputs["Color"], background.inputs["Color"])
    return env


def _linked_node(socket):
    linked = world.source_socket(socket)
    return linked.node if linked is not None else None


# ---------------------------------------------------------------------------- thumbnails (enum)

_previews = {}  # "collection": the bpy.utils.previews collection, made on first use
_items = {"key": None, "items": []}  # the enum's items: Blender needs them (their strings) kept alive


def preview_icon(path):
    """icon_id of the thumbnail of ``path`` (0 until Blender has made it, and in background mode)."""
    import bpy.utils.previews

    collection = _previews.get("collection")
    if collection is None:
        collection = _previews["collection"] = bpy.utils.previews.new()
    preview = collection.get(path) or collection.load(path, path, "IMAGE")
    return preview.icon_id


def free_previews():
    collection = _previews.pop("collection", None)
    if collection is not None:
        import bpy.utils.previews

        bpy.utils.previews.remove(collection)
    _items.update(key=None, items=[])


def preview_items(settings, _context):
    """Items of `scene.pbnds.hdri_preview`: one per HDRI, numbered by its place in the listing."""
    folder = folder_path(settings)
    try:
        key = (folder, os.stat(folder).st_mtime_ns) if folder else None
    except OSError:
        key = (folder, None)
    if key != _items["key"] or not _items["items"]:
        names = list_hdris(folder)
        items = [(name, os.path.splitext(name)[0], os.path.join(folder, name),
                  preview_icon(os.path.join(folder, name)), i) for i, name in enumerate(names)]
        _items.update(key=key, items=items or [("NONE", "No HDRIs", "No .hdr or .exr files in the folder",
                                                "ERROR", 0)])
    return _items["items"]


def get_preview(settings):
    index = current_index(settings, list_hdris(folder_path(settings)))
    return max(index, 0)


def set_preview(settings, value):
    """Clicking a thumbnail: choose that HDRI (errors go to the status bar and the console)."""
    names = list_hdris(folder_path(settings))
    if not 0 <= value < len(names):
        return
    scene = settings.id_data
    try:
        choose(scene, names[value])
    except BrowserError as exc:
        print(exc)
        show_status(bpy.context, str(exc))
        return
    show_status(bpy.context, _label(names, value))


# ------------------------------------------------------------------------------------ status bar

_status = {"workspace": "", "text": "", "until": 0.0}


def _label(names, index):
    return f"HDRI {index + 1}/{len(names)}: {names[index]}"


def image_time():
    """The viewport's last image time (`viewport.status_text()`), or '' while it has none."""
    try:
        from . import viewport

        return str(viewport.status_text() or "")
    except Exception:  # no viewport module (yet), or no status_text: the name alone is shown
        return ""


def status_line(text):
    extra = image_time()
    return f"{text}  |  {extra}" if extra else text


def show_status(context, text):
    """Show ``text`` (and the image time) in the status bar for a few seconds; nothing without a UI."""
    workspace = getattr(context, "workspace", None)
    if bpy.app.background or workspace is None:
        return
    _status.update(workspace=workspace.name, text=text, until=time.monotonic() + STATUS_SECONDS)
    workspace.status_text_set(status_line(text))
    if not bpy.app.timers.is_registered(_refresh_status):
        bpy.app.timers.register(_refresh_status, first_interval=0.5)


def _refresh_status():
    """Timer: keep the image time current (the relight finishes after the choice), then clear."""
    workspace = bpy.data.workspaces.get(_status["workspace"])
    if workspace is None:
        return None
    if time.monotonic() > _status["until"]:
        workspace.status_text_set(None)
        return None
    workspace.status_text_set(status_line(_status["text"]))
    return 0.5


# ------------------------------------------------------------------------------------- operators

class _BrowserOperator:
    @classmethod
    def poll(cls, context):
        scene = context.scene
        if scene is None or not hasattr(scene, "pbnds"):
            return False
        if not scene.pbnds.hdri_folder:
            cls.poll_message_set(NO_FOLDER)
            return False
        return True

    def run(self, context, pick):
        scene = context.scene
        try:
            name = pick(scene)
        except BrowserError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        names = list_hdris(folder_path(scene.pbnds))
        show_status(context, _label(names, names.index(name)))
        return {"FINISHED"}


class PBNDS_OT_hdri_choose(_BrowserOperator, bpy.types.Operator):
    """Light the world with this HDRI of the browser's folder"""

    bl_idname = "pbnds.hdri_choose"
    bl_label = "Choose HDRI"
    bl_options = {"REGISTER", "UNDO"}

    name: StringProperty(name="File", description="File name in the HDRI folder")

    def execute(self, context):
        def pick(scene):
            choose(scene, self.name)
            return self.name
        return self.run(context, pick)


class PBNDS_OT_hdri_next(_BrowserOperator, bpy.types.Operator):
    """Light the world with the next HDRI of the browser's folder (Ctrl+Shift+Right)"""

    bl_idname = "pbnds.hdri_next"
    bl_label = "Next HDRI"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        return self.run(context, lambda scene: step(scene, 1))


class PBNDS_OT_hdri_previous(_BrowserOperator, bpy.types.Operator):
    """Light the world with the previous HDRI of the browser's folder (Ctrl+Shift+Left)"""

    bl_idname = "pbnds.hdri_previous"
    bl_label = "Previous HDRI"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        return self.run(context, lambda scene: step(scene, -1))


classes = (PBNDS_OT_hdri_choose, PBNDS_OT_hdri_next, PBNDS_OT_hdri_previous)

# ---------------------------------------------------------------------------------------- keymap

_keymap_items = []


def register_keymaps(keyconfig):
    """Ctrl+Shift+Right / Left -> next / previous HDRI in the Window keymap of ``keyconfig``."""
    if keyconfig is None:
        return
    keymap = keyconfig.keymaps.new(name="Window", space_type="EMPTY")
    for idname, key in KEYMAP:
        _keymap_items.append((keymap, keymap.keymap_items.new(idname, key, "PRESS", ctrl=True, shift=True)))


def unregister_keymaps():
    while _keymap_items:
        keymap, item = _keymap_items.pop()
        try:
            keymap.keymap_items.remove(item)
        except (ReferenceError, RuntimeError):  # the keyconfig went first
            pass


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    if not bpy.app.background:  # the add-on keyconfig is None there (or unused: no events)
        register_keymaps(bpy.context.window_manager.keyconfigs.addon)


def unregister():
    unregister_keymaps()
    if bpy.app.timers.is_registered(_refresh_status):
        bpy.app.timers.unregister(_refresh_status)
    workspace = bpy.data.workspaces.get(_status["workspace"]) if _status["workspace"] else None
    if workspace is not None and not bpy.app.background:
        workspace.status_text_set(None)
    free_previews()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
