"""PBNDS neural deferred shading for Blender (extension entry point).

Thin like Cycles' add-on: the RenderEngine class delegates to engine.py; settings live in
properties.py, panels in ui.py, operators in operators.py, preferences in preferences.py.
"""

import bpy

from . import compat, engine, operators, preferences, properties, service_process, ui, viewport


class PBNDSRenderEngine(bpy.types.RenderEngine):
    bl_idname = "PBNDS"
    bl_label = "PBNDS Neural"
    bl_use_preview = False
    bl_use_postprocess = True
    bl_use_eevee_viewport = True

    def render(self, depsgraph):
        engine.render(self, depsgraph)

    def update_render_passes(self, scene=None, renderlayer=None):
        engine.update_render_passes(self, scene, renderlayer)

    def view_update(self, context, depsgraph):
        viewport.view_update(self, context, depsgraph)

    def view_draw(self, context, depsgraph):
        viewport.view_draw(self, context, depsgraph)

    def __del__(self):
        viewport.free(self)


modules = (properties, preferences, operators, ui)
classes = (PBNDSRenderEngine,)


def register():
    for module in modules:
        module.register()
    from . import hdri_browser  # HDRI browser: operators, keymap, thumbnails

    hdri_browser.register()
    for cls in classes:
        bpy.utils.register_class(cls)
    compat.unregister_at_exit(PBNDSRenderEngine, unregister)  # the bpy 4.x module hangs at exit otherwise


def unregister():
    service_process.stop_started()
    from . import hdri_browser

    hdri_browser.unregister()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
    for module in reversed(modules):
        module.unregister()
