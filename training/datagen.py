"""`pbnds generate` (procedural dataset) and `pbnds export` (a folder of .blend files), docs/dataset.md.

Both write our dataset root: ``splits.json`` plus one folder per scene written by
addon.dataset.export_dataset. Work is split into tasks (one scene, or one .blend file), each run in
its own Python process (``python -m training.datagen TASK.json``, bpy imported there only), up to
``--workers`` at a time: Blender can crash or hang on odd input, and a process per task confines a
crash or a timeout to that task (a multiprocessing pool cannot tell which task killed a worker).
Tasks with timed Cycles renders (test, relight) run first and alone, on every core. Blender's console
output goes to ``OUT/logs/<task>.log``; the terminal gets a tqdm bar and a summary.

Scenes come in families (``--families``, training/scenes.py): round-robin by scene index within a
split, test over all selected families, train/val/lamps over those not in HELD_OUT_FAMILIES; each
scene's scene.json records its family and splits.json lists them under "families".

Generation is deterministic per ``--seed`` (scene i of the whole run has seed ``seed * 1000000 + i``,
so adding train scenes changes no other scene; its family does not change its seed) and resumable
(with the same families): a scene whose dataset.json lists every sample with its files is skipped,
and export_dataset skips finished samples of the others. The work runs evaluation first (test,
relight, anim, lamps, val), then train; splits.json is rewritten after every finished scene and lists
finished scenes only, so a partial dataset loads. ``READY`` is written when every task succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .scenes import FAMILIES, HELD_OUT_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SPLIT_ORDER = ("test", "relight", "anim", "lamps", "val", "train")
ANIM_STEP_DEGREES = 4.0


def add_parser(commands) -> None:
    gen = commands.add_parser("generate", help="render a procedural dataset with Blender (bpy)")
    gen.add_argument("out", type=Path, help="dataset root to write (resumes one that exists)")
    gen.add_argument("--scenes", type=int, default=40, help="train scenes (default 40)")
    gen.add_argument("--val", type=int, default=4, help="val scenes (default 4)")
    gen.add_argument("--test", type=int, default=6, help="test scenes, also re-lit for 'relight' (default 6)")
    gen.add_argument("--views", type=int, default=3, help="orbit views per scene (default 3)")
    gen.add_argument("--hdris", type=int, default=2, help="lightings per scene (default 2)")
    gen.add_argument("--anim-frames", type=int, default=8, help="frames of the 'anim' split (0: none)")
    gen.add_argument("--lamps", type=int, default=0,
                     help="scenes of the 'lamps' split: lit by light objects and real-size suns, seeds of their own")
    gen.add_argument("--lamp-share", type=float, default=0.0,
                     help="share of train/val lightings replaced by lamp lightings (default 0, as gen-v1)")
    gen.add_argument("--families", default="all",
                     help="scene families, a comma list (default all: " + ",".join(FAMILIES) + "); held-out "
                     "ones (" + ",".join(HELD_OUT_FAMILIES) + ") go to the test split only")
    add_render_arguments(gen)
    gen.set_defaults(handler=cmd_generate)

    export = commands.add_parser("export", help="export a dataset from a folder of .blend files")
    export.add_argument("folder", type=Path, help="folder searched for .blend files (recursively)")
    export.add_argument("out", type=Path, help="dataset root to write")
    export.add_argument("--views", type=int, default=3, help="orbit views per file (default 3)")
    export.add_argument("--hdris", type=int, default=2, help="HDRI lightings per file (default 2)")
    export.add_argument("--val-fraction", type=float, default=0.1)
    export.add_argument("--test-fraction", type=float, default=0.1)
    add_render_arguments(export)
    export.set_defaults(handler=cmd_export)


def add_render_arguments(parser) -> None:
    parser.add_argument("--size", type=int, default=128, help="image width and height (default 128)")
    parser.add_argument("--gt-samples", type=int, default=64, help="Cycles samples of the ground truth (default 64)")
    parser.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True,
                        help="denoise the ground truth with OpenImageDenoise (default on; docs/dataset.md says when "
                        "more samples without it are the better reference)")
    parser.add_argument("--gbuffer-samples", type=int, default=4)
    parser.add_argument("--gt-filter-width", type=float, default=0.01,
                        help="Cycles pixel filter width (px) of the ground truth and the G-buffer's coverage "
                        "layer (default 0.01: point-sampled like the G-buffer; 1.5: anti-aliased like a user's "
                        "Cycles render)")
    parser.add_argument("--low-samples", default="1,4",
                        help="Cycles+OIDN sample counts rendered (timed) for test/relight ('' for none)")
    parser.add_argument("--hdri-width", type=int, default=512, help="width of each job's captured HDRI")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering at once (default 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a task is given up")
    parser.add_argument("--seed", type=int, default=0)


def render_settings(args) -> dict:
    return {"size": args.size, "gt_samples": args.gt_samples, "denoise": args.denoise,
            "gbuffer_samples": args.gbuffer_samples, "filter_width": args.gt_filter_width,
            "hdri_width": args.hdri_width, "threads": max(1, (os.cpu_count() or 1) // max(1, args.workers)),
            "low_samples": [int(n) for n in args.low_samples.split(",") if n.strip()]}


# --- planning -------------------------------------------------------------------------------------

def selected_families(text: str) -> list[str]:
    """The families named by --families ("all", or a comma list), in FAMILIES order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(FAMILIES)
    unknown = sorted(names - set(FAMILIES))
    if unknown or not names:
        raise ValueError(f"--families {text!r}: unknown {', '.join(unknown) or 'empty list'}; families are "
                         f"{', '.join(FAMILIES)} (or all)")
    return [family for family in FAMILIES if family in names]


def families_entry(families: list[str]) -> dict:
    """splits.json's "families": the run's families in order and those held out of train/val."""
    return {"all": list(families), "held_out": [f for f in families if f in HELD_OUT_FAMILIES]}


def plan(args) -> list[dict]:
    """The tasks of a `generate` run, evaluation splits first.

    Families go round-robin by scene index within a split: test (and so relight and anim) over every
    selected family, train, val and lamps over the selected ones that are not held out.
    """
    from .scenes import HELD_OUT_HDRIS

    families = selected_families(args.families)
    training = [f for f in families if f not in HELD_OUT_FAMILIES]
    if not training and (args.scenes or args.val or args.lamps):
        raise ValueError(f"--families {args.families}: every family is held out (test only); train, val and lamps "
                         f"need one of {', '.join(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)} "
                         "(or --scenes 0 --val 0 --lamps 0)")
    render = render_settings(args)
    counts = {"test": args.test, "val": args.val, "train": args.scenes, "lamps": args.lamps}
    ids = {}
    start = 0
    for split in ("test", "val", "train", "lamps"):  # new splits last: earlier scenes keep their seeds
        ids[split] = range(start, start + counts[split])
        start += counts[split]

    def family(split, scene_id):
        pool = families if split in ("test", "relight", "anim") else training
        return pool[(scene_id - ids["test" if split in ("relight", "anim") else split].start) % len(pool)]

    def task(split, scene_id, lighting, views, low):
        folder = f"{split}/scene_{scene_id:05d}"
        return {"kind": "scene", "folder": folder, "split": split, "scene_seed": args.seed * 1_000_000 + scene_id,
                "family": family(split, scene_id),
                "lighting": lighting, "views": views, "lightings": args.hdris, "anim_frames": args.anim_frames,
                "lamp_share": args.lamp_share if split in ("train", "val") else 0.0,
                "low_samples": render["low_samples"] if low else [], "render": render,
                "samples": views * (args.anim_frames if lighting == "anim" else
                                    len(HELD_OUT_HDRIS) if lighting == "relight" else args.hdris)}

    tasks = [task("test", i, "scene", args.views, True) for i in ids["test"]]
    tasks += [task("relight", i, "relight", args.views, True) for i in ids["test"]]
    if args.anim_frames and args.test:
        tasks.append(task("anim", ids["test"][0], "anim", 1, False))
    tasks += [task("lamps", i, "lamps", args.views, False) for i in ids["lamps"]]
    tasks += [task("val", i, "scene", args.views, False) for i in ids["val"]]
    tasks += [task("train", i, "scene", args.views, False) for i in ids["train"]]
    return tasks


def scene_complete(folder: Path, samples: int, low_samples: list[int], family: str | None = None) -> bool:
    """True if ``folder``/dataset.json lists ``samples`` samples whose files all exist (and, given
    ``family``, scene.json describes a scene of that family)."""
    if family is not None and scene_family(folder) != family:
        return False
    try:
        entries = json.loads((folder / "dataset.json").read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if len(entries) != samples:
        return False
    for entry in entries:
        lows = entry.get("cycles_low", [])
        if sorted(item["samples"] for item in lows) != sorted(low_samples):
            return False
        files = [entry["job"], entry["gt_full"], entry["gt_unshadowed"]] + [item["file"] for item in lows]
        names = [Path(entry["job"]).with_name(n) for n in ("gbuffer.exr", "hdri.exr")]
        if not all((folder / f).is_file() for f in files + names):
            return False
    return True


def scene_family(folder: Path) -> str | None:
    """The family in ``folder``/scene.json ("ground" when it has none: made before families), None without one."""
    try:
        return json.loads((folder / "scene.json").read_text()).get("family", "ground")
    except (OSError, ValueError, AttributeError):
        return None


def write_splits(out: Path, folders: dict[str, list[str]], families: dict | None = None) -> None:
    data = {"format": "pbnds-splits", "version": 1, **{split: folders.get(split, []) for split in SPLIT_ORDER}}
    if families is not None:
        data["families"] = families
    tmp = out / "splits.json.part"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / "splits.json")


# --- running tasks ----------------------------------------------------------------------------------

def _task_name(task: dict) -> str:
    return task.get("folder") or Path(task["blend"]).stem


def _run_one(task: dict, out: Path, timeout: float) -> dict:
    """Run one task in its own process; return its result (``{"ok": False, "error"}`` on a crash)."""
    name = _task_name(task).replace("/", "_")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    task_file, result_file = logs / f"{name}.task.json", logs / f"{name}.result.json"
    task_file.write_text(json.dumps({**task, "out": str(out), "result": str(result_file)}))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(logs / f"{name}.log", "a") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "training.datagen", str(task_file)], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s (log: {log.name})"}
    seconds = time.perf_counter() - start
    if result_file.is_file():
        return {**json.loads(result_file.read_text()), "seconds": seconds}
    return {"ok": False, "error": f"the worker process exited with code {code} and no result (log: {log.name})",
            "seconds": seconds}


def run_tasks(tasks: list[dict], out: Path, workers: int, timeout: float, desc: str, on_result) -> None:
    """Run ``tasks``, calling ``on_result(task, result)`` as each ends.

    Tasks with timed low-sample renders run first, one at a time with every core, so their timings
    are not those of a CPU shared with our other workers; then the rest, ``workers`` at a time.
    """
    from tqdm import tqdm

    timed = [{**t, "render": {**t["render"], "threads": 0}} for t in tasks if t.get("low_samples")]
    rest = [t for t in tasks if not t.get("low_samples")]
    with tqdm(total=sum(t.get("samples", 1) for t in tasks), desc=desc, unit="sample", file=sys.stderr) as bar:
        for batch, parallel in ((timed, 1), (rest, max(1, workers))):
            with ThreadPoolExecutor(parallel) as pool:
                futures = {pool.submit(_run_one, task, out, timeout): task for task in batch}
                for future in as_completed(futures):
                    task = futures[future]
                    result = future.result()
                    on_result(task, result)
                    state = "ok" if result.get("ok") else "skipped" if result.get("skipped") else "FAILED"
                    bar.set_postfix_str(f"{_task_name(task)} {state}")
                    bar.update(task.get("samples", 1))


# --- generate ---------------------------------------------------------------------------------------

def generate(args) -> dict:
    """Run (or resume) a generation; return the summary."""
    out = args.out.resolve()
    tasks = plan(args)
    families = selected_families(args.families)
    _check_resume_families(out, families)
    out.mkdir(parents=True, exist_ok=True)
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
              if key not in ("handler", "command")}
    config["families"] = ",".join(families)
    (out / "generate.json").write_text(json.dumps(config, indent=1))
    print(json.dumps({"generate": config}), file=sys.stderr)
    (out / "READY").unlink(missing_ok=True)
    done = {t["folder"] for t in tasks
            if scene_complete(out / t["folder"], t["samples"], t["low_samples"], t["family"])}
    folders: dict[str, list[str]] = {}

    def record() -> None:
        for split in SPLIT_ORDER:
            folders[split] = [t["folder"] for t in tasks if t["split"] == split and t["folder"] in done]
        write_splits(out, folders, families_entry(families))

    record()
    summary = {"scenes": len(tasks), "skipped": len(done), "rendered_samples": 0, "failed": [], "seconds": 0.0}
    start = time.perf_counter()

    def on_result(task, result):
        if result.get("ok"):
            done.add(task["folder"])
            summary["rendered_samples"] += result.get("rendered", 0)
            record()
        else:
            summary["failed"].append({"scene": task["folder"], "error": result.get("error")})

    todo = [t for t in tasks if t["folder"] not in done]
    run_tasks(todo, out, args.workers, args.timeout, "generate", on_result)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if summary["rendered_samples"]:
        summary["samples_per_hour"] = round(summary["rendered_samples"] * 3600 / summary["seconds"], 1)
    if not summary["failed"]:
        (out / "READY").write_text(json.dumps(summary) + "\n")
    return summary


def _check_resume_families(out: Path, families: list[str]) -> None:
    """Refuse to resume a dataset made with other families: its scenes would change family under their
    finished samples. A generate.json without "families" (made before families existed) had "ground" only."""
    try:
        before = json.loads((out / "generate.json").read_text())
    except (OSError, ValueError):
        return
    recorded = before.get("families", "ground") if isinstance(before, dict) else "ground"
    if recorded != ",".join(families):
        raise ValueError(f"{out} was generated with --families {recorded}; resume it with the same families "
                         f"(this run has {','.join(families)}) or write a new dataset")


def cmd_generate(args) -> int:
    summary = generate(args)
    print(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


def cmd_export(args) -> int:
    from . import blendervault

    summary = blendervault.export_folder(args)
    print(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


# --- inside a worker process ------------------------------------------------------------------------

def hdri_folder() -> Path:
    """Where Blender keeps its bundled studio-light HDRIs."""
    from addon import dataset

    return dataset.bundled_hdris()[0].parent


def training_hdris() -> list[str]:
    """The bundled studio-light HDRIs lighting train/val/test (all but the held-out ones)."""
    from addon import dataset

    from .scenes import HELD_OUT_HDRIS

    return [p.name for p in dataset.bundled_hdris() if p.name not in HELD_OUT_HDRIS]


def lightings_for(task: dict, description: dict) -> tuple[list[dict], bool]:
    """The lighting descriptions of a scene task and whether they form a sequence."""
    import math
    import random

    from .scenes import HELD_OUT_HDRIS, LAMP_SETUPS, lamp_lighting

    rng = random.Random(f"pbnds-{task['lighting']}:{task['scene_seed']}")
    azimuth = description.get("light_azimuth")  # lamps on a room's or backdrop's open side
    if task["lighting"] == "lamps":  # every setup in turn, so that a small split still holds each of them
        first = task["scene_seed"] * task["lightings"]
        return [lamp_lighting(rng, training_hdris(), LAMP_SETUPS[(first + k) % len(LAMP_SETUPS)], azimuth)
                for k in range(task["lightings"])], False
    if task["lighting"] == "relight":
        return [{"type": "hdri", "hdri": name, "rotation_z": rng.uniform(0, 2 * math.pi), "exposure": 1.0}
                for name in HELD_OUT_HDRIS], False
    if task["lighting"] == "anim":
        hdri = next((w for w in description.get("lightings", []) if w["type"] == "hdri"), None)
        hdri = hdri or {"type": "hdri", "hdri": rng.choice(training_hdris()), "rotation_z": 0.0, "exposure": 1.0}
        step = math.radians(ANIM_STEP_DEGREES)
        return [{**hdri, "rotation_z": hdri["rotation_z"] + k * step} for k in range(task["anim_frames"])], True
    share = task.get("lamp_share", 0.0)
    return [lamp_lighting(rng, training_hdris(), azimuth=azimuth) if share and rng.random() < share else lighting
            for lighting in description["lightings"]], False


def _render_scene(task: dict) -> dict:
    import bpy

    from addon import dataset

    from . import scenes

    bpy.ops.wm.read_factory_settings(use_empty=True)
    render = task["render"]
    family = task.get("family", "ground")
    folder = Path(task["out"]) / task["folder"]
    recorded = scene_family(folder)
    if recorded not in (None, family):
        raise ValueError(f"{folder} holds a {recorded!r} scene, this task makes a {family!r} one: remove the folder")
    description = scenes.describe(task["scene_seed"], training_hdris(), task["lightings"], family)
    lightings, sequence = lightings_for(task, description)
    scene, worlds = scenes.build({**description, "lightings": lightings}, hdri_folder(), render["threads"])
    orbit = "camera" not in description  # rooms and backdrops place their own views on their open side
    if not orbit:
        scenes.add_views(scene, description, task["views"], task["scene_seed"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scene.json").write_text(json.dumps({**description, "lightings": lightings}, indent=1))
    before = _finished(folder)
    dataset.export_dataset(scene, folder, views=task["views"], hdris=worlds, width=render["size"],
                           height=render["size"], gt_samples=render["gt_samples"], denoise=render["denoise"],
                           gbuffer_samples=render["gbuffer_samples"], seed=task["scene_seed"],
                           hdri_width=render["hdri_width"], low_samples=task["low_samples"], sequence=sequence,
                           orbit=orbit, filter_width=render.get("filter_width", 0.01))
    return {"ok": True, "rendered": task["samples"] - before}


def _finished(folder: Path) -> int:
    """Samples of an earlier run whose ground truth is already there."""
    return sum(1 for path in folder.glob("v*/gt_unshadowed.exr"))


def _worker_main(task_file: str) -> int:
    import traceback

    task = json.loads(Path(task_file).read_text())
    try:
        if task["kind"] == "scene":
            result = _render_scene(task)
        else:
            from . import blendervault

            result = blendervault.export_file(task)
    except Exception as error:  # reported per task; the run goes on
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    Path(task["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
