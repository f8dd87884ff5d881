"""The `pbnds` command: shade, demo, serve, and the training/evaluation/benchmark subcommands."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .jobformat import SAMPLINGS, JobError, Options


def add_shading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="default, pbnds-paper, lambert, blinn-phong, ggx or a .safetensors path "
                        "(default: the job's option, else 'default')")
    parser.add_argument("--rays", type=int, help="light rays per pixel (default: the job's, else 128)")
    parser.add_argument("--sampling", choices=SAMPLINGS, help="ray set (default: the job's, else mis)")
    parser.add_argument("--seed", type=int, help="ray-set seed (default: the job's, else 0)")
    parser.add_argument("--no-shadows", action="store_true", help="skip the shadow estimator")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")


def options_override(job_options: Options, args: argparse.Namespace) -> Options:
    keys = ("model", "rays", "sampling", "seed")
    values = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.no_shadows:
        values["shadows"] = False
    return Options.from_dict(values, job_options)


def progress_bar(total_label: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=total_label, unit="%", leave=False, file=sys.stderr)

    def update(fraction: float) -> None:
        bar.n = round(100 * fraction)
        bar.refresh()

    return bar, update


def shade_and_write(job, args) -> int:
    from .imageio import save_png
    from .jobformat import write_result
    from .renderer import Renderer

    job.options = options_override(job.options, args)
    renderer = Renderer(args.device)
    bar, update = progress_bar(f"shading on {renderer.device}")
    with bar:
        result = renderer.render(job, progress=update)
    write_result(args.output, result)
    if args.preview:
        save_png(args.preview, result.shaded)
    print(json.dumps({"output": str(args.output), "device": result.meta["device"],
                      "model": job.options.model, "timings": result.meta["timings"]}))
    return 0


def cmd_shade(args) -> int:
    from .jobformat import load_job

    return shade_and_write(load_job(args.job), args)


def cmd_demo(args) -> int:
    """Shade the bundled synthetic scene (three spheres on a plane under the bundled HDRI)."""
    from .jobformat import write_job
    from .synthetic import demo_scene_job

    job = demo_scene_job(args.width, args.height)
    if args.job_dir:
        write_job(job, args.job_dir)
    return shade_and_write(job, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbnds", description="Physics-based neural deferred shading backend.")
    commands = parser.add_subparsers(dest="command", required=True)

    shade = commands.add_parser("shade", help="shade a job folder (job.json + gbuffer.exr + hdri.exr)")
    shade.add_argument("job", type=Path, help="job.json or the folder holding it")
    shade.add_argument("-o", "--output", type=Path, required=True, help="result EXR (shaded, unshadowed, shadow)")
    shade.add_argument("--preview", type=Path, help="also write the shaded image as an sRGB PNG")
    add_shading_options(shade)
    shade.set_defaults(handler=cmd_shade)

    demo = commands.add_parser("demo", help="shade the bundled synthetic demo scene")
    demo.add_argument("-o", "--output", type=Path, default=Path("demo.exr"))
    demo.add_argument("--preview", type=Path, default=Path("demo.png"))
    demo.add_argument("--job-dir", type=Path, help="also write the demo job's files here")
    demo.add_argument("--width", type=int, default=256)
    demo.add_argument("--height", type=int, default=192)
    add_shading_options(demo)
    demo.set_defaults(handler=cmd_demo)

    # subcommands that live in their own modules register themselves: module.add_parser(commands)
    for module in ("backend.service.cli", "backend.bench", "training.datagen", "training.train", "training.evaluate"):
        try:
            importlib.import_module(module).add_parser(commands)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (JobError, ValueError, RuntimeError, OSError) as error:
        print(f"pbnds {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
