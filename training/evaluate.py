"""`pbnds eval`: score shading models and Cycles' low-sample renders against Cycles ground truth.

Every model renders every sample of a split (after one untimed warm-up render); its shaded output, over
the world behind it as an opaque film shows it (premultiplied by its anti-aliased alpha where the
G-buffer has coverage, backend/edges.py), is scored against gt_full and its unshadowed output against
gt_unshadowed where the dataset has one. The equal-time Cycles renders stored with the samples are
scored beside the models, with the times measured when they were rendered. Split "anim" also gets frame-
to-frame stability scores. Every split is also scored per scene family against GGX (the do-no-harm
check); ``--gate MODEL`` makes the command exit 1 when MODEL is worse than GGX on any family. Metrics
are in training/metrics.py, the files written in training/report.py, the definitions in docs/metrics.md.
Heavy imports (torch, the renderer) happen inside the command so that `pbnds --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import compare, temporal_scores, to_display
from .report import (
    BASELINE,
    WORSE,
    GridCell,
    GridRow,
    family_label,
    family_summaries,
    gate_failures,
    ggx_summary,
    write_report,
)

GRID_ROWS = 6
DEFAULT_MODELS = "default,ggx,blinn-phong,lambert"
CYCLES_DEVICE = "Blender Cycles, CPU, timed at dataset generation"


@dataclass
class SplitResult:
    split: str
    rows: list[dict] = field(default_factory=list)  # one per (method, sample)
    grid: list[GridRow] = field(default_factory=list)
    temporal: dict[str, dict] = field(default_factory=dict)  # method -> temporal scores (sequences only)


def model_label(spec: str) -> str:
    """A short column name: the spec for named models, 'folder/stem' for checkpoint paths."""
    path = Path(spec)
    return f"{path.parent.name}/{path.stem}" if spec.endswith(".safetensors") or "/" in spec else spec


def scoring_sampling(model) -> str:
    """The ray set a model is scored with: the job default (MIS) for shaders that weight each ray by its
    pdf; the paper's shader learns a plain mean over rays, so it gets the set it was trained with
    (uniform, the paper's, when untrained)."""
    from backend.jobformat import Options

    if model.shader.unbiased:
        return Options.sampling
    return model.info.get("training", {}).get("config", {}).get("sampling", "uniform")


def cycles_label(low: dict) -> str:
    return f"cycles-{low['samples']}spp" + ("+denoise" if low["denoise"] else "")


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def _caption(scores: dict) -> str:
    return f"{scores['psnr_fg']:.2f} dB  FLIP {scores['flip_fg']:.3f}"


def _sample_row(split: str, method: str, kind: str, sample) -> dict:
    return {"split": split, "method": method, "kind": kind, "sample": sample.name, "family": sample.family,
            "hdri": sample.hdri, "rotation_z": round(sample.rotation_z, 4), "frame": sample.frame}


def _sequence_scores(frames: list[tuple]) -> dict[str, float]:
    """Temporal scores per scene (frames in order), averaged over the scenes."""
    by_scene = defaultdict(list)
    for scene, frame, prediction, truth, mask in frames:
        by_scene[scene].append((frame, prediction, truth, mask))
    per_scene = []
    for sequence in by_scene.values():
        _, predictions, truths, masks = zip(*sorted(sequence, key=lambda item: item[0]), strict=True)
        per_scene.append(temporal_scores(list(predictions), list(truths), list(masks)))
    return {key: float(np.mean([s[key] for s in per_scene])) for key in per_scene[0]}


def evaluate_split(split: str, samples: list, specs: list[str], renderer, rays: int, progress=None) -> SplitResult:
    """Score every model and every stored Cycles render on the samples of one split."""
    from backend.edges import footprint, over_background, world_background
    from backend.jobformat import Options

    result = SplitResult(split)
    backgrounds: dict[int, np.ndarray] = {}

    def composited(index: int, sample, premultiplied: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """A model's image as an opaque film shows it, on the footprint the ground truth keeps."""
        if index not in backgrounds:
            backgrounds[index] = world_background(sample.job)
        image = over_background(premultiplied, alpha, backgrounds[index])
        return np.where(footprint(sample.job.gbuffer)[..., None] > 0, image, 0).astype(np.float32)

    picks = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(GRID_ROWS, len(samples))).round()})
    grid = {i: GridRow(samples[i].name, to_display(samples[i].gt_full)) for i in picks}
    sequences = defaultdict(list)
    device = device_name(renderer.device)

    def score(method: str, kind: str, index: int, sample, image: np.ndarray, unshadowed: np.ndarray | None,
              timing: dict) -> None:
        mask = footprint(sample.job.gbuffer)
        scores, error = compare(image, sample.gt_full, mask)
        row = {**_sample_row(split, method, kind, sample), **scores}
        if unshadowed is not None and sample.gt_unshadowed is not None:
            row.update({f"unshadowed_{k}": v for k, v in compare(unshadowed, sample.gt_unshadowed, mask)[0].items()})
        result.rows.append({**row, **timing})
        if index in grid:
            grid[index].cells.append(GridCell(method, to_display(image), error, _caption(scores)))
        if sample.frame is not None:
            sequences[method].append((sample.scene, sample.frame, image, sample.gt_full, mask))

    for spec in specs:
        label = model_label(spec)
        options = Options(model=spec, rays=rays, sampling=scoring_sampling(renderer.model(spec)))
        samples[0].job.options = options
        renderer.render(samples[0].job)  # warm-up: first-call allocations and kernel setup stay out of the times
        for index, sample in enumerate(samples):
            sample.job.options = options
            wall, cpu = time.perf_counter(), time.process_time()
            rendered = renderer.render(sample.job)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            timings = rendered.meta["timings"]
            score(label, "model", index, sample, composited(index, sample, rendered.shaded, rendered.mask),
                  composited(index, sample, rendered.unshadowed, rendered.mask),
                  {"ms": wall * 1e3, "cpu_ms": cpu * 1e3, "relight_ms": timings["shade_ms"] + timings["shadow_ms"],
                   "device": device})
            if progress is not None:
                progress()
    for index, sample in enumerate(samples):
        for low in sample.cycles_low:
            cpu = low.get("cpu_seconds")
            score(cycles_label(low), "cycles", index, sample, low["image"], None,
                  {"ms": low["seconds"] * 1e3, "cpu_ms": None if cpu is None else cpu * 1e3, "device": CYCLES_DEVICE})
    result.grid = [grid[i] for i in picks]
    result.temporal = {method: _sequence_scores(frames) for method, frames in sequences.items()}
    return result


def dataset_families(root) -> tuple[list[str], list[str]]:
    """(all families in order, held-out families) from splits.json's optional "families" key
    ({"all": [...], "held_out": [...]}); empty lists when the dataset has none (or is not our layout)."""
    from .data import DatasetError, _read_json

    path = Path(root) / "splits.json"
    if not path.is_file():
        return [], []
    try:
        families = _read_json(path).get("families")
    except DatasetError:
        return [], []  # load_split reports a bad splits.json
    if families is None:
        return [], []
    if isinstance(families, dict):
        found = families.get("all", []), families.get("held_out", [])
        if all(isinstance(names, list) and all(isinstance(f, str) for f in names) for names in found):
            return list(found[0]), list(found[1])
    print(f"pbnds eval: {path}: 'families' should be {{\"all\": [names], \"held_out\": [names]}}, got "
          f"{str(families)[:200]}; no family is marked held out", file=sys.stderr)
    return [], []


def gate_model(gate: str, specs: list[str]) -> str:
    """The label of the gated model (``gate`` is a --models entry or its label); ValueError when it or GGX
    is not evaluated, or when it is GGX itself."""
    labels = [model_label(spec) for spec in specs]
    label = gate if gate in labels else model_label(gate)
    if label not in labels:
        raise ValueError(f"--gate {gate}: not among the evaluated models ({', '.join(labels)}); add it to --models")
    if BASELINE not in labels:
        raise ValueError(f"--gate {gate} compares {label} with GGX per scene family: add {BASELINE} to --models "
                         f"(evaluated: {', '.join(labels)})")
    if label == BASELINE:
        raise ValueError(f"--gate {gate}: GGX is the baseline; gate another model against it")
    return label


def command_line(args: argparse.Namespace) -> str:
    parts = ["pbnds eval", str(args.data), "--models", args.models, "--split", args.split, "--out", str(args.out),
             "--rays", str(args.rays), "--device", args.device]
    parts += ["--limit", str(args.limit)] if args.limit is not None else []
    parts += ["--relight"] if args.relight else []
    parts += ["--temporal"] if args.temporal else []
    parts += ["--lamps"] if args.lamps else []
    parts += ["--training-log", *map(str, args.training_log)] if args.training_log else []
    parts += ["--gate", args.gate] if args.gate else []
    return " ".join(parts)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backend.renderer import Renderer

    from .data import load_split

    specs = [spec.strip() for spec in args.models.split(",") if spec.strip()]
    if not specs:
        raise ValueError("--models names no model")
    gate = gate_model(args.gate, specs) if args.gate else None  # fails before anything is loaded or rendered
    order, held_out = dataset_families(args.data)
    renderer = Renderer(args.device)
    for spec in specs:
        renderer.model(spec)  # a bad name or checkpoint fails here, before any rendering
    extra = (("relight", args.relight), ("anim", args.temporal), ("lamps", args.lamps))
    splits = [args.split] + [name for name, wanted in extra if wanted and name != args.split]
    loaded = {split: load_split(args.data, split, args.limit) for split in splits}
    if not loaded[args.split]:
        raise ValueError(f"{args.data}: split {args.split!r} has no samples")
    results = []
    with tqdm(total=sum(len(specs) * len(s) for s in loaded.values()), desc="eval", unit="render",
              file=sys.stderr) as bar:
        for split, samples in loaded.items():
            if not samples:
                print(f"pbnds eval: split {split!r} has no samples; skipped", file=sys.stderr)
                results.append(SplitResult(split))
                continue
            bar.set_description(f"eval {split}")
            results.append(evaluate_split(split, samples, specs, renderer, args.rays, progress=bar.update))
    settings = {"command": command_line(args), "data": str(args.data), "models": specs, "rays": args.rays,
                "device": device_name(renderer.device), "limit": args.limit, "gate": gate,
                "family_order": order, "held_out_families": held_out}
    written = write_report(args.out, results, settings, args.training_log or [])
    family_rows = [row for result in results for row in family_summaries(result, held_out, order)]
    print(family_summary_text(family_rows, held_out, gate))
    print(json.dumps({name: str(path) for name, path in written.items()}))
    if gate is not None and (failed := gate_failures(family_rows, gate)):
        by_family: dict[str, list[str]] = {}
        for row in failed:
            by_family.setdefault(family_label(row["family"], held_out), []).append(
                f"split {row['split']} {row['margin_vs_ggx_db']:+.2f} dB")
        names = "; ".join(f"{family} ({', '.join(where)})" for family, where in by_family.items())
        print(f"pbnds eval: gate failed: {gate} is worse than GGX (mean PSNR fg) on scene families: {names}",
              file=sys.stderr)
        return 1
    return 0


def family_summary_text(family_rows: list[dict], held_out=(), gate: str | None = None) -> str:
    """The short stdout summary: per split and family, each method's PSNR fg and margin over GGX, flagged
    where a model is worse; then report.ggx_summary's verdict lines."""
    lines = ["per scene family, PSNR fg (margin vs GGX):"]
    groups: dict[tuple, list[dict]] = {}
    for row in family_rows:
        groups.setdefault((row["split"], row["family"]), []).append(row)
    for (split, family), rows in groups.items():
        cells = [f"{r['method']} {r['psnr_fg']:.2f}" + ("" if r["margin_vs_ggx_db"] is None else
                                                        f" ({r['margin_vs_ggx_db']:+.2f})")
                 + (f" {WORSE}" if r["worse_than_ggx"] else "") for r in rows]
        lines.append(f"  {split} / {family_label(family, held_out)} (n={rows[0]['n']}): " + ", ".join(cells))
    return "\n".join(lines + [line.removeprefix("- ").replace("`", "").replace("**", "")
                               for line in ggx_summary(family_rows, held_out, gate)])


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="score models against Cycles ground truth and write a report",
                                 description="Render every sample of a split with each model, score it against "
                                 "the Cycles ground truth (docs/metrics.md) and write report.md, metrics.csv, "
                                 "comparison grids and training curves into --out.")
    parser.add_argument("data", type=Path, help="dataset root (splits.json, or MaterialFusion's layout)")
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated model names or .safetensors paths (default: {DEFAULT_MODELS})")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--out", type=Path, required=True, help="report folder, e.g. reports/NAME")
    parser.add_argument("--rays", type=int, default=128, help="light rays per pixel (default: 128)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--limit", type=int, help="at most this many samples per split")
    parser.add_argument("--relight", action="store_true", help="also score split 'relight' (held-out HDRIs)")
    parser.add_argument("--temporal", action="store_true", help="also score split 'anim' (frame-to-frame flicker)")
    parser.add_argument("--lamps", action="store_true",
                        help="also score split 'lamps' (light objects and real-size suns, `pbnds generate --lamps`)")
    parser.add_argument("--training-log", type=Path, nargs="+", action="extend",
                        help="training CSV log(s) to plot (columns step, stage, loss, val_*)")
    parser.add_argument("--gate", metavar="MODEL",
                        help="do-no-harm gate: exit 1 (naming the families) when MODEL (a --models entry, e.g. "
                        "default) has a lower mean PSNR fg than GGX on any scene family of any scored split; "
                        "ggx must be among --models")
    parser.set_defaults(handler=cmd_eval)
