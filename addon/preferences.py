"""Add-on preferences: where the service is, and how to start it."""

import bpy
from bpy.props import BoolProperty, FloatProperty, StringProperty


class PBNDSPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    service_url: StringProperty(name="Service URL",
                                description="Address of the PBNDS service (empty: read the discovery file)")
    token: StringProperty(name="Token", subtype="PASSWORD",
                          description="Service token (empty: read the discovery file)")
    auto_start: BoolProperty(name="Start Service Automatically", default=False,
                             description="Start the service when a render finds none running")
    python_path: StringProperty(name="Python", subtype="FILE_PATH",
                                description="Python interpreter with the `pbnds` backend installed")
    service_dir: StringProperty(name="Working Folder", subtype="DIR_PATH",
                                description="Folder the service starts in (e.g. a source checkout)")
    start_timeout: FloatProperty(name="Start Timeout", default=60.0, min=1.0, unit="TIME_ABSOLUTE",
                                 description="Seconds to wait for an auto-started service")

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.prop(self, "service_url")
        layout.prop(self, "token")
        layout.prop(self, "auto_start")
        col = layout.column()
        col.active = self.auto_start
        col.prop(self, "python_path")
        col.prop(self, "service_dir")
        col.prop(self, "start_timeout")
        layout.operator("pbnds.start_service")


def get(context=None):
    """This add-on's preferences, or None when it is imported without being enabled."""
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon else None


classes = (PBNDSPreferences,)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
