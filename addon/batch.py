"""Batch rendering through the PBNDS service, for pipelines.

Inside Blender:   blender -b shot.blend --python addon/batch.py -- --frames 1-10 --out DIR
With bpy module:  python -m addon.batch shot.blend --frames 1-10 --out DIR

Per frame it writes frame_NNNN.exr (linear shaded RGBA) and frame_NNNN.png (through the scene's
view transform and look), and with --keep-jobs the job folder and the service's result EXR under
jobs/frame_NNNN/. Frames whose EXR and PNG exist are skipped, so an interrupted run resumes.
Exits non-zero when any frame failed.
"""

import argparse
import contextlib
import importlib
import os
import pathlib
import shutil
import sys
import tempfile
import time

if not __package__:
    # Run as a script (`blender --python addon/batch.py`): import the package this file belongs to
    # so the relative imports below work (PEP 366).
    _here = pathlib.Path(__file__).resolve().parent
    sys.path.insert(0, str(_here.parent))
    __package__ = _here.name
    importlib.import_module(__package__)

import bpy  # noqa: E402

from . import client, compat, compositor, engine, gbuffer, properties, service_process  # noqa: E402
from .scene_state import preserved  # noqa: E402


def parse_frames(text):
    """'1-3,7,10-12' -> [1, 2, 3, 7, 10, 11, 12]."""
    frames = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad frame range {part!r}: use e.g. 1-10,15") from None
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad frame range {part!r}: end before start")
        frames.extend(range(lo, hi + 1))
    return sorted(set(frames))


def build_parser(in_blender):
    parser = argparse.ArgumentParser(
        prog="blender -b FILE.blend --python addon/batch.py --" if in_blender else "python -m addon.batch",
        description="Render frames of a .blend with PBNDS neural shading: a Cycles G-buffer per frame, "
                    "shaded by the PBNDS service. Settings default to the scene's PBNDS settings.",
    )
    if not in_blender:
        parser.add_argument("blend", help=".blend file to render")
    parser.add_argument("--frames", type=parse_frames, help="frames, e.g. 1-10,15 (default: the scene's range)")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    parser.add_argument("--scene", help="scene name (default: the file's active scene)")
    parser.add_argument("--model", help="model name (default, pbnds-paper, lambert, blinn-phong, ggx, ...)")
    parser.add_argument("--rays", type=int, help="light rays per pixel")
    parser.add_argument("--sampling", choices=[s[0] for s in properties.SAMPLING], help="ray sampling")
    parser.add_argument("--no-shadows", action="store_true", help="skip the shadow estimator")
    parser.add_argument("--samples", type=int, help="Cycles samples of the G-buffer")
    parser.add_argument("--resolution-percentage", type=int, help="override the scene's resolution %%")
    parser.add_argument("--keep-jobs", action="store_true", help="keep job files and result EXRs in OUT/jobs")
    parser.add_argument("--cycles-reference", type=int, metavar="SAMPLES",
                        help="also render frame_NNNN_cycles.png with Cycles at SAMPLES samples, to compare")
    parser.add_argument("--overwrite", action="store_true", help="render frames whose outputs exist")
    parser.add_argument("--service", default="", help="service URL (default: the discovery file)")
    parser.add_argument("--token", default="", help="service token (default: the discovery file)")
    parser.add_argument("--start-service", action="store_true",
                        help="start the service when none answers (and stop it at the end)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for --start-service, with the pbnds backend installed "
                             "(default: this one; Blender's own Python has no torch)")
    parser.add_argument("--service-dir", help="working folder for --start-service")
    return parser


def apply_overrides(settings, args):
    """Copy the command line's settings onto scene.pbnds (the file is never saved)."""
    if args.model:
        known = {m[0] for m in properties.MODELS}
        settings.model = args.model if args.model in known else "CUSTOM"
        if settings.model == "CUSTOM":
            settings.custom_model = args.model
    for name, value in (("rays", args.rays), ("sampling", args.sampling), ("gbuffer_samples", args.samples)):
        if value is not None:
            setattr(settings, name, value)
    if args.no_shadows:
        settings.shadows = False


def save_outputs(scene, arrays, exr_path, png_path):
    """Linear EXR and view-transformed PNG of the shaded layer, each written then renamed."""
    pixels = compositor.rgba(arrays, "shaded", scene.render.film_transparent)
    for path, file_format in ((exr_path, "OPEN_EXR"), (png_path, "PNG")):
        partial = path.with_name(f".partial-{path.name}")
        compositor.save_image(pixels, partial, scene, file_format)
        os.replace(partial, path)


def render_cycles_reference(scene, samples, png_path):
    """The same frame from Cycles at ``samples`` samples (denoised), as a PNG beside the neural one."""
    with preserved(scene):
        scene.render.engine = "CYCLES"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = True
        compat.set_file_format(scene.render.image_settings, "PNG")
        scene.render.filepath = str(png_path)
        bpy.ops.render.render(write_still=True, scene=scene.name)


@contextlib.contextmanager
def _timed(timings, name):
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started


def render_frame(svc, scene, frame, args, exr_path, png_path, timings):
    """Render one frame to `exr_path` and `png_path`; the seconds of each part go into the dict `timings`."""
    job_dir = args.out / "jobs" / f"frame_{frame:04d}" if args.keep_jobs else None
    workdir = str(job_dir) if job_dir else tempfile.mkdtemp(prefix="pbnds-job-")
    try:
        os.makedirs(workdir, exist_ok=True)
        scene.frame_set(frame)  # evaluate the animation here, as Blender's own animation render does
        warnings = []
        job_id, job_json = engine.run_job(svc, scene, workdir, scene.pbnds, frame=frame, warnings=warnings,
                                          timings=timings)
        for message in warnings:
            print(f"pbnds batch: frame {frame}: warning: {message}", file=sys.stderr, flush=True)
        if job_dir:
            svc.result_exr(job_id, job_dir / "result.exr")
        with _timed(timings, "download"):
            arrays = svc.result_arrays(job_id)
        with _timed(timings, "backdrop"):
            compositor.add_background(scene, arrays, workdir)
        with _timed(timings, "save"):
            save_outputs(scene, arrays, exr_path, png_path)
        if args.cycles_reference:
            with _timed(timings, "Cycles reference"):
                render_cycles_reference(scene, args.cycles_reference,
                                        png_path.with_name(f"frame_{frame:04d}_cycles.png"))
    finally:
        if not job_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args):
    """Render the frames; returns the process exit code."""
    if getattr(args, "blend", None):
        bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.blend))
    scene = bpy.data.scenes[args.scene] if args.scene else bpy.context.scene
    if args.resolution_percentage:
        scene.render.resolution_percentage = args.resolution_percentage
    apply_overrides(scene.pbnds, args)
    frames = args.frames or list(range(scene.frame_start, scene.frame_end + 1))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        svc = service_process.connect(args.service, args.token, auto_start=args.start_service,
                                      python=args.python, cwd=args.service_dir)
    except client.ServiceError as exc:
        print(f"pbnds batch: {exc}", file=sys.stderr)
        return 2
    print(f"pbnds batch: scene {scene.name!r}, {len(frames)} frame(s), service {svc.url}, "
          f"options {scene.pbnds.job_options()}, G-buffer samples {scene.pbnds.gbuffer_samples}")
    results = []
    try:
        for frame in frames:
            exr_path = args.out / f"frame_{frame:04d}.exr"
            png_path = args.out / f"frame_{frame:04d}.png"
            if not args.overwrite and exr_path.exists() and png_path.exists():
                results.append((frame, "skipped", 0.0, "outputs exist"))
                continue
            start = time.monotonic()
            timings = {}
            try:
                render_frame(svc, scene, frame, args, exr_path, png_path, timings)
            except (client.ServiceError, gbuffer.ExportError, OSError) as exc:
                results.append((frame, "failed", time.monotonic() - start, str(exc)))
            except Exception as exc:  # noqa: BLE001 - one broken frame must not stop the others
                results.append((frame, "failed", time.monotonic() - start, f"{type(exc).__name__}: {exc}"))
            else:
                results.append((frame, "done", time.monotonic() - start, str(exr_path)))
            _, status, seconds, detail = results[-1]
            parts = "".join(f", {name} {part:.1f}" for name, part in timings.items())
            print(f"pbnds batch: frame {frame}: {status} ({seconds:.1f} s{parts}) {detail}", flush=True)
    finally:
        if args.start_service:
            service_process.stop_started()
    counts = {s: sum(r[1] == s for r in results) for s in ("done", "skipped", "failed")}
    print(f"pbnds batch summary: {counts['done']} done, {counts['skipped']} skipped, "
          f"{counts['failed']} failed, {sum(r[2] for r in results):.1f} s")
    for frame, status, _, detail in results:
        if status == "failed":
            print(f"  frame {frame}: {detail}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def main(argv=None):
    in_blender = argv is None and "--" in sys.argv  # Blender passes script arguments after `--`
    if argv is None:
        argv = sys.argv[sys.argv.index("--") + 1:] if in_blender else sys.argv[1:]
    args = build_parser(in_blender).parse_args(argv)
    if not hasattr(bpy.types.Scene, "pbnds"):
        properties.register()
        compat.unregister_at_exit(properties.PBNDSSceneSettings, properties.unregister)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
