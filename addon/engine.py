"""The PBNDS render engine's work: G-buffer export, shading on the service, result passes.

`__init__.PBNDSRenderEngine` is a thin bpy class that calls `render` and `update_render_passes`
here. F12 runs: export_job (a nested Cycles render of a scene copy) -> submit -> poll (progress bar,
Esc cancels the service job) -> Combined, "Unshadowed", "Shadow" and "Lights" passes of the render result.
"""

import hashlib
import json
import shutil
import tempfile
import time
import traceback

import bpy
import numpy as np

from . import client, compositor, gbuffer, lights, preferences, service_process, world

# The engine's own passes: name, channel count, channel ids, type. They reach the compositor's
# Render Layers node and the multilayer EXR like Cycles' passes.
PASSES = (("Unshadowed", 3, "RGB", "COLOR"), ("Shadow", 1, "X", "VALUE"), ("Lights", 3, "RGB", "COLOR"))

# Per scene: the last full job on the service, for relight-only renders.
_last_jobs = {}


def update_render_passes(engine, scene, renderlayer):
    engine.register_pass(scene, renderlayer, "Combined", 4, "RGBA", "COLOR")
    for name, channels, chan_id, kind in PASSES:
        engine.register_pass(scene, renderlayer, name, channels, chan_id, kind)


def scene_client(scene):
    """A service client from the scene's override, the preferences and the discovery file."""
    prefs = preferences.get()
    url = scene.pbnds.service_url or (prefs.service_url if prefs else "")
    if prefs is None:
        return service_process.connect(url)
    return service_process.connect(
        url, prefs.token, auto_start=prefs.auto_start, python=prefs.python_path,
        cwd=prefs.service_dir, timeout=prefs.start_timeout,
    )


def render(engine, depsgraph):
    """Render one frame; every failure becomes a report and a black result, never a traceback."""
    scene = depsgraph.scene
    width, height = engine.resolution_x, engine.resolution_y
    for name, channels, chan_id, _ in PASSES:
        engine.add_pass(name, channels, chan_id)
    arrays = None
    warnings = []
    try:
        arrays = shade(engine, depsgraph, scene, width, height, warnings)
    except (client.ServiceCancelled, gbuffer.ExportCancelled):
        pass
    except client.ServiceError as exc:
        _report_error(engine, str(exc))
    except gbuffer.ExportError as exc:
        _report_error(engine, f"PBNDS G-buffer export: {exc}")
    except Exception as exc:  # noqa: BLE001 - the render must end with a report, whatever failed
        traceback.print_exc()
        _report_error(engine, f"PBNDS: unexpected {type(exc).__name__}: {exc}")
    for message in warnings:
        engine.report({"WARNING"}, f"PBNDS: {message}")
    write_result(engine, depsgraph.view_layer.name, width, height, arrays, scene.render.film_transparent, warnings)


def _progress(engine):
    def update(fraction, message):
        engine.update_progress(fraction)
        engine.update_stats("", f"PBNDS: {message}")
    return update


def _report_error(engine, message):
    engine.report({"ERROR"}, message)
    engine.error_set(message)


def shade(engine, depsgraph, scene, width, height, warnings):
    """Shade the frame on the service; returns the result arrays (top row first).

    The export's warnings are appended to ``warnings`` (none on a relight: the job is the cached one).
    """
    settings = scene.pbnds
    options = settings.job_options()
    engine.update_stats("", "PBNDS: connecting to the service")
    svc = scene_client(scene)
    signature = gbuffer_signature(depsgraph, width, height, settings.gbuffer_samples)
    cached = _last_jobs.get(scene.name)
    workdir = tempfile.mkdtemp(prefix="pbnds-job-", dir=bpy.app.tempdir or None)
    try:
        job_id = None
        if settings.relight_only and cached and cached[:2] == (svc.url, signature):
            engine.update_stats("", "PBNDS: capturing the world")
            hdri = f"{workdir}/hdri.exr"
            world.capture_hdri(scene, hdri)
            try:
                job_id = svc.relight(cached[2], hdri, options)
            except client.ServiceError as exc:
                if exc.status not in (404, 409):
                    raise  # 404: the job is forgotten, 409: its G-buffer was evicted; either way render it again
        if job_id is None:
            if settings.relight_only:
                engine.report({"INFO"}, "PBNDS: no cached G-buffer for this view: rendering it")
            job_id, _ = run_job(svc, scene, workdir, settings, width, height, scene.frame_current,
                                cancel_check=engine.test_break, progress=_progress(engine), warnings=warnings)
            _last_jobs[scene.name] = (svc.url, signature, job_id)
        else:
            engine.update_stats("", f"PBNDS: relighting on {svc.url}")
            svc.wait(job_id, progress=engine.update_progress, cancel_check=engine.test_break)
        arrays = svc.result_arrays(job_id)
        if arrays["shaded"].shape[:2] != (height, width):
            raise client.ServiceError(
                f"PBNDS service returned {arrays['shaded'].shape[1]}x{arrays['shaded'].shape[0]} "
                f"for a {width}x{height} render"
            )
        engine.update_stats("", "PBNDS: the world behind the objects")
        return compositor.add_background(scene, arrays, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_job(svc, scene, workdir, settings, width=None, height=None, frame=None, cancel_check=None,
            progress=None, warnings=None, timings=None):
    """Export the frame's job into `workdir`, shade it on `svc` and wait; returns (job id, job.json).

    `settings` is scene.pbnds; `progress(fraction, message)` runs 0..0.5 over the export and
    0.5..1 over the shading; the export's warnings are appended to the list `warnings` if given;
    the seconds of the export ("G-buffer") and of the service's part ("service": upload, queue,
    shading) go into the dict `timings` if given.
    """
    def part(offset, default_message):
        if progress is None:
            return None
        return lambda f, message=default_message: progress(offset + 0.5 * f, message)

    started = time.perf_counter()
    job_json = gbuffer.export_job(
        scene, workdir, samples=settings.gbuffer_samples, options=settings.job_options(),
        width=width, height=height, frame=frame, cancel_check=cancel_check,
        progress=part(0.0, "rendering the G-buffer"), warnings=warnings,
        background=not scene.render.film_transparent,  # compositor.add_background's backdrop
    )
    exported = time.perf_counter()
    job_id = svc.submit(job_json)
    svc.wait(job_id, progress=part(0.5, f"shading on {svc.url}"), cancel_check=cancel_check)
    if timings is not None:
        timings.update({"G-buffer": exported - started, "service": time.perf_counter() - exported})
    return job_id, job_json


def write_result(engine, layer_name, width, height, arrays, transparent, warnings=()):
    """Fill Combined (RGBA), Unshadowed, Shadow and Lights; black when `arrays` is None.

    Render result rows are bottom-up while the service's arrays are top-down: flip. `warnings` go into
    the result's metadata (the "PBNDS Warnings" stamp field, saved with EXRs).
    """
    if arrays is None:
        black, zero = np.zeros((height, width, 3), np.float32), np.zeros((height, width), np.float32)
        arrays = {"shaded": black, "unshadowed": black, "shadow": zero, "lights": black, "mask": zero}
    combined = compositor.rgba(arrays, "shaded", transparent)
    result = engine.begin_result(0, 0, width, height, layer=layer_name)
    if warnings:
        result.stamp_data_add_field("PBNDS Warnings", "; ".join(warnings))
    passes = result.layers[0].passes
    for name, data in (("Combined", combined), ("Unshadowed", arrays["unshadowed"]), ("Shadow", arrays["shadow"]),
                       ("Lights", arrays["lights"])):
        passes[name].rect.foreach_set(np.ascontiguousarray(data[::-1], np.float32).ravel())
    engine.end_result(result)


def gbuffer_signature(depsgraph, width, height, samples):
    """A hash of everything the job depends on but the world's HDRI.

    Relight-only trusts it to say "only the world changed": camera, frame, size, samples, the
    visible objects' transforms and mesh vertices, the unlinked inputs, images and links of
    their materials, the exported lights (a relight keeps the job's lights) and the settings of
    the world's Sky Textures (their suns are job lights too). It does not look at textures' pixels
    or modifiers outside the evaluated mesh.
    """
    scene = depsgraph.scene_eval
    h = hashlib.sha1(repr((width, height, samples, scene.frame_current)).encode())
    camera = scene.camera
    if camera is not None:
        cam = camera.evaluated_get(depsgraph)
        h.update(np.array(cam.matrix_world, np.float64).tobytes())
        h.update(np.array(cam.calc_matrix_camera(depsgraph, x=width, y=height), np.float64).tobytes())
    for inst in depsgraph.object_instances:
        obj = inst.object
        h.update(obj.name.encode())
        h.update(np.array(inst.matrix_world, np.float64).tobytes())
        if obj.type == "MESH":
            co = np.empty(len(obj.data.vertices) * 3, np.float32)
            obj.data.vertices.foreach_get("co", co)
            h.update(co.tobytes())
        for slot in obj.material_slots:
            hash_node_tree(h, slot.material)
    h.update(json.dumps(lights.export_lights(scene, depsgraph)[0]).encode())
    if scene.world is not None and scene.world.node_tree is not None:
        for node in scene.world.node_tree.nodes:
            if node.bl_idname == "ShaderNodeTexSky":
                own = [p.identifier for p in node.bl_rna.properties
                       if p.identifier not in bpy.types.ShaderNode.bl_rna.properties]
                h.update(repr([_plain(getattr(node, name)) for name in own]).encode())
    return h.hexdigest()


def _plain(value):
    return tuple(value) if hasattr(value, "__len__") and not isinstance(value, str) else value


def hash_node_tree(h, mat):
    """Feed a material's or world's name, node settings, images and links into the hash `h`."""
    if mat is None:
        return
    h.update(mat.name.encode())
    if mat.node_tree is None:
        return
    for node in mat.node_tree.nodes:
        h.update(node.name.encode())
        image = getattr(node, "image", None)
        if image is not None:
            h.update(image.filepath.encode())
        for sock in node.inputs:
            if not sock.is_linked and hasattr(sock, "default_value"):
                h.update(repr(_plain(sock.default_value)).encode())
    for link in mat.node_tree.links:
        h.update(f"{link.from_node.name}.{link.from_socket.identifier}>"
                 f"{link.to_node.name}.{link.to_socket.identifier}".encode())
