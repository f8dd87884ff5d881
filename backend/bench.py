"""`pbnds bench`: shading time and peak memory of the models on this machine, as a Markdown table.

For each device (CPU, and CUDA when present), size and ray count it times Renderer.shade on the
synthetic demo scene (prepared G-buffer: the lighting-dependent part of a render):

- pbnds-paper: the paper-faithful architecture run plainly, the reference of the speed-up column. It is
  slow (~105 s per 256x256 frame on a 2-core CPU), so only its first --paper-pixels foreground pixels
  are shaded and the shader loop's time is scaled to the whole frame (the table marks such rows); no
  shadow net.
- default: the default shader through the fast path (backend/fastpath.py), with and without its shadow
  net, and through the plain reference path (extrapolated from 16 x --paper-pixels pixels where larger).
- ggx: the classical baseline through the fast path.

Precision fp32, and bf16: the fast path's hidden-layer products in bfloat16 (Renderer(precision="bf16"),
shadow net under autocast), the paper shader under torch.autocast. One warm-up run is excluded; the
median and the min-max spread of --repeat runs are reported. Peak memory is the rise of the process's
peak resident set (CPU, /proc/self/status VmHWM after a reset) or torch's peak allocation (CUDA).

`--steps` instead measures what each optimisation of the fast path bought, one switched on at a time.

Threads: `--threads N` sets torch's CPU threads; `--quick` defaults to 1 (on a shared or small machine two
OpenMP threads can be slower than one, and one thread makes runs comparable), the full run to torch's own
choice. Every report's header states the thread count, where it came from, and the full command line that
reproduces the run at these settings, whatever the defaults become.

`--quick` (256x256, 64 rays, fp32, 3 runs, 512 paper pixels, 1 thread) keeps the table's point, the
reference paths beside the fast path, and takes well under 2 minutes on a 2-core CPU; add `--sizes`,
`--precisions fp32,bf16` and so on for more.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

DEFAULT_SIZES = "256x256,512x512,1920x1080"
DEFAULT_RAYS = "32,64,128"
# (full run, --quick) for every setting a user can leave out; threads None: torch's own choice
DEFAULTS = {"sizes": (DEFAULT_SIZES, "256x256"), "rays": (DEFAULT_RAYS, "64"), "precisions": ("fp32,bf16", "fp32"),
            "repeat": (5, 3), "paper_pixels": (2048, 512), "threads": (None, 1)}
QUICK_SIZES, QUICK_RAYS = DEFAULTS["sizes"][1], DEFAULTS["rays"][1]


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help="time the shading models on this machine (Markdown table)")
    def default(key: str) -> str:
        full, quick = DEFAULTS[key]
        full = "torch's choice" if full is None else full
        return f"default {full}; --quick: {quick}"

    bench.add_argument("--sizes", help=f"WIDTHxHEIGHT,... ({default('sizes')})")
    bench.add_argument("--rays", help=f"ray counts, comma-separated ({default('rays')})")
    bench.add_argument("--quick", action="store_true", help="one size, one ray count, fp32, 3 runs, 512 paper "
                       "pixels, 1 thread: the reference and fast paths side by side in well under 2 minutes on a "
                       "2-core CPU")
    bench.add_argument("--repeat", type=int, help=f"timed runs per case after one warm-up ({default('repeat')})")
    bench.add_argument("--devices", default="auto", help="auto (cpu, and cuda when present) or a comma list")
    bench.add_argument("--precisions", help=f"fp32, bf16 or both ({default('precisions')})")
    bench.add_argument("--sampling", default="importance", help="ray set (default importance)")
    bench.add_argument("--paper-pixels", type=int, help="foreground pixels the slow plain paths shade before "
                       f"extrapolating ({default('paper_pixels')})")
    bench.add_argument("--threads", type=int, help=f"torch CPU threads ({default('threads')}); stated in the report")
    bench.add_argument("--steps", action="store_true", help="measure each fast-path optimisation instead")
    bench.add_argument("--relight", action="store_true", help="time relights of a cached G-buffer instead (default "
                       "model, stratified rays, the HDRI rotated between runs), with the screen-space transport's part")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile (and the Triton kernel, "
                       "under TRITON_INTERPRET on a CPU) on a CPU; on CUDA they are always timed")
    bench.add_argument("--output", type=Path, help="also write the Markdown report here")
    bench.set_defaults(handler=cmd_bench)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(devices: list[str]) -> str:
    import torch

    parts = [f"CPU {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
             f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if "cuda" in devices:
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    if hasattr(os, "getloadavg"):
        parts.append("load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
    return ", ".join(parts)


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA's peak allocation, or the rise of the process's peak RSS on a CPU."""

    def __init__(self, device: str):
        self.device, self.mib = device, float("nan")

    @staticmethod
    def _rss_kib(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _trim_heap()  # hand freed memory back, so that this block's allocations raise the RSS again
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self._base = self._rss_kib("VmRSS:")
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            peak = self._rss_kib("VmHWM:")
            if peak is not None and self._base is not None:
                self.mib = (peak - self._base) / 1024


def _timed(run, device: str, repeat: int) -> tuple[list[float], float, list[dict]]:
    """(seconds of each of `repeat` runs after one warm-up, peak MiB of the first timed run, what each returned)."""
    import torch

    run()
    times, returned = [], []
    peak = float("nan")
    for index in range(repeat):
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            returned.append(run())
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        if index == 0:
            peak = memory.mib
    return times, peak, returned


def _subset(prepared, count: int):
    """The prepared G-buffer with only its first `count` foreground pixels shaded (the screen-space transport
    still covers the whole image, as in a full render)."""
    import dataclasses

    subset = dataclasses.replace(prepared, pixels=prepared.pixels.slice(0, count), index=prepared.index[:count])
    subset.screen_space = prepared.screen_space  # built from all the pixels
    return subset


VARIANTS = (  # label, model, fast path, shadows, subset (x --paper-pixels shaded, then extrapolated; 0: all)
    ("pbnds-paper (reference)", "pbnds-paper", False, False, 1),
    ("default + shadow net", "default", True, True, 0),
    ("default, shader only", "default", True, False, 0),
    ("default, plain path", "default", False, True, 16),
    ("ggx", "ggx", True, False, 0),
)
COMPILED_VARIANTS = (  # label, Renderer keyword: on CUDA always, on a CPU with --compile (compiling takes minutes)
    ("default, shader only, torch.compile", "compile"),
    ("default, shader only, Triton kernel", "triton"),
)


def bench_rows(args: argparse.Namespace, devices: list[str], sizes: list[tuple[int, int]], rays_list: list[int],
               precisions: list[str], repeat: int, paper_pixels: int) -> list[dict]:

    from .jobformat import Options
    from .renderer import Renderer
    from .synthetic import demo_scene_job

    rows = []
    for device in devices:
        for width, height in sizes:
            job = demo_scene_job(width, height)
            for rays in rays_list:
                for precision in precisions:
                    variants = [(*v, {}) for v in VARIANTS]
                    if device == "cuda" or args.compile:
                        variants += [(label, "default", True, False, 0, {keyword: True})
                                     for label, keyword in COMPILED_VARIANTS if keyword != "triton" or _has_triton()]
                    for label, model, fast, shadows, subset, extra in variants:
                        renderer = Renderer(device, fast=fast, precision=precision, **extra)
                        prepared = renderer.prepare(job)
                        count = len(prepared.pixels)
                        timed = _subset(prepared, min(subset * paper_pixels, count)) if subset else prepared
                        options = Options(model=model, rays=rays, sampling=args.sampling, shadows=shadows)
                        autocast = precision == "bf16" and not fast
                        times, peak, results = _timed(partial(_shade, renderer, timed, job.hdri, options, autocast),
                                                      device, repeat)
                        scale = 1.0
                        if len(timed.pixels) < count:  # shader time x count / subset; shadow net and the rest kept
                            shade_s = statistics.median(r.meta["timings"]["shade_ms"] for r in results) / 1e3
                            whole = statistics.median(times)
                            scale = (whole + shade_s * (count / len(timed.pixels) - 1)) / whole
                        row = {"device": device, "size": f"{width}x{height}", "rays": rays, "variant": label,
                               "precision": precision, "median_ms": statistics.median(times) * 1e3 * scale,
                               "min_ms": min(times) * 1e3 * scale, "max_ms": max(times) * 1e3 * scale,
                               "peak_mib": peak, "timed_pixels": len(timed.pixels), "pixels": count}
                        rows.append(row)
                        print(f"{device} {width}x{height} {rays} rays {precision} {label}: "
                              f"{row['median_ms']:.0f} ms" + (" (extrapolated)" if scale != 1 else ""), file=sys.stderr)
    return rows


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _shade(renderer, prepared, hdri, options, autocast: bool):
    import torch

    with torch.autocast(renderer.device.type, dtype=torch.bfloat16, enabled=autocast):
        return renderer.shade(prepared, hdri, options)


def report(rows: list[dict], head: str, args: argparse.Namespace, repeat: int) -> str:
    reference = {(r["device"], r["size"], r["rays"]): r["median_ms"] for r in rows
                 if r["variant"].startswith("pbnds-paper") and r["precision"] == "fp32"}
    lines = ["# `pbnds bench`", "",
             head.rstrip("\n"), "",
             f"Synthetic demo scene, {args.sampling} rays, time of Renderer.shade on a prepared G-buffer "
             "(shader + shadow net where listed, the shadow net's part including the screen-space transport; "
             "the G-buffer upload and decode are not included). "
             f"Median of {repeat} timed runs after one warm-up, spread = min-max. Rows marked *N shaded only the "
             "first N foreground pixels and were extrapolated to the whole frame: the shader loop's time x "
             "pixels / N, the rest (rays, shadow net on the whole image) as measured. "
             "Speed-up: against pbnds-paper fp32 on the same device, "
             "size and rays. bf16: the fast path's hidden-layer products (and the shadow net) in bfloat16; "
             "the paper shader under torch.autocast.", "",
             "| device | size | fg pixels | rays | model | precision | median ms | spread ms | peak MiB "
             "| speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = reference.get((r["device"], r["size"], r["rays"]))
        star = f" *{r['timed_pixels']}" if r["timed_pixels"] < r["pixels"] else ""
        lines.append(f"| {r['device']} | {r['size']} | {r['pixels']} | {r['rays']} | {r['variant']}{star} "
                     f"| {r['precision']} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-{r['max_ms']:.0f} "
                     f"| {r['peak_mib']:.0f} | {ref / r['median_ms'] if ref else float('nan'):.1f}x |")
    return "\n".join(lines) + "\n"


def optimisation_steps(args: argparse.Namespace, repeat: int) -> str:
    """The default shader on the 256x256 demo scene's first 16384 pixels, 64 rays: plain, then the fast path
    with one optimisation after another (each row keeps the ones above it); and the shadow net at 512x512."""
    import torch

    from . import fastpath
    from .envmap import EnvironmentMap
    from .models import new_model
    from .renderer import Renderer
    from .sampling import make_rays
    from .synthetic import demo_scene_job

    job = demo_scene_job(256, 256)
    prepared = Renderer("cpu").prepare(job)
    pixels = prepared.pixels.slice(0, 16384)
    envmap = EnvironmentMap(job.hdri)
    rays = make_rays(args.sampling, 64, 0, envmap=envmap)
    radiance = envmap.lookup(rays.directions)
    shader = new_model("default").shader.eval()
    onednn = fastpath._ONEDNN_LINEAR
    steps = [("plain reference (shaders.py)", lambda: shader(pixels, rays, radiance), None)]
    unchunked = fastpath.FastShader(shader, pairs_per_chunk=1 << 40)
    steps.append(("fast path: scalar geometry, split Fresnel, in-place MLP, addmm, one chunk",
                  lambda: unchunked(pixels, rays, radiance), None))
    chunked = fastpath.FastShader(shader)
    steps.append(("+ chunks of 65536 (pixel, ray) pairs", lambda: chunked(pixels, rays, radiance), None))
    steps.append(("+ oneDNN linear (fused ReLU) instead of addmm", lambda: chunked(pixels, rays, radiance), onednn))
    low = fastpath.FastShader(shader, precision="bf16")
    steps.append(("+ bf16 hidden-layer products", lambda: low(pixels, rays, radiance), onednn))
    if args.compile:  # the warm-up run compiles (not timed)
        compiled = fastpath.FastShader(shader, compile=True)
        steps.append(("fp32 + torch.compile of the chunk function (inductor)",
                      lambda: compiled(pixels, rays, radiance), onednn))
        compiled_low = fastpath.FastShader(shader, precision="bf16", compile=True)
        steps.append(("bf16 + torch.compile", lambda: compiled_low(pixels, rays, radiance), onednn))
    lines = ["| step | ms | vs plain |", "|---|---|---|"]
    base = None
    with torch.inference_mode():
        for label, run, linear in steps:
            fastpath._ONEDNN_LINEAR = linear
            try:
                times, _, _ = _timed(run, "cpu", repeat)
            finally:
                fastpath._ONEDNN_LINEAR = onednn
            ms = statistics.median(times) * 1e3
            base = base or ms
            lines.append(f"| {label} | {ms:.0f} | {base / ms:.1f}x |")
            print(lines[-1], file=sys.stderr)
        shadow = new_model("default").shadow.eval()
        images = [torch.rand(1, c, 512, 512) for c in (3, 3, 3, 1, 1, 1, 1, 3)]  # the last two: visibility, indirect
        for label, memory_format in (("shadow net 512x512, NCHW", torch.contiguous_format),
                                     ("shadow net 512x512, channels_last", torch.channels_last)):
            shadow.to(memory_format=memory_format)
            times, _, _ = _timed(lambda: shadow(*images), "cpu", repeat)
            lines.append(f"| {label} | {statistics.median(times) * 1e3:.0f} | |")
            print(lines[-1], file=sys.stderr)
    return (f"Optimisation steps, default shader (untrained weights: the cost does not depend on them), "
            f"16384 pixels x 64 {args.sampling} rays, CPU, median of {repeat}:\n\n" + "\n".join(lines) + "\n")


def relight_report(args: argparse.Namespace, devices: list[str], sizes: list[tuple[int, int]],
                   rays_list: list[int], repeat: int) -> str:
    """Renderer.relight of the demo scene: the world changes, the G-buffer and its relight cache stay."""
    from .jobformat import Options
    from .renderer import Renderer
    from .synthetic import demo_scene_job

    lines = ["| device | size | rays | relight ms | screen-space transport ms | shadow net and compositing ms |",
             "|---|---|---|---|---|---|"]
    for device in devices:
        renderer = Renderer(device)
        for width, height in sizes:
            job = demo_scene_job(width, height)
            prepared = renderer.prepare(job)
            for rays in rays_list:
                cache = renderer.relight_cache(prepared, Options(model="default", rays=rays, sampling="stratified"))
                renderer.relight(cache, job.hdri, 0.0)  # warm-up: marches the bounce and reflection paths once
                runs = [renderer.relight(cache, job.hdri, 0.1 * (k + 1)) for k in range(repeat)]
                timed = {key: statistics.median(r.meta["timings"][key] for r in runs)
                         for key in ("transport_ms", "shadow_ms")}
                total = statistics.median(sum(r.meta["timings"][k] for k in ("shade_ms", "shadow_ms")) for r in runs)
                # tenths of a millisecond: at a tiny size whole ones can print the transport equal to the relight
                lines.append(f"| {device} | {width}x{height} | {rays} | {total:.1f} | {timed['transport_ms']:.1f} "
                             f"| {timed['shadow_ms'] - timed['transport_ms']:.1f} |")
                print(lines[-1], file=sys.stderr)
    return (f"Relights (Renderer.relight: radiance lookup and contraction, screen-space transport, shadow net), "
            f"demo scene, default model, stratified rays, median of {repeat} rotations after one warm-up:\n\n"
            + "\n".join(lines) + "\n")


def resolve(args: argparse.Namespace) -> dict:
    """The run's settings: what was given, else the --quick or full default (threads: None = torch's choice)."""
    column = 1 if args.quick else 0
    settings = {key: getattr(args, key) if getattr(args, key) is not None else values[column]
                for key, values in DEFAULTS.items()}
    if args.threads is not None:
        settings["threads_source"] = "--threads"
    elif settings["threads"] is not None:
        settings["threads_source"] = "the --quick default"
    else:
        settings["threads_source"] = "not set: torch's default"
    return settings


def command_line(args: argparse.Namespace, settings: dict, threads: int) -> str:
    """The `pbnds bench` command that repeats this run with every setting spelled out."""
    parts = ["pbnds bench"]
    if args.steps:
        parts.append("--steps" + (" --compile" if args.compile else ""))
    elif args.relight:
        parts += ["--relight", f"--sizes {settings['sizes']}", f"--rays {settings['rays']}"]
    else:
        parts += [f"--sizes {settings['sizes']}", f"--rays {settings['rays']}",
                  f"--precisions {settings['precisions']}", f"--paper-pixels {settings['paper_pixels']}"]
        if args.compile:
            parts.append("--compile")
    if not args.relight:
        parts.append(f"--sampling {args.sampling}")
    parts += [f"--repeat {settings['repeat']}", f"--threads {threads}"]
    if args.devices != "auto":
        parts.append(f"--devices {args.devices}")
    return " ".join(parts)


def header(args: argparse.Namespace, settings: dict, devices: list[str]) -> str:
    import torch

    threads = torch.get_num_threads()
    return (f"Machine: {machine_line(devices)}.\n\n"
            f"Threads: {threads} torch CPU thread{'s' if threads != 1 else ''} ({settings['threads_source']}).\n\n"
            f"Command: `{command_line(args, settings, threads)}`"
            + (" (--quick filled in the settings not given)" if args.quick else "") + ".\n\n")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    settings = resolve(args)
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    repeat = settings["repeat"]
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if "cuda" in devices and not torch.cuda.is_available():
        raise RuntimeError("--devices names cuda but PyTorch sees no CUDA device")
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in settings["sizes"].split(",")]
    rays_list = [int(r) for r in settings["rays"].split(",")]
    head = header(args, settings, devices)
    if args.steps:
        text = head + optimisation_steps(args, repeat)
    elif args.relight:
        text = head + relight_report(args, devices, sizes, rays_list, repeat)
    else:
        precisions = [p.strip() for p in settings["precisions"].split(",")]
        rows = bench_rows(args, devices, sizes, rays_list, precisions, repeat, settings["paper_pixels"])
        text = report(rows, head, args, repeat)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0
