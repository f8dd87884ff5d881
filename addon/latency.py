"""Viewport latency: how long a world change takes to reach a refreshed viewport image, part by part.

With bpy module:  python -m addon.latency blend_fixtures/spheres.blend --size 512 --scales 1,0.5 --start-service

It drives the viewport's own code (addon/viewport.py's ViewportState) from the scene camera's view at
SIZE x SIZE: one G-buffer change, then --changes world changes (the world's strength and, where it has a
Mapping node, its rotation), each shaded progressively (a preview pass, then the scene's options). Per
change it times, from the change to each pass's image: the world capture, the upload and submit, the
service's shading (with polling), the download and, before the first, the G-buffer render; the median
over the changes goes into a Markdown table (stdout, and --output). Drawing needs Blender's window (the
gpu module has no context in background mode), so the draw step is not in these figures.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import bpy

from . import properties, service_process, viewport

PARTS = (("gbuffer_ms", "G-buffer render"), ("world_ms", "world capture"), ("upload_ms", "upload"),
         ("shade_ms", "shade (service)"), ("service_decode_ms", "of which HDRI decode"),
         ("service_run_ms", "of which run"), ("download_ms", "download"))


def measure(scene, svc, size, scale, changes):
    """[(change kind, [(pass, timings, ms from the change to its image)])] for one G-buffer change, then
    `changes` world changes."""
    scene.pbnds.viewport_scale = scale
    arrivals = []
    state = viewport.ViewportState(svc, lambda: arrivals.append((time.perf_counter(), dict(state.shading.timings))))
    try:
        camera = scene.camera
        depsgraph = bpy.context.evaluated_depsgraph_get()
        state.set_view(camera.matrix_world.inverted(), camera.calc_matrix_camera(depsgraph, x=size, y=size),
                       size, size)
        runs = [_change(state, scene, arrivals, None)]
        background = next((n for n in scene.world.node_tree.nodes if n.type == "BACKGROUND"), None) \
            if scene.world and scene.world.node_tree else None
        mapping = next((n for n in scene.world.node_tree.nodes if n.type == "MAPPING"), None) if background else None
        for k in range(changes):
            def edit(k=k):
                if background is not None:
                    background.inputs["Strength"].default_value *= 1.1 if k % 2 == 0 else 1 / 1.1
                if mapping is not None:
                    mapping.inputs["Rotation"].default_value[2] += 0.3
            runs.append(_change(state, scene, arrivals, edit))
    finally:
        state.free()
    return runs


def _change(state, scene, arrivals, edit):
    """Apply `edit` (None: the first, G-buffer change), tick, wait; [(pass, timings, ms from the change)]."""
    arrivals.clear()
    started = time.perf_counter()
    if edit is not None:
        edit()
    kind = state.tick(scene, bpy.context.evaluated_depsgraph_get())
    state.shading.wait(600)
    if state.last_error or state.shading.error:
        raise RuntimeError(state.last_error or state.shading.error)
    return kind, [(timings["pass"], timings, (at - started) * 1e3) for at, timings in arrivals]


def table(results, size):
    header = "| G-buffer | change | pass | to image ms | " + " | ".join(label for _, label in PARTS) + " |"
    lines = [header, "|" + "---|" * (4 + len(PARTS))]
    for scale, runs in results:
        pixels = f"{round(size * scale)}x{round(size * scale)}"
        groups = {}
        for kind, passes in runs:
            for number, timings, to_image in passes:
                groups.setdefault((kind, number), []).append((timings, to_image))
        for (kind, number), rows in groups.items():
            def median(key, rows=rows):
                values = [t[key] for t, _ in rows if key in t]
                return f"{statistics.median(values):.0f}" if values else ""
            lines.append(f"| {pixels} | {kind} (n={len(rows)}) | {number} | "
                         f"{statistics.median(r[1] for r in rows):.0f} | "
                         + " | ".join(median(key) for key, _ in PARTS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m addon.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("blend", help=".blend file (its scene camera is the view)")
    parser.add_argument("--size", type=int, default=512, help="viewport size in pixels, square (default 512)")
    parser.add_argument("--scales", default="1,0.5", help="viewport resolution scales (default 1,0.5)")
    parser.add_argument("--changes", type=int, default=5, help="world changes per scale (default 5)")
    parser.add_argument("--service", default="", help="service URL (default: the discovery file)")
    parser.add_argument("--start-service", action="store_true", help="start a service if none answers")
    parser.add_argument("--output", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.blend))
    properties.register()
    scene = bpy.context.scene
    svc = service_process.connect(args.service, auto_start=args.start_service, python=sys.executable)
    try:
        results = [(float(s), measure(scene, svc, args.size, float(s), args.changes)) for s in args.scales.split(",")]
    finally:
        service_process.stop_started()
    options = scene.pbnds.job_options()
    text = (f"Viewport latency, {os.path.basename(args.blend)}, {args.size}x{args.size} viewport, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, passes: "
            f"1 = {viewport.PREVIEW}, 2 = the scene's options {options}. Median ms from the change to each "
            f"pass's image (drawing not included: it needs Blender's window).\n\n{table(results, args.size)}\n")
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
