"""Render Properties panels, shown while PBNDS is the render engine (as Cycles' ui.py does)."""

import bpy

from . import hdri_browser, operators, viewport

ENGINE = "PBNDS"


class PBNDSRenderPanel:
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"
    COMPAT_ENGINES = {ENGINE}

    @classmethod
    def poll(cls, context):
        return context.engine in cls.COMPAT_ENGINES


class RENDER_PT_pbnds_service(PBNDSRenderPanel, bpy.types.Panel):
    bl_label = "Shading Service"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.prop(context.scene.pbnds, "service_url", text="Address")
        row = layout.row()
        row.label(text=operators.STATUS["url"] or "(discovery file)",
                  icon="CHECKMARK" if operators.STATUS["ok"] else "ERROR")
        row.label(text=operators.STATUS["text"])
        row = layout.row(align=True)
        row.operator("pbnds.check_service", icon="FILE_REFRESH")
        row.operator("pbnds.start_service", icon="PLAY")
        row.operator("pbnds.stop_service", icon="PAUSE")


class RENDER_PT_pbnds_shading(PBNDSRenderPanel, bpy.types.Panel):
    bl_label = "Neural Shading"

    def draw(self, context):
        draw_shading(self.layout, context.scene.pbnds)


class RENDER_PT_pbnds_hdri(PBNDSRenderPanel, bpy.types.Panel):
    """A folder of HDRIs as thumbnails: choosing one relights the world (addon/hdri_browser.py)."""

    bl_label = "HDRI Browser"
    bl_parent_id = "RENDER_PT_pbnds_shading"

    def draw(self, context):
        draw_hdri_browser(self.layout, context.scene.pbnds)


def draw_hdri_browser(layout, settings):
    layout.prop(settings, "hdri_folder", text="")
    message = hdri_browser.folder_message(settings)
    if message:
        layout.label(text=message, icon="INFO")
        return
    layout.template_icon_view(settings, "hdri_preview", show_labels=True, scale=5.0, scale_popup=5.0)
    names = hdri_browser.list_hdris(hdri_browser.folder_path(settings))
    index = hdri_browser.current_index(settings, names)
    row = layout.row(align=True)
    row.operator("pbnds.hdri_previous", text="", icon="TRIA_LEFT")
    row.label(text=f"{index + 1}/{len(names)}  {names[index]}" if index >= 0 else "(none chosen)")
    row.operator("pbnds.hdri_next", text="", icon="TRIA_RIGHT")
    layout.label(text="Ctrl+Shift+Left / Right: previous / next")


class RENDER_PT_pbnds_gbuffer(PBNDSRenderPanel, bpy.types.Panel):
    bl_label = "G-buffer"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        settings = context.scene.pbnds
        layout.prop(settings, "gbuffer_samples", text="Samples")
        layout.prop(settings, "relight_only")


class RENDER_PT_pbnds_viewport(PBNDSRenderPanel, bpy.types.Panel):
    bl_label = "Viewport"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        settings = context.scene.pbnds
        layout.prop(settings, "viewport_scale", text="Resolution")
        layout.prop(settings, "viewport_hdri_width", text="HDRI Width")
        status = viewport.status_text()
        if status:
            layout.label(text=status)


class RENDER_PT_pbnds_cycles(bpy.types.Panel):
    """PBNDS shading of a Cycles scene, written back into the compositor."""

    bl_label = "PBNDS Neural Shading"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "render"
    bl_options = {"DEFAULT_CLOSED"}

    @classmethod
    def poll(cls, context):
        return context.engine == "CYCLES"

    def draw(self, context):
        draw_shading(self.layout, context.scene.pbnds)
        self.layout.prop(context.scene.pbnds, "gbuffer_samples", text="G-buffer Samples")
        self.layout.operator("pbnds.shade_to_compositor", icon="NODE_COMPOSITING")


def draw_shading(layout, settings):
    layout.use_property_split = True
    layout.prop(settings, "model")
    if settings.model == "CUSTOM":
        layout.prop(settings, "custom_model")
    layout.prop(settings, "rays")
    layout.prop(settings, "sampling")
    layout.prop(settings, "seed")
    layout.prop(settings, "shadows")


def compat_panels():
    """Blender's own panels (material, world, light, camera, output, colour management) that
    should also show under PBNDS: the G-buffer is a Cycles render of the same scene."""
    for panel in bpy.types.Panel.__subclasses__():
        engines = getattr(panel, "COMPAT_ENGINES", None)
        if not isinstance(engines, set) or "CYCLES" not in engines or panel.__module__ == __name__:
            continue
        if getattr(panel, "bl_context", "") == "render" and "color_management" not in panel.__name__:
            continue
        yield panel


classes = (RENDER_PT_pbnds_service, RENDER_PT_pbnds_shading, RENDER_PT_pbnds_hdri, RENDER_PT_pbnds_gbuffer,
           RENDER_PT_pbnds_viewport, RENDER_PT_pbnds_cycles)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    for panel in compat_panels():
        panel.COMPAT_ENGINES.add(ENGINE)


def unregister():
    for panel in compat_panels():
        panel.COMPAT_ENGINES.discard(ENGINE)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
