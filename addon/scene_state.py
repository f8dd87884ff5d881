"""Keep the user's scene exactly as it was around an export.

The exporters do their temporary work on temporary data (a copy of the scene that links the same
objects, temporary worlds, cameras and compositor trees). What they cannot avoid touching in the
user's data is shared with that copy: AOV nodes added to material and node-group trees, object
flags (``visible_shadow`` for the unshadowed ground truth), camera depth of field, the evaluated
frame. :func:`preserved` snapshots those, plus the scene's own settings, and puts everything back
in a ``finally``: after a successful, failed or cancelled export the scene is as before, and every
data-block created inside the block is removed.

:func:`property_dump` is the deep RNA dump the tests compare before and after an export.
"""

import contextlib

import bpy

from . import compat


class ExportError(RuntimeError):
    """An export could not be done; the message names the cause."""


class ExportCancelled(ExportError):
    """The caller's ``cancel_check`` asked to stop."""


# Images Blender itself creates on any render; they are not ours to remove.
_KEEP_NEW = {"images": {"Render Result", "Viewer Node"}}
_ID_COLLECTIONS = ("scenes", "objects", "cameras", "lights", "worlds", "materials", "node_groups",
                   "images", "meshes", "collections", "textures")


def _simple_props(struct):
    """Writable non-pointer RNA properties of ``struct`` as {identifier: value}."""
    values = {}
    for prop in struct.bl_rna.properties:
        if (prop.is_readonly or compat.is_deprecated(prop) or prop.type in {"POINTER", "COLLECTION"}
                or prop.identifier == "rna_type"):
            continue
        value = getattr(struct, prop.identifier)
        values[prop.identifier] = tuple(value) if getattr(prop, "is_array", False) else value
    return values


def _restore_props(struct, values):
    for key, value in values.items():
        current = getattr(struct, key)
        if (tuple(current) if isinstance(value, tuple) else current) != value:
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(struct, key, value)


def _node_trees():
    """Every node tree a render can read: materials, worlds, node groups."""
    for idc in (bpy.data.materials, bpy.data.worlds):
        for id_ in idc:
            if id_.node_tree is not None:
                yield id_.node_tree
    yield from bpy.data.node_groups


class _Snapshot:
    def __init__(self, scene):
        self.scene = scene
        self.ids = {name: set(getattr(bpy.data, name).keys()) for name in _ID_COLLECTIONS}
        self.nodes = {tree.as_pointer(): (tree, set(tree.nodes.keys())) for tree in _node_trees()}
        self.structs = []
        for struct in self._structs(scene):
            self.structs.append((struct, _simple_props(struct)))
        self.pointers = {key: getattr(scene, key) for key in ("camera", "world", "compositing_node_group")
                         if hasattr(scene, key)}  # 4.x composites in the scene's own tree (use_nodes)
        self.aovs = {vl.name: [(a.name, a.type) for a in vl.aovs] for vl in scene.view_layers}
        self.frame = (scene.frame_current, scene.frame_subframe)
        self.reevaluate_frame = False  # set when a copy evaluated another frame (shared animation)

    @staticmethod
    def _structs(scene):
        render = scene.render
        yield from (scene, render, render.image_settings, scene.view_settings, scene.display_settings)
        if hasattr(scene, "cycles"):
            yield scene.cycles
        for vl in scene.view_layers:
            yield vl
            if hasattr(vl, "cycles"):
                yield vl.cycles
        for cam in bpy.data.cameras:
            yield from (cam, cam.dof)
        if scene.world is not None:
            yield scene.world
        yield from scene.objects

    def restore(self):
        scene = self.scene
        # Nodes added to existing trees (removing a node removes its links).
        for tree, names in self.nodes.values():
            for node in [n for n in tree.nodes if n.name not in names]:
                tree.nodes.remove(node)
        # New data-blocks, all at once so that users between them do not matter.
        new = []
        for name, before in self.ids.items():
            keep = before | _KEEP_NEW.get(name, set())
            new += [id_ for id_ in getattr(bpy.data, name) if id_.name not in keep]
        if new:
            bpy.data.batch_remove(new)
        for key, value in self.pointers.items():
            if getattr(scene, key) != value:
                setattr(scene, key, value)
        for vl in scene.view_layers:
            wanted = self.aovs.get(vl.name, [])
            for aov in [a for a in vl.aovs if (a.name, a.type) not in wanted]:
                vl.aovs.remove(aov)
        for struct, values in self.structs:
            _restore_props(struct, values)
        if self.reevaluate_frame:
            scene.frame_set(self.frame[0], subframe=self.frame[1])


@contextlib.contextmanager
def preserved(scene):
    """Context manager: everything the export touches is restored on exit, even on error."""
    snapshot = _Snapshot(scene)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def temporary_copy(scene, name="PBNDS Temp"):
    """A full copy of ``scene`` linking the same objects; only use inside :func:`preserved`."""
    copy = scene.copy()
    copy.name = name
    return copy


def check_cancel(cancel_check):
    if cancel_check is not None and cancel_check():
        raise ExportCancelled("export cancelled")


# --- deep dump for tests -------------------------------------------------------------------------

# tool_settings: no export touches them, and reading a paint tool slot's brush crashes Blender 4.2.
_SKIP = {"rna_type", "bl_rna", "users", "session_uid", "is_evaluated", "original", "is_dirty",
         "preview", "tag", "is_runtime_data", "dimensions", "location_absolute", "depsgraph", "tool_settings"}


def _dump(struct, depth, seen):
    if struct is None:
        return None
    if isinstance(struct, bpy.types.ID) and depth > 0:
        return f"<ID {type(struct).__name__} {struct.name}>"
    key = struct.as_pointer()
    if key in seen or depth > 6:
        return f"<{type(struct).__name__}>"
    seen = seen | {key}
    out = {}
    for prop in struct.bl_rna.properties:
        ident = prop.identifier
        if ident in _SKIP or compat.is_deprecated(prop):
            continue
        try:
            value = getattr(struct, ident)
        except (AttributeError, RuntimeError):
            continue
        if prop.type == "POINTER":
            out[ident] = _dump(value, depth + 1, seen)
        elif prop.type == "COLLECTION":
            if len(value) > 200:
                out[ident] = f"<{len(value)} items>"
            else:
                out[ident] = [_dump(item, depth + 1, seen) for item in value]
        elif getattr(prop, "is_array", False):
            out[ident] = _flat(value)
        else:
            out[ident] = value
    return out


def _flat(value):
    try:
        return [_flat(v) for v in value]
    except TypeError:
        return round(value, 6) if isinstance(value, float) else value


def property_dump(scene):
    """Deep dump of the RNA properties an export could touch, for before/after comparisons.

    Covers the scene (render, cycles, view layers and AOVs, compositor group), its world, every
    material, world and node group tree (nodes with their inputs, links), every object of the
    scene and camera, and the names of all data-blocks (so leftover temporary data shows up).
    """
    def links(tree):
        return sorted((l.from_node.name, l.from_socket.identifier, l.to_node.name, l.to_socket.identifier)
                      for l in tree.links)

    return {
        "data": {name: sorted(k for k in getattr(bpy.data, name).keys()
                              if k not in _KEEP_NEW.get(name, ()))
                 for name in _ID_COLLECTIONS},
        "scene": _dump(scene, 0, frozenset()),
        "render": _dump(scene.render, 1, frozenset()),
        "cycles": _dump(scene.cycles, 1, frozenset()) if hasattr(scene, "cycles") else None,
        "view_layers": [_dump(vl, 1, frozenset()) for vl in scene.view_layers],
        "world": _dump(scene.world, 0, frozenset()),
        "trees": {tree.name_full + f"@{i}": {"nodes": [_dump(n, 1, frozenset()) for n in tree.nodes],
                                             "links": links(tree)}
                  for i, tree in enumerate(_node_trees())},
        "objects": {ob.name: _dump(ob, 0, frozenset()) for ob in scene.objects},
        "cameras": {cam.name: _dump(cam, 0, frozenset()) for cam in bpy.data.cameras},
        "materials": {m.name: _dump(m, 0, frozenset()) for m in bpy.data.materials},
    }
