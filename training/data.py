"""Load a dataset root into Samples: jobs plus Cycles ground truth, split by scene (docs/dataset.md).

Two layouts are read:
- ours: ``root/splits.json`` naming scene folders, each written by addon/dataset.py
  (dataset.json + one folder per sample with job.json, gbuffer.exr, hdri.exr, gt_full.exr,
  gt_unshadowed.exr and optional Cycles low-sample renders);
- MaterialFusion's BlenderVault renders (``transforms_{train,val,test}.json``), read by
  training.materialfusion.

Every Sample carries its scene family (``Sample.family``, scored per family by `pbnds eval`): the
"family" key of the scene folder's scene.json, "ground" for datasets made before families existed,
"blendervault" for `pbnds export` folders and MaterialFusion's layout.

Ground truth is masked with the G-buffer's footprint (backend/edges.py: its mask, widened by its
coverage layer where it has one; the ground truth is rendered with the world behind the objects)
and clipped at 0 (the denoiser can undershoot by ~1e-4); nothing else is changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.edges import footprint
from backend.exrio import ExrError, read_exr
from backend.jobformat import Job, JobError, load_job

SPLITS = ("train", "val", "test", "relight", "anim", "lamps")
OPTIONAL_SPLITS = ("lamps",)  # absent from datasets made before it existed
SPLITS_FORMAT = "pbnds-splits"
DEFAULT_FAMILY = "ground"  # scenes of datasets made before scene families existed (no "family" in scene.json)
EXPORT_FAMILY = "blendervault"  # scene folders of `pbnds export` (arbitrary .blend files) and MaterialFusion's layout
DATASET_FORMAT = "pbnds-dataset"


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file."""


@dataclass
class Sample:
    name: str  # unique: "<scene folder>/<sample name>"
    scene: str  # scene folder name (splits are by scene)
    split: str
    job: Job  # G-buffer, HDRI, camera loaded (backend.jobformat.load_job)
    gt_full: np.ndarray  # (H, W, 3) float32 linear Cycles render (background zeroed)
    gt_unshadowed: np.ndarray | None  # (H, W, 3) shadow-free Cycles render, None if the source has none
    hdri: str | None  # HDRI file name (or "sky"/"gradient"/... for procedural worlds)
    rotation_z: float
    frame: int | None = None  # position in an animation sequence (split "anim"), else None
    cycles_low: list[dict] = field(default_factory=list)  # [{"samples", "denoise", "seconds", "image"}, ...]
    family: str = DEFAULT_FAMILY  # scene family: scene.json's "family" ("ground" when absent), "blendervault"...


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    return data


def splits(root) -> dict[str, list[str]]:
    """Split name -> scene folders (relative to ``root``)."""
    root = Path(root)
    from . import materialfusion

    if materialfusion.is_layout(root):
        return materialfusion.splits(root)
    path = root / "splits.json"
    data = _read_json(path)
    if data.get("format") != SPLITS_FORMAT or data.get("version") != 1:
        raise DatasetError(f"{path}: expected format {SPLITS_FORMAT!r} version 1, got "
                           f"{data.get('format')!r} version {data.get('version')!r}")
    table = {}
    for key in SPLITS:
        scenes = data.get(key, [] if key in OPTIONAL_SPLITS else None)
        if not isinstance(scenes, list) or not all(isinstance(s, str) for s in scenes):
            raise DatasetError(f"{path}: '{key}' must be a list of scene folder names")
        table[key] = scenes
    return table


def load_split(root, split: str, limit: int | None = None) -> list[Sample]:
    """The samples of ``split`` in scene order (at most ``limit``)."""
    root = Path(root)
    from . import materialfusion

    if materialfusion.is_layout(root):
        return materialfusion.load_split(root, split, limit)
    table = splits(root)
    if split not in table:
        raise DatasetError(f"{root / 'splits.json'}: unknown split {split!r}; splits are {list(table)}")
    samples: list[Sample] = []
    for scene in table[split]:
        family = scene_family(root / scene)
        index_path = root / scene / "dataset.json"
        index = _read_json(index_path)
        if index.get("format") != DATASET_FORMAT:
            raise DatasetError(f"{index_path}: format must be {DATASET_FORMAT!r}, got {index.get('format')!r}")
        for entry in index.get("samples", []):
            if limit is not None and len(samples) >= limit:
                return samples
            samples.append(_load_sample(root / scene, scene, split, entry, index_path, family))
    return samples


def scene_family(folder: Path) -> str:
    """The family of a scene folder: the "family" string of its scene.json (pbnds generate);
    "blendervault" for a folder written by `pbnds export` (export.json, no scene.json); else
    DEFAULT_FAMILY (no scene.json, or one written before families existed)."""
    folder = Path(folder)
    path = folder / "scene.json"
    if not path.is_file():
        return EXPORT_FAMILY if (folder / "export.json").is_file() else DEFAULT_FAMILY
    family = _read_json(path).get("family", DEFAULT_FAMILY)
    if not isinstance(family, str) or not family:
        raise DatasetError(f"{path}: 'family' must be a non-empty string, got {family!r}")
    return family


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) float32 from the R, G, B channels of an EXR (any layer prefix)."""
    try:
        channels, _ = read_exr(path)
    except ExrError as error:
        raise DatasetError(f"{path}: {error}") from None
    by_letter = {}
    for name, array in channels.items():
        by_letter.setdefault(name.rsplit(".", 1)[-1].upper(), array)
    if not all(c in by_letter for c in "RGB"):
        raise DatasetError(f"{path}: needs R, G and B channels (found {sorted(channels)})")
    image = np.stack([by_letter[c] for c in "RGB"], axis=-1).astype(np.float32)
    if not np.isfinite(image).all():
        raise DatasetError(f"{path}: holds NaN or Inf")
    return image


def _ground_truth(path: Path, mask: np.ndarray) -> np.ndarray:
    image = read_rgb(path)
    if image.shape[:2] != mask.shape:
        raise DatasetError(f"{path}: is {image.shape[1]}x{image.shape[0]}, the G-buffer is "
                           f"{mask.shape[1]}x{mask.shape[0]}")
    return np.where(mask[..., None] > 0, np.maximum(image, 0), 0).astype(np.float32)


def _load_sample(folder: Path, scene: str, split: str, entry: dict, index_path: Path,
                 family: str = DEFAULT_FAMILY) -> Sample:
    try:
        name = entry["name"]
        job_path = folder / entry["job"]
    except (KeyError, TypeError):
        raise DatasetError(f"{index_path}: a sample entry lacks 'name' or 'job': {entry!r}") from None
    try:
        job = load_job(job_path)
    except JobError as error:
        raise DatasetError(f"{job_path}: {error}") from None
    mask = footprint(job.gbuffer)
    unshadowed = entry.get("gt_unshadowed")
    low = [{"samples": item["samples"], "denoise": item["denoise"], "seconds": item["seconds"],
            "cpu_seconds": item.get("cpu_seconds"),
            "image": _ground_truth(folder / item["file"], mask)} for item in entry.get("cycles_low", [])]
    world = entry.get("world") or {}
    hdri = world.get("hdri") or (Path(entry["hdri"]).name if entry.get("hdri") else None)
    return Sample(name=f"{scene}/{name}", scene=scene, split=split, job=job,
                  gt_full=_ground_truth(folder / entry["gt_full"], mask),
                  gt_unshadowed=_ground_truth(folder / unshadowed, mask) if unshadowed else None,
                  hdri=hdri, rotation_z=float(entry.get("rotation_z", 0.0)), frame=entry.get("frame"),
                  cycles_low=low, family=family)
