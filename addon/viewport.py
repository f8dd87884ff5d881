"""The PBNDS engine in the 3D viewport's Rendered shading: the neural image, relit as the world changes.

Blender calls view_update and view_draw on its main thread and waits for them, so they only note that
something may have changed and schedule `ViewportState.tick` on bpy.app.timers (main thread, outside
drawing, where a nested Cycles render is allowed). tick compares signatures with what it shaded last:
- the view (matrices, region size) or anything else the G-buffer depends on (engine.gbuffer_signature):
  a new G-buffer, rendered by Cycles from a temporary camera that sees what the viewport sees, at the
  panel's viewport resolution scale, and submitted as a new job;
- only the world (world_signature): its HDRI is captured again and the service relights the kept job.
Either way a `Shading` run on a worker thread does the service's part in progressive passes: a preview (few
rays, option "preview": coarse screen-space transport), then the scene's own options. A newer change
cancels the running job on the service and starts again. view_draw draws the latest image with the gpu
module through Blender's display transform. Every step's time is kept (`status_text`; `python -m addon.latency`
measures them).
"""

import contextlib
import hashlib
import shutil
import tempfile
import threading
import time
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

from . import client, compositor, engine, gbuffer, world

PREVIEW = {"rays": 16, "sampling": "stratified", "preview": True}  # the first pass after every change
POLL_SECONDS = 0.25  # the longest a status request waits on the service (it answers when the job ends)
_last_status = {"text": ""}  # the newest image's timings, for the status bar and the HDRI browser


def status_text():
    """The newest viewport image's time and its parts (timing_text), e.g. "PBNDS pass 1: 212 ms (world 9, ...)";
    "" before the first."""
    return _last_status["text"]


def progressive_passes(options):
    """The passes a change is shaded in: a preview, then the scene's own job options."""
    return [{**options, **PREVIEW}, dict(options)]


def world_signature(scene):
    """A hash of what the world's HDRI capture depends on: its colour, node settings, images and links."""
    h = hashlib.sha1()
    if scene.world is not None:
        h.update(repr(tuple(scene.world.color)).encode())
        engine.hash_node_tree(h, scene.world)
    return h.hexdigest()


def backdrop_texels(view_matrix, window_matrix, width, height, rows, cols):
    """Flat indices (height, width) of the texels of a rows x cols equirectangular HDRI (top row first; the
    job contract's mapping, u = 0.5 - atan2(y, x) / 2 pi, v = theta / pi) that each pixel centre's ray
    sees. They depend only on the view: the viewport keeps them while the world changes."""
    to_world = np.linalg.inv(np.array(window_matrix, np.float64) @ np.array(view_matrix, np.float64))
    x = (np.arange(width) + 0.5) / width * 2 - 1
    y = 1 - (np.arange(height) + 0.5) / height * 2
    ends = [np.stack(np.broadcast_arrays(x[None, :], y[:, None], z, 1.0), -1) @ to_world.T for z in (-1.0, 1.0)]
    rays = ends[1][..., :3] / ends[1][..., 3:] - ends[0][..., :3] / ends[0][..., 3:]  # near plane to far plane
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    theta = np.arccos(np.clip(rays[..., 2], -1, 1))
    u = (0.5 - np.arctan2(rays[..., 1], rays[..., 0]) / (2 * np.pi)) % 1.0
    row, col = np.minimum((theta / np.pi * rows).astype(int), rows - 1), np.minimum((u * cols).astype(int), cols - 1)
    return row * cols + col


def camera_settings(view_matrix, window_matrix, width, height):
    """Camera object and data settings that see exactly what a viewport with these matrices sees:
    (matrix_world as nested lists, {camera data property: value}). Inverse of Blender's own projection
    (Object.calc_matrix_camera with a horizontal sensor fit: tests/blender/test_viewport.py)."""
    p = np.array(window_matrix, np.float64)
    to_world = np.linalg.inv(np.array(view_matrix, np.float64))
    aspect = width / height
    data = {"sensor_fit": "HORIZONTAL", "sensor_width": 36.0}
    if p[3, 3] == 0:  # perspective: P[0][0] = 2 lens / sensor, P[0][2] = 2 shift_x, P[1][2] = 2 shift_y aspect
        near, far = p[2, 3] / (p[2, 2] - 1), p[2, 3] / (p[2, 2] + 1)
        data.update(type="PERSP", lens=18.0 * p[0, 0], shift_x=p[0, 2] / 2, shift_y=p[1, 2] / (2 * aspect))
    else:  # orthographic: P[0][0] = 2 / ortho_scale, P[0][3] = -2 shift_x, P[1][3] = -2 shift_y aspect
        near, far = (p[2, 3] + 1) / p[2, 2], (p[2, 3] - 1) / p[2, 2]
        data.update(type="ORTHO", ortho_scale=2.0 / p[0, 0], shift_x=-p[0, 3] / 2, shift_y=-p[1, 3] / (2 * aspect))
        if near < 1e-3:  # a viewport's orthographic range starts behind its eye; a camera's cannot: step back
            to_world[:3, 3] += to_world[:3, 2] * (1e-3 - near)
            far, near = far + 1e-3 - near, 1e-3
    data.update(clip_start=max(near, 1e-4), clip_end=max(far, near * 2))
    return to_world.tolist(), data


@contextlib.contextmanager
def temporary_camera(scene, matrix_world, settings):
    """The scene's camera replaced by one with these settings while the block runs; removed afterwards."""
    data = bpy.data.cameras.new("PBNDS Viewport Camera")
    for name, value in settings.items():
        setattr(data, name, value)
    obj = bpy.data.objects.new("PBNDS Viewport Camera", data)
    obj.matrix_world = Matrix(matrix_world)  # rows (a plain nested list would be read as columns)
    scene.collection.objects.link(obj)
    previous = scene.camera
    scene.camera = obj
    try:
        yield obj
    finally:
        scene.camera = previous
        bpy.data.objects.remove(obj)
        bpy.data.cameras.remove(data)


class Shading:
    """The service's part of a viewport's images, on a worker thread: submit or relight, wait, download.

    `start` cancels the run in progress (its service job too) and begins another; each pass's image and
    timings replace the previous ones and `on_image()` is called (from the worker thread)."""

    def __init__(self, svc, on_image):
        self.svc, self.on_image = svc, on_image
        self.lock = threading.Lock()
        self.generation = 0
        self.job_id = None  # the job whose G-buffer relights re-shade
        self.in_flight = None  # the service job being waited for
        self.image = None  # (H, W, 4) float32 RGBA, top row first
        self.timings = {}
        self.passes_done = 0
        self.error = ""
        self.thread = None

    def start(self, passes, hdri, job_json=None, timings=None, backdrop=None):
        """Shade `passes` (job options): the first through `job_json` (a new G-buffer's job, submitted with the
        first pass's options written in it) when given, else relights of the kept job under `hdri` (EXR bytes).
        `backdrop` (H, W, 3) is shown where no surface was hit (None: transparent there)."""
        with self.lock:
            self.generation += 1
            generation, superseded = self.generation, self.in_flight
            if job_json is not None:
                self.job_id = None
        self.thread = threading.Thread(target=self._run, daemon=True, args=(
            generation, superseded, passes, hdri, job_json, dict(timings or {}), backdrop))
        self.thread.start()

    def cancel(self):
        with self.lock:
            self.generation += 1

    def wait(self, timeout=None):
        """Wait for the current run to end (tests and the latency command)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def _run(self, generation, superseded, passes, hdri, job_json, timings, backdrop):
        def stale():
            return generation != self.generation

        try:
            if superseded is not None:  # the service shades one job at a time: free it for this one at once
                with contextlib.suppress(client.ServiceError):
                    self.svc.cancel(superseded)
            for index, options in enumerate(passes):
                marks = {**timings, "pass": index + 1}
                started = time.perf_counter()
                if index == 0 and job_json is not None:
                    job_id = self.svc.submit(job_json)
                    with self.lock:
                        if not stale():
                            self.job_id = job_id
                else:
                    job_id = self.svc.relight(self.job_id, hdri, options)
                marks["upload_ms"] = (time.perf_counter() - started) * 1e3
                started = time.perf_counter()
                with self.lock:
                    self.in_flight = job_id
                status = self.svc.wait(job_id, cancel_check=stale, interval=POLL_SECONDS)
                marks["shade_ms"] = (time.perf_counter() - started) * 1e3
                service = status.get("timings", {})
                marks.update({f"service_{key}": service[key] for key in ("decode_ms", "run_ms") if key in service})
                started = time.perf_counter()
                arrays = self.svc.result_arrays(job_id, half=True, layers=("shaded", "mask"))
                if backdrop is not None:
                    arrays["background"] = backdrop
                image = compositor.rgba(arrays, "shaded", transparent=backdrop is None)
                marks["download_ms"] = (time.perf_counter() - started) * 1e3
                with self.lock:
                    if stale():
                        return
                    self.image, self.timings, self.passes_done, self.error = image, marks, index + 1, ""
                self.on_image()
                timings = {}  # later passes have no export or capture of their own
        except client.ServiceCancelled:
            return
        except (client.ServiceError, OSError) as exc:  # OSError: a newer change replaced the job's files
            with self.lock:
                if stale():
                    return
                self.error = str(exc)
            self.on_image()


def timing_text(timings):
    """One status line of a pass's timings (ms): total, then each part that was measured."""
    parts = [(label, timings[key]) for key, label in (
        ("gbuffer_ms", "G-buffer"), ("world_ms", "world"), ("upload_ms", "upload"), ("shade_ms", "shade"),
        ("download_ms", "download"), ("draw_ms", "draw")) if key in timings]
    total = sum(value for _, value in parts)
    return f"PBNDS pass {timings.get('pass', 1)}: {total:.0f} ms (" + ", ".join(
        f"{label} {value:.0f}" for label, value in parts) + ")"


class ViewportState:
    """One viewport's PBNDS state: what it shaded last and the Shading run; see the module docstring."""

    def __init__(self, svc, redraw):
        self.shading = Shading(svc, redraw)
        self.workdir = Path(tempfile.mkdtemp(prefix="pbnds-viewport-"))
        self.view = None  # (view matrix, window matrix, width, height) to render from
        self.shaded_for = (None, None)  # (G-buffer key, world signature) of the current run
        self.gbuffer_key = None  # the key of the G-buffer exported last, and its job.json
        self.texels = (None, None)  # (view and sizes, the backdrop's HDRI texel per pixel)
        self.job_json = None
        self.last_error = ""

    def set_view(self, view_matrix, window_matrix, width, height):
        """Remember the viewport's view; whether it differs from the one before."""
        view = ([list(row) for row in view_matrix], [list(row) for row in window_matrix], width, height)
        changed, self.view = view != self.view, view
        return changed

    def tick(self, scene, depsgraph):
        """Start what the changes since the last tick need: "gbuffer" (a new G-buffer and job), "world" (a
        relight of the kept job) or None (nothing changed, or no view yet)."""
        if self.view is None:
            return None
        settings = scene.pbnds
        view_matrix, window_matrix, width, height = self.view
        size = (max(8, round(width * settings.viewport_scale)), max(8, round(height * settings.viewport_scale)))
        key = (engine.gbuffer_signature(depsgraph, *size, 1), repr(self.view))
        world_key = world_signature(scene)
        if (key, world_key) == self.shaded_for:
            return None
        passes = progressive_passes(settings.job_options())
        self.shaded_for = (key, world_key)  # a failing state is reported once, not retried on every redraw
        try:
            started = time.perf_counter()
            hdri = world.capture_pixels(scene, settings.viewport_hdri_width, scratch=self.workdir / "scratch.exr")
            hdri_path = self.workdir / "world.exr"  # runs get its bytes: one file, however many worlds
            world.write_exr(hdri, hdri_path, scene)
            hdri_bytes = hdri_path.read_bytes()
            backdrop = None
            if not scene.render.film_transparent:
                texels_key = (repr(self.view), size, hdri.shape)
                if self.texels[0] != texels_key:
                    self.texels = (texels_key, backdrop_texels(view_matrix, window_matrix, *size, *hdri.shape[:2]))
                backdrop = hdri.reshape(-1, 3)[self.texels[1]]
            timings = {"world_ms": (time.perf_counter() - started) * 1e3}
            if key != self.gbuffer_key or self.shading.job_id is None:
                # a new G-buffer, or the last one never reached the service (still on its way, or refused)
                started = time.perf_counter()
                if key != self.gbuffer_key:
                    self.job_json = self._export(scene, view_matrix, window_matrix, size, passes[0])
                    self.gbuffer_key = key
                shutil.copyfile(hdri_path, self.job_json.parent / "hdri.exr")
                timings["gbuffer_ms"] = (time.perf_counter() - started) * 1e3
                self.shading.start(passes, hdri_bytes, job_json=self.job_json, timings=timings, backdrop=backdrop)
                change = "gbuffer"
            else:
                self.shading.start(passes, hdri_bytes, timings=timings, backdrop=backdrop)
                change = "world"
        except (gbuffer.ExportError, client.ServiceError) as exc:
            self.last_error = str(exc)
            return None
        self.last_error = ""
        return change

    def _export(self, scene, view_matrix, window_matrix, size, options):
        """The job of the view's G-buffer (Cycles, one sample) with `options` written in it; its job.json path.
        No coverage, back_depth or next_depth layers and no surround map: their Cycles sessions would add to every
        camera or geometry change (the shadows then take objects' thickness from the guess and see nothing off
        the picture, backend/screenspace.py)."""
        job_dir = self.workdir / "job"
        shutil.rmtree(job_dir, ignore_errors=True)
        with temporary_camera(scene, *camera_settings(view_matrix, window_matrix, *size)):
            return Path(gbuffer.export_job(scene, job_dir, samples=1, options=options, width=size[0],
                                           height=size[1], hdri_width=8, coverage=False,
                                           behind=False, surround_size=0))

    def draw_arrays(self):
        """(RGBA image or None, error text) to draw now."""
        with self.shading.lock:
            return self.shading.image, self.shading.error or self.last_error

    def free(self):
        self.shading.cancel()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- the thin bpy side: the engine's view_update / view_draw ------------------------------------------------


def view_update(render_engine, context, depsgraph):
    if _state(render_engine, context) is not None:
        _schedule(render_engine, context.scene.name)


def view_draw(render_engine, context, depsgraph):
    state = _state(render_engine, context)
    if state is None:
        return
    region, view = context.region, context.region_data
    if state.set_view(view.view_matrix, view.window_matrix, region.width, region.height):
        _schedule(render_engine, context.scene.name)
    image, error = state.draw_arrays()
    if image is not None:
        started = time.perf_counter()
        _draw_image(render_engine, context.scene, image, region.width, region.height)
        _last_status["text"] = timing_text({**state.shading.timings, "draw_ms": (time.perf_counter() - started) * 1e3})
    if error:
        render_engine.update_stats("", f"PBNDS: {error}")


def _state(render_engine, context):
    state = getattr(render_engine, "pbnds_viewport", None)
    if state is None:
        try:
            svc = engine.scene_client(context.scene)
        except client.ServiceError as exc:
            render_engine.update_stats("", f"PBNDS: {exc}")
            return None
        state = render_engine.pbnds_viewport = ViewportState(svc, render_engine.tag_redraw)
    return state


def _schedule(render_engine, scene_name):
    """Run the state's tick once on the main thread, outside drawing (timers may render and edit data)."""
    if getattr(render_engine, "pbnds_tick_pending", False):
        return
    render_engine.pbnds_tick_pending = True

    def tick():
        try:
            render_engine.pbnds_tick_pending = False
            scene = bpy.data.scenes.get(scene_name)
            if scene is not None:
                render_engine.pbnds_viewport.tick(scene, bpy.context.evaluated_depsgraph_get())
                render_engine.tag_redraw()
        except ReferenceError:  # the viewport's engine was freed (shading mode changed) before the tick
            pass
        return None

    bpy.app.timers.register(tick, first_interval=0.0)


def _draw_image(render_engine, scene, image, width, height):
    import gpu
    from gpu_extras.presets import draw_texture_2d

    shown = getattr(render_engine, "pbnds_texture", (None, None))
    if shown[0] is image:  # redraws of the same image (the view moved, the region was exposed): no upload
        texture = shown[1]
    else:
        h, w = image.shape[:2]
        pixels = np.ascontiguousarray(image[::-1], np.float32)  # GPU textures are bottom row first
        texture = gpu.types.GPUTexture((w, h), format="RGBA16F",
                                       data=gpu.types.Buffer("FLOAT", w * h * 4, pixels.ravel()))
        render_engine.pbnds_texture = (image, texture)
    gpu.state.blend_set("ALPHA_PREMULT")
    render_engine.bind_display_space_shader(scene)
    draw_texture_2d(texture, (0, 0), width, height)
    render_engine.unbind_display_space_shader()
    gpu.state.blend_set("NONE")


def free(render_engine):
    state = getattr(render_engine, "pbnds_viewport", None)
    if state is not None:
        state.free()

