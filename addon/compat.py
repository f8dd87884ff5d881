"""The Blender API differences between 5.0, 4.5 LTS and 4.2 LTS, one helper each (docs/addon.md,
Blender versions).

The manifest requires 4.2 (blender_version_min): the add-on's tests pass on the bpy 4.2.23, 4.5.15
and 5.0.1 wheels through these helpers.

The rest of the add-on calls these instead of testing versions itself:
- image format: 5.0 chooses a ``media_type`` (image, multilayer, video) before the ``file_format``;
  4.x has only the file format.
- compositor: 5.0 composites through a node group in ``scene.compositing_node_group`` whose Group
  Output is the result; 4.x through the scene's own ``scene.node_tree`` (``scene.use_nodes``) and a
  Composite node.
- File Output node: 5.0 has ``directory`` + ``file_name`` and typed ``file_output_items`` and writes
  ``<file_name>.exr`` (one part per layer); 4.x has ``base_path`` and ``layer_slots`` and writes
  ``<base_path><frame>.exr`` (one part, channels ``<layer>.<channel>``).
- RNA: ``Property.is_deprecated`` is new in 5.0.
- node trees: 5.0 materials and worlds always have one; 4.x ones made in Python need ``use_nodes``.
- Render Layers node: the Ambient Occlusion and Environment pass outputs are ``AO`` and ``Env`` in 4.x.
- Nishita sky: `'NISHITA'` in 4.x is 5.0's `'SINGLE_SCATTERING'` (5.0 adds `'MULTIPLE_SCATTERING'`, its default).
- compositor Vector Math node: new in 4.5; 4.2 normalises a vector with Separate XYZ, Math and Combine
  XYZ nodes (:func:`normalized`).
- lights: ``exposure``, ``use_temperature``/``temperature_color`` and the area light's ``normalize``
  are new in 4.5; a 4.2 light has no exposure factor, no temperature colour and a normalised area
  (:func:`light_exposure`, :func:`light_temperature_colour`, :func:`area_normalize`).
- exit of the bpy 4.x wheel: a process that still has a class with Python methods registered hangs
  (4.5) or crashes (4.2) after Python's finalization (:func:`unregister_at_exit`); on 4.2 also one whose
  PropertyGroup classes were unregistered, as unregistering leaks them (emptied at exit:
  :func:`_empty_unregistered_property_groups`).
"""

import atexit
import os
from pathlib import Path

import bpy

BLENDER_5 = bpy.app.version >= (5, 0, 0)
AO_OUTPUT = "Ambient Occlusion" if BLENDER_5 else "AO"  # the Render Layers node's outputs
ENVIRONMENT_OUTPUT = "Environment" if BLENDER_5 else "Env"
NISHITA_SKY = "SINGLE_SCATTERING" if BLENDER_5 else "NISHITA"
COMPOSITOR_VECTOR_MATH = bpy.app.version >= (4, 5, 0)
LEAKS_PROPERTY_GROUPS = bpy.app.version < (4, 5, 0)  # unregister_class keeps a reference (4.2)
_MEDIA_TYPES = {"OPEN_EXR_MULTILAYER": "MULTI_LAYER_IMAGE", "FFMPEG": "VIDEO"}


_EXIT_HOOKS = set()


def unregister_at_exit(cls, unregister):
    """Run ``unregister()`` at interpreter exit if ``cls`` is still registered then, where bpy is
    4.x imported as a Python module (the bpy wheel; Blender itself has a ``binary_path``).

    That bpy never exits while a registered class with Python methods keeps it alive through Python's
    finalization: the C++ destructor of its sound module's global state then destroys the condition
    variable its delayed device-close thread still waits on, and ``exit()`` blocks in
    ``pthread_cond_destroy`` forever (seen on 4.5.15; 5.0.1 exits). 4.2.23 segfaults there instead
    (see :func:`_empty_unregistered_property_groups`). 5.0 and Blender: no-op. One hook per class,
    however often this is called.
    """
    if BLENDER_5 or bpy.app.binary_path or cls in _EXIT_HOOKS:
        return
    _EXIT_HOOKS.add(cls)

    def release():
        _EXIT_HOOKS.discard(cls)
        if cls.is_registered:
            unregister()

    atexit.register(release)


def _empty_unregistered_property_groups():
    """At exit of a bpy 4.2 module process: empty every unregistered Python PropertyGroup class.

    bpy 4.2's ``unregister_class`` of a PropertyGroup leaks one reference to the class (4.5 does not:
    ``sys.getrefcount`` before/after). The class outlives Python's finalization and with it its functions
    (methods, the get/set/items callbacks of its properties), whose module globals hold ``bpy``: the bpy
    module is never freed, so its free function never runs Blender's exit (gdb: ``main_python_exit`` /
    ``WM_exit_ex`` not reached), and the C++ static destructors of the space types then free Blender's
    Python UI classes with Python gone: a segfault in ``bpy_class_free`` -> ``PyGILState_Ensure``. A
    process that had registered and unregistered the add-on crashed so. Emptied, the class holds nothing.
    Registered at import, so it runs after the :func:`unregister_at_exit` hooks (atexit runs last first).
    """
    pending = list(bpy.types.PropertyGroup.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.is_registered:
            continue
        for name in list(vars(cls)):
            if name not in {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__"}:
                try:
                    delattr(cls, name)
                except (AttributeError, TypeError):
                    pass


if LEAKS_PROPERTY_GROUPS and not bpy.app.binary_path:
    atexit.register(_empty_unregistered_property_groups)


def set_file_format(settings, file_format):
    """Set ``settings.file_format`` (ImageFormatSettings), with 5.0's matching media type first."""
    if BLENDER_5:
        settings.media_type = _MEDIA_TYPES.get(file_format, "IMAGE")
    settings.file_format = file_format


def is_deprecated(prop):
    """Whether an RNA property is deprecated (5.0 flags them; 4.x has no flag: none)."""
    return getattr(prop, "is_deprecated", False)


def light_exposure(light):
    """A light's exposure (its strength x 2^exposure); 4.2 lights have none: 0."""
    return getattr(light, "exposure", 0.0)


def light_temperature_colour(light):
    """The factor of a light's colour from its temperature: the temperature colour where Use
    Temperature is on, else white; 4.2 lights have no temperature: white."""
    if getattr(light, "use_temperature", False):
        return tuple(light.temperature_color)
    return (1.0, 1.0, 1.0)


def area_normalize(light):
    """Whether an area light's power is spread over its area (Normalize, the default); 4.2 has no
    such option and always spreads it."""
    return getattr(light, "normalize", True)


def normalized(tree, socket):
    """``socket``'s vector scaled to unit length by nodes in the compositor ``tree`` (zero stays zero):
    the output socket. 4.5+: a Vector Math Normalize node; 4.2 (no vector math in its compositor):
    v / sqrt(x^2 + y^2 + z^2) by Separate XYZ, Math and Combine XYZ nodes (Math's Divide gives 0 for 0).
    """
    if COMPOSITOR_VECTOR_MATH:
        node = tree.nodes.new("ShaderNodeVectorMath")
        node.operation = "NORMALIZE"
        tree.links.new(socket, node.inputs[0])
        return node.outputs["Vector"]

    def math(operation, a, b):
        node = tree.nodes.new("CompositorNodeMath")
        node.operation = operation
        tree.links.new(a, node.inputs[0])
        if isinstance(b, float):
            node.inputs[1].default_value = b
        else:
            tree.links.new(b, node.inputs[1])
        return node.outputs[0]

    xyz = tree.nodes.new("CompositorNodeSeparateXYZ")
    tree.links.new(socket, xyz.inputs[0])
    x, y, z = xyz.outputs
    squares = [math("MULTIPLY", c, c) for c in (x, y, z)]
    length = math("POWER", math("ADD", math("ADD", squares[0], squares[1]), squares[2]), 0.5)
    unit = tree.nodes.new("CompositorNodeCombineXYZ")
    for c, out in zip((x, y, z), unit.inputs, strict=True):
        tree.links.new(math("DIVIDE", c, length), out)
    return unit.outputs[0]


def node_tree(id_block):
    """The shader node tree of a material, world or light, switching its nodes on in 4.x."""
    if not BLENDER_5 and not id_block.use_nodes:
        id_block.use_nodes = True
    return id_block.node_tree


def compositor_tree(scene, name="PBNDS Compositing"):
    """The node tree that composites ``scene``, created (as ``name`` in 5.0) when it has none."""
    if not BLENDER_5:
        scene.use_nodes = True
        return scene.node_tree
    if scene.compositing_node_group is None:
        scene.compositing_node_group = bpy.data.node_groups.new(name, "CompositorNodeTree")
    return scene.compositing_node_group


def own_compositor_tree(scene, name):
    """A new, empty compositor tree for ``scene`` (a temporary copy), never one it shares: the user's
    compositor may hold Render Layers nodes of their own scene, which a render of the copy would render
    too (with this add-on's engine: itself, recursively)."""
    if not BLENDER_5:  # the copy's embedded tree is its own
        scene.use_nodes = True
        scene.node_tree.nodes.clear()
        return scene.node_tree
    scene.compositing_node_group = bpy.data.node_groups.new(name, "CompositorNodeTree")
    return scene.compositing_node_group


def compositor_output(tree):
    """The input socket whose image is the compositor's result (Group Output / Composite node)."""
    if not BLENDER_5:
        out = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeComposite"), None)
        return (out or tree.nodes.new("CompositorNodeComposite")).inputs["Image"]
    if not any(item.in_out == "OUTPUT" for item in tree.interface.items_tree if item.item_type == "SOCKET"):
        tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    outputs = [n for n in tree.nodes if n.bl_idname == "NodeGroupOutput"]
    out = next((n for n in outputs if n.is_active_output), outputs[0] if outputs else None)
    return (out or tree.nodes.new("NodeGroupOutput")).inputs[0]


def _float_exr_output(tree, file_format):
    """A new File Output node writing float32 ZIP-compressed EXRs of ``file_format``."""
    out = tree.nodes.new("CompositorNodeOutputFile")
    set_file_format(out.format, file_format)
    out.format.color_depth = "32"
    out.format.exr_codec = "ZIP"
    return out


def multilayer_file_output(tree, directory, name, layers):
    """A File Output node writing the float32 multilayer EXR ``name`` in ``directory`` with one input
    per ``(layer, socket_type)`` of ``layers`` (socket type "RGBA", "VECTOR" or "FLOAT"; 4.x takes the
    channels from whatever is linked). The file: :func:`file_output_files`."""
    out = _float_exr_output(tree, "OPEN_EXR_MULTILAYER")
    if BLENDER_5:
        out.directory = str(directory) + os.sep
        out.file_name = name
        for layer, socket_type in layers:
            out.file_output_items.new(socket_type, layer)
    else:
        out.base_path = str(Path(directory) / name)
        out.layer_slots.clear()
        for layer, _ in layers:
            out.layer_slots.new(layer)
    return out


def image_file_output(tree, directory, name):
    """A File Output node writing its one colour input as the float32 RGBA EXR ``name`` (not
    multilayer: Blender's image loader reads its pixels) in ``directory``; the file:
    :func:`file_output_files`."""
    out = _float_exr_output(tree, "OPEN_EXR")
    out.format.color_mode = "RGBA"
    if BLENDER_5:
        out.directory = str(directory) + os.sep
        out.file_name = ""
        out.file_output_items.new("RGBA", name)
    else:
        out.base_path = str(directory) + os.sep
        out.file_slots.clear()
        out.file_slots.new(name)
    return out


def file_output_files(directory, name):
    """The files a :func:`multilayer_file_output` or :func:`image_file_output` node has written:
    ``<name>.exr`` in 5.0; in 4.x ``<name><frame>.exr``, the frame being the current one of the scene
    the render started from."""
    pattern = f"{name}.exr" if BLENDER_5 else f"{name}[0-9]*.exr"
    return sorted(Path(directory).glob(pattern))
