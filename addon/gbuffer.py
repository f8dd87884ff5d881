"""Export a render job: gbuffer.exr + hdri.exr + job.json, exactly as docs/job-format.md says.

How the G-buffer is made:
- Cycles renders a temporary copy of the scene (same objects, camera and world) at a few samples,
  with denoising, motion blur and depth of field off, no bounces (only first-hit data is needed)
  and a pixel filter ~0 wide: every sample of a pixel then lands on its centre, so each layer holds
  the exact value at the centre direction the contract's NDC formula names. A wider filter would
  blend neighbouring surfaces at silhouettes (averaged normals are not unit length, averaged depths
  are nobody's depth). The price is a binary mask; the coverage layer (below) gives the edges back.
- Material layers come from shader AOVs (albedo, specular, roughness, metallic). For the render only,
  AOV Output nodes are added to every material and fed from whatever feeds its Principled BSDF inputs
  (link or default value); they are removed again afterwards (scene_state.preserved). The specular
  layer is Cycles' dielectric F0, clamp(((IOR - 1) / (IOR + 1))^2 x 2 x Specular IOR Level, 0, 1)
  x Specular Tint (0.04 at IOR 1.5 and level 0.5), mixed with the base colour by metallic; shader
  Math nodes compute it from the IOR and level sources. Fallbacks:
  Diffuse BSDF = base Color, roughness 1, F0 0.04 grey; Glossy BSDF = metal of its Color and
  Roughness; Mix Shader = the two sides' parameters mixed by its Fac; Add Shader = the first side;
  a group node = the shader inside the group feeding its output (AOVs then live in the group's tree);
  anything else = mid grey dielectric (0.5 base, roughness 0.5, F0 0.04). Objects without any
  material write 0 to the material layers (Cycles' AOV behaviour).
- normal (world), depth, ao come from the view layer's passes, mask from the alpha of a transparent
  film, position optionally from the Position pass. A compositor File Output node writes them all,
  renamed to the contract's layers, into one float32 multilayer EXR (multi-part from Blender 5.0,
  one part with `<layer>.<channel>` channels in 4.x: the backend reads both). The normal is renormalised on
  the way (compat.normalized: a Vector Math Normalize node; in 4.2 the same from Separate XYZ, Math
  and Combine XYZ nodes): even with the ~0-wide filter, samples of a pixel whose centre lies on an
  edge average two normals, and the contract wants unit normals.
- coverage: how much of each pixel the objects cover, through the user's own pixel filter (Cycles'
  default: Blackman-Harris, 1.5 px), which is how Cycles anti-aliases its edges. The point-sampled mask
  cannot say it, so a second temporary scene (the same objects and materials, the scene's filter,
  COVERAGE_SAMPLES samples, no passes) renders only its alpha; the G-buffer scene's compositor reads it
  through a Render Layers node, so one render call makes both. The backend blends the shaded edge pixels
  with the world by it (docs/job-format.md, layer `coverage`).
- back_depth, next_depth: the depths of the second and third surfaces along each pixel's ray: where it
  leaves a closed object, and where it meets the next one (or a hollow object's far wall), so the
  backend knows what is solid behind the visible surface (a torus's tube and the hole behind it, a
  cup's wall and the air inside it, not a guess). Two more view layers of the G-buffer scene render at
  one sample each with a material override that is transparent at the first one or two surfaces a ray
  meets (Light Path: Transparent Depth) and opaque behind them; Cycles writes the Depth pass only at
  surfaces at least as opaque as the layer's alpha threshold, so its Depth is that surface's (1e10 where
  there is none: open meshes such as a ground plane). Counting surfaces rather than testing Backfacing
  keeps meshes with flipped normals right.
- lights (version 2): the scene's light objects (addon/lights.py) and the suns of its Sky Textures
  (world.world_suns), at the exported frame. What the job cannot carry (emissive meshes, volumes,
  light linking, ...) is returned as warnings, one per problem and object.
"""

import json
import os
from pathlib import Path

import bpy
from mathutils import Matrix

from . import compat, lights, shadowmaps, world
from .scene_state import ExportCancelled, ExportError, check_cancel, preserved, temporary_copy

__all__ = ["ExportError", "ExportCancelled", "export_job", "camera_matrices"]

_ENGINES = {"CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH", "PBNDS"}
# Parameters gathered per material: name -> (kind, value) with kind "color" or "float".
_GREY = {"base": (0.5, 0.5, 0.5, 1.0), "metallic": 0.0, "roughness": 0.5, "level": 0.5, "ior": 1.5,
         "tint": (1.0, 1.0, 1.0, 1.0)}
# File Output item name, socket type, Render Layers output.
_PASS_LAYERS = (("normal", "VECTOR", "Normal"), ("depth", "FLOAT", "Depth"),
                ("ao", "FLOAT", compat.AO_OUTPUT), ("mask", "FLOAT", "Alpha"))
_AOV_LAYERS = (("albedo", "COLOR"), ("specular", "COLOR"), ("roughness", "VALUE"), ("metallic", "VALUE"))
# Samples of the coverage render: its alpha is an average of this many hits or misses per pixel.
COVERAGE_SAMPLES = 16
# Depth layers of the surfaces behind the visible one: (surfaces a ray passes through first, layer name).
PEELED_LAYERS = ((1, "back_depth"), (2, "next_depth"))


def export_job(scene, out_dir, *, samples=4, options=None, width=None, height=None, frame=None,
               cancel_check=None, progress=None, hdri_width=512, position=True, warnings=None,
               shadow_map_size=512, background=False, coverage=True, behind=True,
               surround_size=shadowmaps.SURROUND_SIZE):
    """Write ``out_dir``/{gbuffer.exr, hdri.exr, job.json} for ``scene``; return the job.json path.

    ``width``/``height`` override the render size (else resolution x percentage); ``frame`` the
    scene's current frame. ``cancel_check()`` returning True raises ExportCancelled between steps,
    ``progress(fraction, message)`` reports them. The export's warnings (what the job leaves out,
    addon/lights.py) are appended to the list ``warnings`` when one is given. Each light gets a shadow
    map of ``shadow_map_size`` pixels (addon/shadowmaps.py; 0: none, its light unshadowed). With
    ``background`` the render's Environment pass (the world where no surface is hit, 0 elsewhere)
    is written to ``out_dir``/background.exr too: the backdrop of an opaque film at no extra render
    (not part of the job). ``coverage`` adds the coverage layer (anti-aliased edges; a second Cycles
    session in the same render call, ~0.25 s more at 256x256 on 2 idle CPU cores). ``behind`` adds the
    back_depth and next_depth layers (one sample each of two more view layers: ~0.85 s more each at
    256x256 on 2 idle CPU cores, nearly all of it Cycles syncing the scene again for the view layer's
    material override). ``surround_size`` (0: none) is the height of the `surround` map, a depth panorama
    at the camera that shows the backend's shadows what the camera does not see (one more small Cycles
    render). The scene is left as it was in every case.
    """
    out_dir = Path(out_dir).resolve()

    def step(fraction, message):
        check_cancel(cancel_check)
        if progress is not None:
            progress(fraction, message)

    _validate(scene)
    width, height = render_size(scene, width, height)
    frame = scene.frame_current if frame is None else int(frame)
    out_dir.mkdir(parents=True, exist_ok=True)
    step(0.0, "Preparing G-buffer")
    with preserved(scene) as state:
        state.reevaluate_frame = frame != scene.frame_current
        temp = temporary_copy(scene, "PBNDS G-buffer")
        view_layer = _setup_render(temp, scene, width, height, samples, frame)
        _setup_materials()
        extra = [("coverage", _setup_coverage(temp, scene), "Alpha")] if coverage else []
        if behind:
            extra += [(name, _setup_peeled_depth(temp, passed), "Depth") for passed, name in PEELED_LAYERS]
        _setup_compositor(temp, view_layer, out_dir, position, background, extra)
        matrices = camera_matrices(temp, view_layer, width, height)
        job_lights, light_warnings = lights.export_lights(temp, view_layer.depsgraph)
        step(0.1, "Rendering G-buffer")
        outputs = ("gbuffer", "background")
        stale = [written for name in outputs for written in compat.file_output_files(out_dir, name)]
        # never mix two exports
        for path in ["job.json", "surround.exr", *(f"{name}.exr" for name in outputs), *stale,
                     *out_dir.glob("shadow_*.exr")]:
            _remove(out_dir / path)
        bpy.ops.render.render(write_still=False, scene=temp.name)
        for name in outputs:
            for written in compat.file_output_files(out_dir, name):
                os.replace(written, out_dir / f"{name}.exr")
        if not (out_dir / "gbuffer.exr").exists():
            raise ExportError(f"the G-buffer render of scene '{scene.name}' wrote no {out_dir / 'gbuffer.exr'}")
        step(0.7, "Capturing the world HDRI and its suns")
        world.capture_hdri(temp, out_dir / "hdri.exr", width=hdri_width)
        job_lights += world.world_suns(temp)
    surround = None
    if (shadow_map_size and job_lights) or surround_size:
        step(0.8, "Rendering the depth maps (the lights' and the surround)")
        camera_position = Matrix(matrices["world_to_camera"]).inverted().translation if surround_size else None
        surround = shadowmaps.render_shadow_maps(scene, job_lights if shadow_map_size else [], out_dir,
                                                 size=shadow_map_size, frame=frame, cancel_check=cancel_check,
                                                 surround=camera_position, surround_size=surround_size)
    step(0.95, "Writing job.json")
    job = {"format": "pbnds-job", "version": 2, "width": width, "height": height,
           "gbuffer": "gbuffer.exr", "hdri": "hdri.exr", "frame": frame, "camera": matrices,
           "lights": job_lights}
    if surround is not None:
        job["surround"] = surround
    if options:
        job["options"] = dict(options)
    path = out_dir / "job.json"
    path.write_text(json.dumps(job))
    if warnings is not None:
        warnings.extend(light_warnings)
    if progress is not None:
        progress(1.0, f"Job written: {path}")
    return path


def render_size(scene, width=None, height=None):
    """The scene's render size (resolution x percentage); one given side keeps its aspect."""
    render = scene.render
    base_w = max(1, round(render.resolution_x * render.resolution_percentage / 100))
    base_h = max(1, round(render.resolution_y * render.resolution_percentage / 100))
    if width is None and height is None:
        return base_w, base_h
    if height is None:
        return int(width), max(1, round(width * base_h / base_w))
    if width is None:
        return max(1, round(height * base_w / base_h)), int(height)
    return int(width), int(height)


def _validate(scene):
    if scene.camera is None:
        raise ExportError(f"scene '{scene.name}' has no active camera")
    if scene.camera.type != "CAMERA":
        raise ExportError(f"the active camera '{scene.camera.name}' of scene '{scene.name}' is not a camera")
    if scene.world is None:
        raise ExportError(f"scene '{scene.name}' has no world (the job needs one for the HDRI)")
    if scene.render.engine not in _ENGINES:
        raise ExportError(f"render engine '{scene.render.engine}' is not supported for a G-buffer export")
    if not hasattr(scene, "cycles"):
        raise ExportError("the Cycles add-on is not enabled; the G-buffer is rendered with Cycles")


def camera_matrices(scene, view_layer, width, height):
    """The job's camera block: world_to_camera and projection, row-major lists."""
    depsgraph = view_layer.depsgraph
    camera = scene.camera.evaluated_get(depsgraph)
    render = scene.render
    projection = camera.calc_matrix_camera(depsgraph, x=width, y=height, scale_x=render.pixel_aspect_x,
                                           scale_y=render.pixel_aspect_y)
    return {"world_to_camera": [list(row) for row in camera.matrix_world.inverted()],
            "projection": [list(row) for row in projection]}


def _setup_render(temp, scene, width, height, samples, frame):
    render = temp.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
    render.use_border = False
    render.film_transparent = True
    render.use_motion_blur = False
    render.use_single_layer = False  # else the compositor's other scene (coverage) is not rendered
    render.use_sequencer = False
    cycles = temp.cycles
    cycles.samples = max(1, int(samples))
    cycles.use_adaptive_sampling = False
    cycles.use_denoising = False
    cycles.filter_width = 0.01
    cycles.max_bounces = 0
    cycles.device = scene.cycles.device
    if temp.camera.data.dof.use_dof:  # shared camera data: restored by preserved()
        temp.camera.data.dof.use_dof = False
    active = [vl for vl in temp.view_layers if vl.use] or list(temp.view_layers)
    view_layer = active[0]
    for vl in temp.view_layers:
        vl.use = vl == view_layer
    view_layer.use_pass_z = view_layer.use_pass_normal = view_layer.use_pass_position = True
    view_layer.use_pass_ambient_occlusion = True
    view_layer.use_motion_blur = False
    view_layer.samples = 0  # no per-layer sample override
    view_layer.material_override = None
    for name, kind in _AOV_LAYERS:
        if name not in view_layer.aovs:
            aov = view_layer.aovs.add()
            aov.name = name
        view_layer.aovs[name].type = kind
    temp.frame_set(frame)
    view_layer.depsgraph.update()
    return view_layer


# --- material AOVs -------------------------------------------------------------------------------

def _input(node, name):
    """A parameter source: ("link", socket) when linked, else ("value", default)."""
    socket = node.inputs[name]
    linked = world.source_socket(socket)
    if linked is not None:
        return ("link", linked)
    value = socket.default_value
    return ("value", tuple(value) if hasattr(value, "__len__") else value)


def _const(params):
    return {key: ("value", value) for key, value in params.items()}


def _shader_params(tree, socket, depth=0):
    """(tree, params) for the shader feeding ``socket``; params map to parameter sources."""
    linked = world.source_socket(socket) if socket is not None else None
    if linked is None or depth > 16:
        return tree, _const(_GREY)
    node = linked.node
    kind = node.bl_idname
    if kind == "ShaderNodeBsdfPrincipled":
        return tree, {"base": _input(node, "Base Color"), "metallic": _input(node, "Metallic"),
                      "roughness": _input(node, "Roughness"), "level": _input(node, "Specular IOR Level"),
                      "ior": _input(node, "IOR"), "tint": _input(node, "Specular Tint")}
    if kind == "ShaderNodeBsdfDiffuse":
        return tree, {**_const({**_GREY, "roughness": 1.0}), "base": _input(node, "Color")}
    if kind in {"ShaderNodeBsdfGlossy", "ShaderNodeBsdfAnisotropic"}:
        return tree, {**_const({**_GREY, "metallic": 1.0}), "base": _input(node, "Color"),
                      "roughness": _input(node, "Roughness")}
    if kind == "ShaderNodeAddShader":
        return _shader_params(tree, node.inputs[0], depth + 1)
    if kind == "ShaderNodeMixShader":
        tree_a, a = _shader_params(tree, node.inputs[1], depth + 1)
        tree_b, b = _shader_params(tree, node.inputs[2], depth + 1)
        if tree_a != tree or tree_b != tree:  # sides inside node groups cannot be mixed here
            return (tree_a, a) if tree_a != tree else (tree_b, b)
        fac = _input(node, "Fac")
        return tree, {key: ("mix", fac, a[key], b[key]) for key in a}
    if kind == "ShaderNodeGroup" and node.node_tree is not None:
        inner = node.node_tree
        output = _active_output(inner)
        if output is not None:
            index = list(node.outputs).index(linked)
            if index < len(output.inputs):
                return _shader_params(inner, output.inputs[index], depth + 1)
    return tree, _const(_GREY)


def _active_output(tree):
    outputs = [n for n in tree.nodes if n.bl_idname == "NodeGroupOutput"]
    return ([n for n in outputs if n.is_active_output] or outputs or [None])[0]


class _Wiring:
    """Adds the nodes computing the contract's material layers into one node tree."""

    def __init__(self, tree):
        self.tree = tree
        self.x = -4000.0

    def node(self, idname, **settings):
        node = self.tree.nodes.new(idname)
        node.location = (self.x, -4000.0)
        self.x += 200.0
        for key, value in settings.items():
            setattr(node, key, value)
        return node

    def feed(self, socket, source):
        kind = source[0]
        if kind == "link":
            self.tree.links.new(source[1], socket)
        elif kind == "value":
            value = source[1]
            if hasattr(socket.default_value, "__len__") and not hasattr(value, "__len__"):
                value = (value,) * len(socket.default_value)
            elif not hasattr(socket.default_value, "__len__") and hasattr(value, "__len__"):
                value = sum(value[:3]) / 3
            socket.default_value = value[: len(socket.default_value)] if hasattr(value, "__len__") else value
        else:  # ("mix", fac, a, b)
            color = hasattr(socket.default_value, "__len__")
            mix = self.node("ShaderNodeMix", data_type="RGBA" if color else "FLOAT")
            inputs = [s for s in mix.inputs if s.enabled]
            self.feed(inputs[0], source[1])
            self.feed(inputs[1], source[2])
            self.feed(inputs[2], source[3])
            self.tree.links.new(mix.outputs[2 if color else 0], socket)

    def color_mix(self, factor, a, b):
        """Clamped mix(a, b, factor) as a link source."""
        mix = self.node("ShaderNodeMix", data_type="RGBA", clamp_result=True)
        for socket, source in zip([s for s in mix.inputs if s.enabled], (factor, a, b), strict=True):
            self.feed(socket, source)
        return ("link", mix.outputs[2])

    def math(self, operation, a, b, clamp=False):
        """A shader Math node's ``operation`` of two sources, as a link source."""
        math = self.node("ShaderNodeMath", operation=operation, use_clamp=clamp)
        self.feed(math.inputs[0], a)
        self.feed(math.inputs[1], b)
        return ("link", math.outputs[0])

    def clamped(self, source):
        return self.math("ADD", source, ("value", 0.0), clamp=True)

    def aov(self, name, source):
        out = self.node("ShaderNodeOutputAOV", aov_name=name)
        self.feed(out.inputs["Color" if name in {"albedo", "specular"} else "Value"], source)

    def write(self, params):
        metallic = self.clamped(params["metallic"])
        self.aov("albedo", self.color_mix(metallic, params["base"], ("value", (0.0, 0.0, 0.0, 1.0))))
        # The dielectric F0 colour as Cycles' Principled BSDF makes it (svm/closure.h):
        # clamp(((ior - 1) / (ior + 1))^2 x 2 x Specular IOR Level, 0, 1) x Specular Tint.
        ior, one = params["ior"], ("value", 1.0)
        ratio = self.math("DIVIDE", self.math("SUBTRACT", ior, one), self.math("ADD", ior, one))
        level = self.math("MULTIPLY", params["level"], ("value", 2.0))
        f0 = self.math("MULTIPLY", self.math("MULTIPLY", ratio, ratio), level, clamp=True)
        tinted = self.node("ShaderNodeVectorMath", operation="SCALE")
        self.feed(tinted.inputs[0], params["tint"])
        self.feed(tinted.inputs["Scale"], f0)
        self.aov("specular", self.color_mix(metallic, ("link", tinted.outputs[0]), params["base"]))
        self.aov("roughness", self.clamped(params["roughness"]))
        self.aov("metallic", metallic)


def _setup_materials():
    """AOV wiring in every material, so instanced and geometry-nodes materials are covered too."""
    done = set()
    for material in bpy.data.materials:
        tree = material.node_tree
        if tree is None:
            continue
        output = tree.get_output_node("CYCLES")
        params_tree, params = _shader_params(tree, output.inputs["Surface"] if output else None)
        if params_tree.as_pointer() not in done:  # a node group shared by several materials
            done.add(params_tree.as_pointer())
            _Wiring(params_tree).write(params)


# --- compositor ----------------------------------------------------------------------------------

def _setup_coverage(temp, scene):
    """The scene (a copy of the G-buffer's ``temp``) whose alpha is the coverage layer: the user's pixel
    filter instead of the G-buffer's ~0-wide one, no passes, no compositing."""
    cover = temporary_copy(temp, "PBNDS coverage")
    cover.render.use_compositing = False
    cover.cycles.samples = COVERAGE_SAMPLES
    cover.cycles.filter_width = scene.cycles.filter_width
    cover.cycles.pixel_filter_type = scene.cycles.pixel_filter_type
    cover.world = None  # no light matters to alpha: no world importance map to build
    view_layer = next(vl for vl in cover.view_layers if vl.use)
    view_layer.use_pass_z = view_layer.use_pass_normal = view_layer.use_pass_position = False
    view_layer.use_pass_ambient_occlusion = False
    while view_layer.aovs:
        view_layer.aovs.remove(view_layer.aovs[0])
    return view_layer


def _setup_peeled_depth(temp, passed):
    """A one-sample view layer of ``temp`` whose Depth pass is the depth of the surface a ray meets after passing
    through ``passed`` surfaces (module docstring)."""
    material = bpy.data.materials.new(f"PBNDS surface {passed + 1}")
    tree = compat.node_tree(material)
    nodes, links = tree.nodes, tree.links
    nodes.clear()
    behind = nodes.new("ShaderNodeMath")  # 1 once the ray has passed through `passed` surfaces
    behind.operation = "GREATER_THAN"
    behind.inputs[1].default_value = passed - 0.5
    links.new(nodes.new("ShaderNodeLightPath").outputs["Transparent Depth"], behind.inputs[0])
    mix = nodes.new("ShaderNodeMixShader")
    links.new(behind.outputs[0], mix.inputs["Fac"])
    links.new(nodes.new("ShaderNodeBsdfTransparent").outputs[0], mix.inputs[1])
    # opaque and black; an emission closure, since a holdout ends the path before Cycles writes any pass
    opaque = nodes.new("ShaderNodeEmission")
    opaque.inputs["Strength"].default_value = 0.0
    links.new(opaque.outputs[0], mix.inputs[2])
    links.new(mix.outputs[0], nodes.new("ShaderNodeOutputMaterial").inputs["Surface"])
    view_layer = temp.view_layers.new(f"PBNDS surface {passed + 1}")
    view_layer.samples = 1
    view_layer.use_pass_z = True
    view_layer.pass_alpha_threshold = 0.5
    view_layer.material_override = material
    return view_layer


def _setup_compositor(temp, view_layer, out_dir, position, background, extra):
    """The File Output writing ``view_layer``'s layers, plus each (layer name, other view layer, its pass
    output) of ``extra``."""
    tree = compat.own_compositor_tree(temp, "PBNDS G-buffer Output")
    temp.render.use_compositing = True
    layers = tree.nodes.new("CompositorNodeRLayers")
    layers.scene = temp
    layers.layer = view_layer.name
    items = [(name, "RGBA", name) for name, kind in _AOV_LAYERS if kind == "COLOR"]
    items += [(name, "FLOAT", name) for name, kind in _AOV_LAYERS if kind == "VALUE"]
    items += list(_PASS_LAYERS) + ([("position", "VECTOR", "Position")] if position else [])
    out = compat.multilayer_file_output(tree, out_dir, "gbuffer", [item[:2] for item in items]
                                        + [(name, "FLOAT") for name, _, _ in extra])
    for name, other, output in extra:
        node = tree.nodes.new("CompositorNodeRLayers")
        node.scene, node.layer = other.id_data, other.name
        tree.links.new(node.outputs[output], out.inputs[name])
    for name, socket_type, source in items:
        if source not in layers.outputs:
            raise ExportError(f"the Render Layers node has no '{source}' pass output")
        socket = layers.outputs[source]
        if name == "normal":
            socket = compat.normalized(tree, socket)
        elif socket_type == "FLOAT" and socket.type != "VALUE":  # 4.x: AO is a (grey) colour output
            grey = tree.nodes.new("CompositorNodeRGBToBW")
            tree.links.new(socket, grey.inputs[0])
            socket = grey.outputs[0]
        tree.links.new(socket, out.inputs[name])
    if background:
        view_layer.use_pass_environment = True
        backdrop = compat.image_file_output(tree, out_dir, "background")
        tree.links.new(layers.outputs[compat.ENVIRONMENT_OUTPUT], backdrop.inputs[0])


def _remove(path):
    if path.exists():
        path.unlink()
