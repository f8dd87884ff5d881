"""Scene settings of the PBNDS render engine, stored as `scene.pbnds`."""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from . import hdri_browser

MODELS = [
    ("default", "Default", "The project's default neural shader"),
    ("pbnds-paper", "PBNDS (paper)", "The architecture of the PBNDS paper, for comparison"),
    ("lambert", "Lambert", "Classical Lambert shader (baseline)"),
    ("blinn-phong", "Blinn-Phong", "Classical Blinn-Phong shader (baseline)"),
    ("ggx", "GGX", "Classical Lambert + GGX shader (baseline)"),
    ("CUSTOM", "Custom", "A model name or checkpoint the service knows"),
]

SAMPLING = [
    ("mis", "MIS", "HDRI luminance, cosine and GGX-lobe rays combined (best on glossy surfaces)"),
    ("importance", "Importance", "Rays sampled by HDRI luminance"),
    ("stratified", "Stratified", "Low-discrepancy rays over the sphere"),
    ("cosine", "Cosine", "Cosine-weighted rays around the normal"),
    ("uniform", "Uniform", "Uniform rays over the whole sphere, as in the paper"),
]


class PBNDSSceneSettings(bpy.types.PropertyGroup):
    model: EnumProperty(name="Model", items=MODELS, default="default",
                        description="Neural or classical shader the service evaluates")
    custom_model: StringProperty(name="Checkpoint",
                                 description="Model name or checkpoint path on the service's machine")
    rays: IntProperty(name="Rays", default=128, min=1, max=4096, soft_max=512,
                      description="Light rays sampled per pixel")
    sampling: EnumProperty(name="Sampling", items=SAMPLING, default="mis")
    seed: IntProperty(name="Seed", default=0, min=0, description="Seed of the ray set")
    shadows: BoolProperty(name="Shadows", default=True, description="Apply the neural shadow estimator")
    gbuffer_samples: IntProperty(name="G-buffer Samples", default=4, min=1, max=1024,
                                 description="Cycles samples for the G-buffer render")
    viewport_scale: FloatProperty(
        name="Viewport Resolution", default=0.5, min=0.1, max=1.0, subtype="FACTOR",
        description="G-buffer size in the viewport's Rendered shading, as a fraction of the viewport's pixels")
    viewport_hdri_width: IntProperty(
        name="Viewport HDRI Width", default=256, min=16, max=4096,
        description="Width of the world capture the viewport relights with (the height is half of it)")
    relight_only: BoolProperty(
        name="Relight Only", default=False,
        description="Reuse the last G-buffer when only the world changed: capture the HDRI and "
                    "re-shade, skipping the G-buffer render")
    service_url: StringProperty(name="Service URL",
                                description="Override the service address for this scene (empty: "
                                            "preferences, then the discovery file)")
    hdri_folder: StringProperty(name="HDRI Folder", subtype="DIR_PATH",
                                description="Folder of .hdr and .exr files shown by the HDRI browser")
    hdri_file: StringProperty(name="Current HDRI",
                              description="File name (in the HDRI folder) of the HDRI the browser chose last")
    hdri_preview: EnumProperty(name="HDRI", items=hdri_browser.preview_items, get=hdri_browser.get_preview,
                               set=hdri_browser.set_preview,
                               description="Light the world with this HDRI of the folder")

    def job_options(self):
        """The `options` object of job.json (docs/job-format.md)."""
        return {
            "model": self.custom_model if self.model == "CUSTOM" else self.model,
            "rays": self.rays,
            "sampling": self.sampling,
            "seed": self.seed,
            "shadows": self.shadows,
        }


classes = (PBNDSSceneSettings,)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.pbnds = PointerProperty(type=PBNDSSceneSettings)


def unregister():
    del bpy.types.Scene.pbnds
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
