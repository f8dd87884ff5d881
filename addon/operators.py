"""Operators: service status/start/stop, and shading a Cycles scene into the compositor."""

import os
import tempfile

import bpy

from . import client, compositor, engine, gbuffer, preferences, service_process

# Last known service state, shown by the UI; refreshed by a timer in the GUI and by pbnds.check_service.
STATUS = {"url": "", "ok": False, "text": "not checked"}


def refresh_status(scene):
    """Ask the service for health (short timeout, never starts it) and update STATUS."""
    prefs = preferences.get()
    url = scene.pbnds.service_url or (prefs.service_url if prefs else "")
    STATUS["url"] = url or "(discovery file)"
    try:
        svc = client.discover(url, prefs.token if prefs else "")
        STATUS["url"] = svc.url
        health = svc.health(timeout=0.5)
    except client.ServiceError as exc:
        STATUS.update(ok=False, text="not reachable" if exc.status is None else f"error {exc.status}")
        return
    STATUS.update(ok=True, text=f"{health.get('device', '?')}, {health.get('queue_length', 0)} queued")


def _poll_status():
    if bpy.context.scene is not None and hasattr(bpy.context.scene, "pbnds"):
        refresh_status(bpy.context.scene)
        for window in bpy.context.window_manager.windows:
            for area in window.screen.areas:
                if area.type == "PROPERTIES":
                    area.tag_redraw()
    return 5.0


class PBNDS_OT_check_service(bpy.types.Operator):
    """Ask the PBNDS service whether it is running"""

    bl_idname = "pbnds.check_service"
    bl_label = "Check Service"

    def execute(self, context):
        refresh_status(context.scene)
        self.report({"INFO"} if STATUS["ok"] else {"WARNING"}, f"PBNDS service {STATUS['url']}: {STATUS['text']}")
        return {"FINISHED"}


class PBNDS_OT_start_service(bpy.types.Operator):
    """Start the PBNDS service with the Python interpreter set in the preferences"""

    bl_idname = "pbnds.start_service"
    bl_label = "Start Service"

    def execute(self, context):
        prefs = preferences.get(context)
        if prefs is None or not prefs.python_path:
            self.report({"ERROR"}, "PBNDS: set the Python interpreter in the add-on preferences first")
            return {"CANCELLED"}
        try:
            svc = service_process.connect(auto_start=True, python=bpy.path.abspath(prefs.python_path),
                                          cwd=prefs.service_dir, timeout=prefs.start_timeout)
        except client.ServiceError as exc:
            self.report({"ERROR"}, f"PBNDS: {exc}")
            return {"CANCELLED"}
        refresh_status(context.scene)
        self.report({"INFO"}, f"PBNDS service running at {svc.url}")
        return {"FINISHED"}


class PBNDS_OT_stop_service(bpy.types.Operator):
    """Stop the PBNDS service this Blender session started"""

    bl_idname = "pbnds.stop_service"
    bl_label = "Stop Service"

    def execute(self, context):
        service_process.stop_started()
        refresh_status(context.scene)
        return {"FINISHED"}


class PBNDS_OT_shade_to_compositor(bpy.types.Operator):
    """Render the G-buffer with Cycles, shade it on the PBNDS service and make the result the
    compositor's output (for scenes rendered with Cycles rather than the PBNDS engine)"""

    bl_idname = "pbnds.shade_to_compositor"
    bl_label = "Shade to Compositor"

    def execute(self, context):
        scene = context.scene
        wm = context.window_manager
        wm.progress_begin(0.0, 1.0)
        try:
            svc = engine.scene_client(scene)
            with tempfile.TemporaryDirectory(prefix="pbnds-job-") as workdir:
                job_id, _ = engine.run_job(svc, scene, workdir, scene.pbnds, frame=scene.frame_current,
                                           progress=lambda f, _message: wm.progress_update(f))
                arrays = compositor.add_background(scene, svc.result_arrays(job_id), workdir)
        except (client.ServiceError, gbuffer.ExportError, gbuffer.ExportCancelled) as exc:
            self.report({"ERROR"}, f"PBNDS: {exc}")
            return {"CANCELLED"}
        finally:
            wm.progress_end()
        folder = bpy.path.abspath("//pbnds") if bpy.data.filepath else os.path.join(bpy.app.tempdir, "pbnds")
        compositor.write_back(scene, arrays, folder)
        self.report({"INFO"}, f"PBNDS result in the compositor (files in {folder})")
        return {"FINISHED"}


classes = (PBNDS_OT_check_service, PBNDS_OT_start_service, PBNDS_OT_stop_service, PBNDS_OT_shade_to_compositor)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    if not bpy.app.background:
        bpy.app.timers.register(_poll_status, first_interval=1.0, persistent=True)


def unregister():
    if bpy.app.timers.is_registered(_poll_status):
        bpy.app.timers.unregister(_poll_status)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
