"""The files of an evaluation report: report.md, metrics.csv, metrics_families.csv, metrics_samples.csv,
comparison grids and training curves (PNG). Scores come from training/evaluate.py; the definitions are in
docs/metrics.md.
"""

from __future__ import annotations

import csv
import datetime
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import EXPOSURE

# Table 1 of the PBNDS paper, BlenderVault columns: their figures, not re-measured by us (their pipeline:
# full frame including the background, 8-bit sRGB targets). Relighting ("RE") has FID only.
PAPER_TABLE1 = [
    {"experiment": "shading", "method": "Blinn-Phong", "mse": 0.044, "psnr": 14.94, "ssim": 0.784, "lpips": 0.080,
     "fid": 0.239},
    {"experiment": "shading", "method": "GGX", "mse": 0.055, "psnr": 13.35, "ssim": 0.753, "lpips": 0.114,
     "fid": 0.227},
    {"experiment": "shading", "method": "NDS (overfitted per scene)", "mse": 0.001, "psnr": 38.53, "ssim": 0.988,
     "lpips": 0.027, "fid": 0.037},
    {"experiment": "shading", "method": "PBNDS", "mse": 0.002, "psnr": 29.47, "ssim": 0.936, "lpips": 0.025,
     "fid": 0.113},
    {"experiment": "relighting", "method": "Blinn-Phong", "fid": 0.163},
    {"experiment": "relighting", "method": "GGX", "fid": 0.162},
    {"experiment": "relighting", "method": "PBNDS", "fid": 0.117},
]
NOT_COMPUTED = {"LPIPS": "not computed: weights not present (no lpips package or AlexNet/VGG checkpoint on this "
                "machine; nothing is downloaded)",
                "FID": "not computed: weights not present (no Inception checkpoint on this machine)"}
ROW_KEYS = ("split", "method", "kind", "sample", "family", "hdri", "rotation_z", "frame", "device")
TIME_KEYS = ("ms", "cpu_ms", "relight_ms")
# report.md columns: (header, summary key, format)
COLUMNS = [("PSNR fg", "psnr_fg", ".2f"), ("SSIM fg", "ssim_fg", ".4f"), ("FLIP fg", "flip_fg", ".4f"),
           ("MSE fg", "mse_fg", ".2e"), ("PSNR-lin fg", "psnr_lin_fg", ".2f"), ("PSNR full", "psnr_full", ".2f"),
           ("SSIM full", "ssim_full", ".4f"), ("FLIP full", "flip_full", ".4f"),
           ("unshadowed PSNR fg", "unshadowed_psnr_fg", ".2f"), ("unshadowed SSIM fg", "unshadowed_ssim_fg", ".4f"),
           ("temporal MAE", "temporal_mae", ".5f"), ("flicker", "flicker", "+.5f")]
TIME_COLUMNS = [("ms/frame (median)", "ms_median", ".1f"), ("CPU ms/frame", "cpu_ms_median", ".1f")]
RELIGHT_COLUMN = ("relight ms (shade+shadow)", "relight_ms_median", ".1f")
# the per-family table (the do-no-harm check): every method against GGX on each scene family
BASELINE = "ggx"
WORSE = "WORSE THAN GGX"
FAMILY_COLUMNS = [("PSNR fg", "psnr_fg", ".2f"), ("SSIM fg", "ssim_fg", ".4f"), ("FLIP fg", "flip_fg", ".4f")]
DEFAULT_FAMILY = "ground"  # rows without a family (training.data.DEFAULT_FAMILY)


@dataclass
class GridCell:
    label: str
    image: np.ndarray  # (H, W, 3) display space (sRGB, 0..1)
    error: np.ndarray  # (H, W) FLIP map against the ground truth
    caption: str


@dataclass
class GridRow:
    sample: str
    truth: np.ndarray  # (H, W, 3) display space
    cells: list[GridCell] = field(default_factory=list)


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, int | float) and not math.isnan(v)]


def summarize(result) -> list[dict]:
    """Per-method rows of one split's result: mean scores, median times, temporal scores."""
    by_method: dict[str, list[dict]] = {}
    for row in result.rows:
        by_method.setdefault(row["method"], []).append(row)
    summaries = []
    for method, rows in by_method.items():
        summary = {"split": result.split, "method": method, "kind": rows[0]["kind"], "n": len(rows),
                   "device": rows[0]["device"]}
        score_keys = dict.fromkeys(k for row in rows for k in row if k not in ROW_KEYS + TIME_KEYS)
        for key in score_keys:
            values = _finite(row.get(key) for row in rows)
            summary[key] = float(np.mean(values)) if values else math.nan
        for key in TIME_KEYS:
            values = _finite(row.get(key) for row in rows)
            summary[f"{key}_median"] = statistics.median(values) if values else None
        summary.update(result.temporal.get(method, {}))
        summaries.append(summary)
    return summaries


def _mean(values) -> float:
    values = _finite(values)
    return float(np.mean(values)) if values else math.nan


def family_label(family: str, held_out=()) -> str:
    return f"{family} (held out)" if family in held_out else family


def family_summaries(result, held_out=(), order=()) -> list[dict]:
    """Per (scene family, method) rows of one split's result: n, mean PSNR/SSIM/FLIP on the foreground, and
    for every method but GGX its margin over GGX on the same family (mean PSNR fg minus GGX's, dB) when GGX
    was evaluated. ``worse_than_ggx`` marks models (not Cycles renders) with a negative margin. Families come
    in ``order`` (the dataset's list), then in the order they appear."""
    by_family: dict[str, list[dict]] = {}
    for row in result.rows:
        by_family.setdefault(row.get("family") or DEFAULT_FAMILY, []).append(row)
    families = [f for f in order if f in by_family] + [f for f in by_family if f not in order]
    summaries = []
    for family in families:
        by_method: dict[str, list[dict]] = {}
        for row in by_family[family]:
            by_method.setdefault(row["method"], []).append(row)
        means = {method: {key: _mean(r.get(key) for r in rows) for _, key, _ in FAMILY_COLUMNS}
                 for method, rows in by_method.items()}
        baseline = means.get(BASELINE, {}).get("psnr_fg")
        for method, rows in by_method.items():
            margin = None if method == BASELINE or baseline is None else means[method]["psnr_fg"] - baseline
            summaries.append({"split": result.split, "family": family, "held_out": family in held_out,
                              "method": method, "kind": rows[0]["kind"], "n": len(rows), **means[method],
                              "margin_vs_ggx_db": margin,
                              "worse_than_ggx": rows[0]["kind"] == "model" and margin is not None and margin < 0})
    return summaries


def gate_failures(family_rows: list[dict], model: str) -> list[dict]:
    """The per-family rows (any split) on which ``model`` scores a lower mean PSNR fg than GGX."""
    return [row for row in family_rows if row["method"] == model and row["worse_than_ggx"]]


def _where(rows: list[dict], held_out=()) -> str:
    return ", ".join(f"{family_label(r['family'], held_out)} in split {r['split']} ({r['margin_vs_ggx_db']:+.2f} dB)"
                     for r in rows)


def ggx_summary(family_rows: list[dict], held_out=(), gate: str | None = None) -> list[str]:
    """Lines (Markdown bullets) saying, per model, on which families it is worse than GGX; then the gate."""
    if not any(row["method"] == BASELINE for row in family_rows):
        return ["- GGX was not evaluated: no margins, no flags."]
    models = list(dict.fromkeys(r["method"] for r in family_rows if r["kind"] == "model" and r["method"] != BASELINE))
    families = list(dict.fromkeys(r["family"] for r in family_rows))
    lines = []
    for model in models:
        worse = gate_failures(family_rows, model)
        lines.append(f"- `{model}`: {WORSE} on {_where(worse, held_out)}" if worse else
                     f"- `{model}`: not worse than GGX on any of the {len(families)} families")
    if gate is not None:
        failed = gate_failures(family_rows, gate)
        lines.append(f"- gate `--gate {gate}`: **FAILED**, {gate} is worse than GGX on {_where(failed, held_out)}"
                     if failed else f"- gate `--gate {gate}`: passed, {gate} is not worse than GGX on any family")
    return lines


def paper_rows() -> list[dict]:
    """Table 1 as metrics.csv rows (kind 'paper'): the paper's full-frame figures in our full-frame columns."""
    return [{"split": f"paper Table 1, BlenderVault, {row['experiment']}", "method": row["method"],
             "kind": "paper (not re-measured)", "mse_full": row.get("mse"), "psnr_full": row.get("psnr"),
             "ssim_full": row.get("ssim"), "lpips": row.get("lpips"), "fid": row.get("fid")} for row in PAPER_TABLE1]


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.6g}"
        return "" if value is None else value

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({key: cell(value) for key, value in row.items()} for row in rows)


# ------------------------------------------------------------------------------------------------
# Pictures


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _to_pixels(image: np.ndarray, scale: int) -> np.ndarray:
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(path: Path, rows: list[GridRow], title: str) -> None:
    """Rows = samples; columns = ground truth, then each method, its FLIP error map (magma, 0 black .. 1
    white-yellow) under it, PSNR and FLIP on the foreground between them."""
    import matplotlib
    from PIL import Image, ImageDraw

    magma = matplotlib.colormaps["magma"]
    labels = list(dict.fromkeys(cell.label for row in rows for cell in row.cells))
    height = max(row.truth.shape[0] for row in rows)
    width = max(row.truth.shape[1] for row in rows)
    scale = max(1, 256 // max(height, width))
    cell_w, cell_h, text_h, header_h, gap = width * scale, height * scale, 18, 44, 8
    row_h = 2 * cell_h + text_h + gap
    canvas = Image.new("RGB", ((len(labels) + 1) * (cell_w + gap), header_h + len(rows) * row_h), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(11)
    draw.text((4, 2), title, fill=(255, 255, 255), font=font)
    for column, label in enumerate(["ground truth", *labels]):
        draw.text((column * (cell_w + gap) + 2, header_h - 18), label, fill=(230, 230, 230), font=font)
    for index, row in enumerate(rows):
        top = header_h + index * row_h
        canvas.paste(Image.fromarray(_to_pixels(row.truth, scale)), (0, top))
        draw.text((2, top + cell_h + 3), row.sample, fill=(200, 200, 200), font=small)
        draw.text((2, top + cell_h + text_h + 2), "FLIP error maps ->", fill=(200, 200, 200), font=small)
        cells = {cell.label: cell for cell in row.cells}
        for column, label in enumerate(labels, start=1):
            if label not in cells:
                continue
            cell, left = cells[label], column * (cell_w + gap)
            canvas.paste(Image.fromarray(_to_pixels(cell.image, scale)), (left, top))
            draw.text((left + 2, top + cell_h + 3), cell.caption, fill=(255, 255, 255), font=small)
            error = magma(np.clip(cell.error, 0, 1))[..., :3]
            canvas.paste(Image.fromarray(_to_pixels(error, scale)), (left, top + cell_h + text_h))
    canvas.save(path)


def _number(value: str | None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_training_log(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a training CSV log; cells that are not numbers become None (except 'stage')."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [{key: (value if key == "stage" else _number(value)) for key, value in row.items() if key}
                for row in reader]
        return [name for name in reader.fieldnames or [] if name], rows


def plot_training_curves(paths: list[Path], out: Path) -> None:
    """Training loss (log scale) and every val_* column against the step, one line per log and stage.

    The header is read defensively: the x axis is 'step' (else 'iteration', 'iter', 'epoch', else the row
    number), the loss panel takes every column with 'loss' in its name that does not start with 'val'.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [(Path(p), *read_training_log(p)) for p in paths]
    loss_keys = list(dict.fromkeys(k for _, header, _ in logs for k in header
                                   if "loss" in k.lower() and not k.lower().startswith("val")))
    val_keys = list(dict.fromkeys(k for _, header, _ in logs for k in header if k.lower().startswith("val")))
    panels = (["loss"] if loss_keys else []) + val_keys
    if not panels:
        raise ValueError(f"training logs {[str(p) for p in paths]} have no loss or val_* column")
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for path, header, rows in logs:
        x_key = next((k for k in ("step", "iteration", "iter", "epoch") if k in header), None)
        stages = list(dict.fromkeys(row.get("stage") for row in rows))
        for stage in stages:
            part = [(i, row) for i, row in enumerate(rows) if row.get("stage") == stage]
            name = path.parent.name or path.stem
            name += f" stage {stage}" if stage else ""
            for axis, panel in zip(axes[0], panels, strict=True):
                for key in loss_keys if panel == "loss" else [panel]:
                    points = [(row[x_key] if x_key else i, row.get(key)) for i, row in part]
                    points = [(x, y) for x, y in points if x is not None and y is not None]
                    if points:
                        label = name + (f" {key}" if panel == "loss" and len(loss_keys) > 1 else "")
                        axis.plot(*zip(*points, strict=True), label=label, linewidth=1.2,
                                  marker="o" if panel != "loss" else None, markersize=3)
    for axis, panel in zip(axes[0], panels, strict=True):
        axis.set_title("training loss" if panel == "loss" else panel)
        axis.set_xlabel("step")
        if panel == "loss" and axis.lines and all(min(line.get_ydata()) > 0 for line in axis.lines):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------
# report.md


def _format(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _family_section(rows: list[dict], held_out=()) -> list[str]:
    if not rows:
        return []
    body = [[family_label(r["family"], held_out), r["method"], r["kind"], str(r["n"]),
             *(_format(r.get(key), spec) for _, key, spec in FAMILY_COLUMNS),
             _format(r["margin_vs_ggx_db"], "+.2f"), f"**{WORSE}**" if r["worse_than_ggx"] else ""] for r in rows]
    return ["Per scene family (means over the family's samples; margin = PSNR fg minus GGX's on the same family, "
            f"dB; {WORSE} marks a model below GGX):", "",
            *_table(["family", "method", "kind", "n", *(c[0] for c in FAMILY_COLUMNS), "margin vs GGX (dB)", "flag"],
                    body), ""]


def _split_section(result, summaries: list[dict], grid_name: str | None, families: list[dict] = (),
                   held_out=()) -> list[str]:
    samples = len({row["sample"] for row in result.rows})
    lines = [f"## Split `{result.split}` ({samples} samples)", ""]
    if not summaries:
        return lines + ["No samples in this split; nothing was scored.", ""]
    columns = [c for c in COLUMNS if any(_format(s.get(c[1]), c[2]) != "-" for s in summaries)]
    columns += TIME_COLUMNS + ([RELIGHT_COLUMN] if result.split == "relight" else [])
    body = [[s["method"], s["kind"], str(s["n"]), *(_format(s.get(key), spec) for _, key, spec in columns),
             s["device"]] for s in summaries]
    lines += _table(["method", "kind", "n", *(c[0] for c in columns), "device"], body) + [""]
    lines += _family_section(families, held_out)
    if result.split == "relight":
        lines += _per_hdri(result.rows)
    if grid_name:
        lines += [f"![comparison grid, split {result.split}]({grid_name})", ""]
    return lines


def _per_hdri(rows: list[dict]) -> list[str]:
    hdris = list(dict.fromkeys(str(row["hdri"]) for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    body = []
    for method in methods:
        cells = []
        for hdri in hdris:
            values = _finite(r["psnr_fg"] for r in rows if r["method"] == method and str(r["hdri"]) == hdri)
            cells.append(_format(float(np.mean(values)) if values else None, ".2f"))
        body.append([method, *cells])
    return ["PSNR fg by lighting:", "", *_table(["method", *hdris], body), ""]


def _paper_section() -> list[str]:
    body = [[row["experiment"], row["method"], *(_format(row.get(k), ".3f" if k != "psnr" else ".2f")
                                                 for k in ("mse", "psnr", "ssim", "lpips", "fid"))]
            for row in PAPER_TABLE1]
    return ["## The paper's Table 1 (BlenderVault), for reference", "",
            "**These are the paper's figures on BlenderVault, copied, not re-measured.** Their pipeline differs "
            "from ours: full frame including the black background, 8-bit sRGB targets, LPIPS fed [0, 1] "
            "(docs/design.md section 5), and their own data. Compare orders of magnitude, not decimals.", "",
            *_table(["experiment", "method", "MSE", "PSNR", "SSIM", "LPIPS", "FID"], body), ""]


def write_markdown(path: Path, results: list, summaries: dict[str, list[dict]], settings: dict,
                   pictures: dict[str, str], families: dict[str, list[dict]] | None = None) -> None:
    families = families or {}
    held_out = settings.get("held_out_families", ())
    lines = ["# Evaluation report", "",
             f"- command: `{settings['command']}`",
             f"- data: `{settings['data']}`; models: {', '.join(settings['models'])}; rays: {settings['rays']}",
             f"- shading device: {settings['device']}",
             f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"Scores (docs/metrics.md): linear radiance x {EXPOSURE:g}, clipped to [0, 1], sRGB-encoded; PSNR, "
             "SSIM (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, range 1, mean over RGB), MSE and LDR-FLIP "
             "are computed there. PSNR-lin is on linear radiance (peak 1, unclipped). PSNR is capped at 100 dB. "
             "'fg': pixels the objects cover (G-buffer mask or coverage > 0); 'full': the whole frame. "
             "Unshadowed: the model's unshadowed "
             "output against Cycles with shadow rays off. Means over samples; times are medians.", ""]
    family_rows = [row for result in results for row in families.get(result.split, [])]
    if family_rows:
        lines += ["## Against GGX, per scene family", "",
                  *ggx_summary(family_rows, held_out, settings.get("gate")), "",
                  f"Margin: a model's mean PSNR fg minus GGX's on the same family and split; {WORSE} where it "
                  "is below 0 (Cycles renders get margins, not flags). Held-out families (splits.json "
                  f"\"families\"): {', '.join(held_out) if held_out else 'none marked'}. Each split's table "
                  "below has a row per family and method.", ""]
    for result in results:
        lines += _split_section(result, summaries[result.split], pictures.get(f"grid_{result.split}"),
                                families.get(result.split, []), held_out)
    lines += _paper_section()
    lines += ["## Not computed", "", *(f"- {name}: {why}" for name, why in NOT_COMPUTED.items()), ""]
    lines += ["## Timing", "",
              "- Models: wall time of `Renderer.render` per frame (G-buffer preparation, shading, shadow net; no "
              "file IO, no model loading; one warm-up render first), median over the samples, on the device "
              "named. `CPU ms` is the process CPU time over the same call (all threads).",
              "- `relight ms` (split relight): shading + shadow net only, i.e. a re-light of an already "
              "prepared G-buffer.",
              "- Cycles rows: the wall time (`seconds`) and process CPU time (`cpu_seconds`) recorded when the "
              "dataset was rendered (scene sync, render, denoise, file write), on the generating machine, "
              "which may have been busy. Compare times within one run; re-time back to back when it matters.", ""]
    if "training_curves" in pictures:
        lines += ["## Training curves", "", f"![training curves]({pictures['training_curves']})", ""]
    path.write_text("\n".join(lines))


def write_report(out: Path, results: list, settings: dict, training_logs: list[Path]) -> dict[str, Path]:
    """Write every file of the report into `out`; return {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {result.split: summarize(result) for result in results}
    held_out, order = settings.get("held_out_families", ()), settings.get("family_order", ())
    families = {result.split: family_summaries(result, held_out, order) for result in results}
    written = {"metrics": out / "metrics.csv", "families": out / "metrics_families.csv",
               "samples": out / "metrics_samples.csv"}
    write_csv(written["metrics"], [s for result in results for s in summaries[result.split]] + paper_rows())
    write_csv(written["families"], [row for result in results for row in families[result.split]])
    write_csv(written["samples"], [row for result in results for row in result.rows])
    pictures = {}
    for result in results:
        if result.grid:
            name = f"grid_{result.split}"
            written[name] = out / f"{name}.png"
            save_grid(written[name], result.grid, f"split {result.split}: ground truth and predictions (sRGB, "
                      f"exposure {EXPOSURE:g}); under each, its FLIP error map; PSNR and FLIP on the foreground")
            pictures[name] = written[name].name
    if training_logs:
        written["training_curves"] = out / "training_curves.png"
        plot_training_curves(training_logs, written["training_curves"])
        pictures["training_curves"] = written["training_curves"].name
    written["report"] = out / "report.md"
    write_markdown(written["report"], results, summaries, settings, pictures, families)
    return written
