"""Read MaterialFusion's BlenderVault render layout into Samples (docs/design.md section 8).

Layout: ``root/transforms_{train,val,test}.json`` = {"camera_angle_x", "frames": [{"envmap",
"transform_matrix" (camera-to-world, Z up, camera looks down -Z), "file_path", "file_path_albedo",
"file_path_normal", "file_path_orm", "file_path_depth"}]}, paths relative to root without extension:
``<file_path>.png`` shaded RGBA sRGB (transparent background), ``_albedo.png`` base colour (sRGB),
``_orm.png`` (G roughness, B metallic, linear), ``_normal.png`` (world normal * 0.5 + 0.5),
``_depth.exr`` (view-axis depth).

What the G-buffer gets from it: mask = alpha >= 0.5 (and a decodable normal); albedo = base x
(1 - metallic); specular F0 = mix(0.04, base, metallic) (a Principled BSDF at the default Specular
IOR Level 0.5); ao = 1 (the layout has none); the projection from camera_angle_x spanning the image
width (Blender's sensor fit for a landscape or square image). The scene of a view is the folder of
its file_path ("train/00012"), so splits stay by object. The layout has no shadow-free render
(gt_unshadowed None) and does not record the HDRI rotation (rotation_z 0). Every view's scene family
(Sample.family, the per-family table of `pbnds eval`) is "blendervault".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from backend.exrio import ExrError, read_exr, write_exr
from backend.jobformat import Camera, GBuffer, Job, JobError, hdri_from_channels, validate_gbuffer

from .data import EXPORT_FAMILY, SPLITS, DatasetError, Sample, _read_json

NEAR, FAR = 0.1, 100.0
HDRI_MAX_WIDTH = 1024


def is_layout(root) -> bool:
    return any((Path(root) / f"transforms_{split}.json").is_file() for split in ("train", "val", "test"))


def _transforms(root: Path, split: str) -> tuple[Path, dict]:
    path = root / f"transforms_{split}.json"
    if not path.is_file():
        return path, {"frames": []}
    data = _read_json(path)
    if not isinstance(data.get("frames"), list):
        raise DatasetError(f"{path}: 'frames' must be a list")
    return path, data


def splits(root) -> dict[str, list[str]]:
    root = Path(root)
    table = {}
    for split in SPLITS:
        path, data = _transforms(root, split)
        table[split] = list(dict.fromkeys(str(Path(f.get("file_path", "")).parent) for f in data["frames"]))
    return table


def load_split(root, split: str, limit: int | None = None) -> list[Sample]:
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"{root}: unknown split {split!r}; splits are {list(SPLITS)}")
    path, data = _transforms(root, split)
    frames = data["frames"] if limit is None else data["frames"][:limit]
    if frames and not isinstance(data.get("camera_angle_x"), (int, float)):
        raise DatasetError(f"{path}: 'camera_angle_x' (radians) is required")
    return [_load_frame(root, split, frame, data["camera_angle_x"], path) for frame in frames]


def _png(path: Path) -> np.ndarray:
    """(H, W, C) float32 in [0, 1]."""
    try:
        with Image.open(path) as image:
            return np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the PNG: {error}") from None


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _first_channel(path: Path) -> np.ndarray:
    try:
        channels, _ = read_exr(path)
    except ExrError as error:
        raise DatasetError(f"{path}: {error}") from None
    by_letter = {name.rsplit(".", 1)[-1].upper(): array for name, array in channels.items()}
    for letter in ("Z", "V", "Y", "R"):
        if letter in by_letter:
            return by_letter[letter]
    raise DatasetError(f"{path}: no depth channel (found {sorted(channels)})")


def _hdri(root: Path, envmap, transforms: Path) -> np.ndarray:
    if not isinstance(envmap, str) or not envmap:
        raise DatasetError(f"{transforms}: a frame has no 'envmap' path; the job needs its HDRI")
    path = root / envmap
    if path.suffix.lower() != ".exr":
        raise DatasetError(f"{path}: only EXR environment maps can be read (convert it to a linear EXR)")
    if not path.is_file():
        raise DatasetError(f"{path}: the frame's envmap does not exist")
    try:
        hdri = hdri_from_channels(read_exr(path)[0], str(path))
    except (ExrError, JobError) as error:
        raise DatasetError(f"{path}: {error}") from None
    factor = hdri.shape[1] // HDRI_MAX_WIDTH
    if factor > 1 and hdri.shape[0] % factor == 0 and hdri.shape[1] % factor == 0:  # box filter keeps the energy
        h, w = hdri.shape[0] // factor, hdri.shape[1] // factor
        hdri = hdri.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    return hdri


def projection(camera_angle_x: float, width: int, height: int) -> np.ndarray:
    """OpenGL projection of a perspective camera whose horizontal field of view is ``camera_angle_x``."""
    fx = 1 / math.tan(camera_angle_x / 2)
    return np.array([[fx, 0, 0, 0], [0, fx * width / height, 0, 0],
                     [0, 0, (FAR + NEAR) / (NEAR - FAR), 2 * FAR * NEAR / (NEAR - FAR)], [0, 0, -1, 0]])


def _load_frame(root: Path, split: str, frame: dict, camera_angle_x: float, transforms: Path) -> Sample:
    try:
        file_path = frame["file_path"]
        paths = {key: root / frame[f"file_path_{key}"] for key in ("albedo", "normal", "orm", "depth")}
        camera_to_world = np.asarray(frame["transform_matrix"], np.float64)
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{transforms}: a frame lacks file_path(_albedo/_normal/_orm/_depth) or "
                           f"a transform_matrix: {str(frame)[:200]}") from None
    if camera_to_world.shape != (4, 4) or not np.isfinite(camera_to_world).all():
        raise DatasetError(f"{transforms}: frame {file_path}: transform_matrix must be a finite 4x4 matrix")
    rgba = _png(root / f"{file_path}.png")
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise DatasetError(f"{root / file_path}.png: expected an RGBA image, got shape {rgba.shape}")
    height, width = rgba.shape[:2]
    base = srgb_to_linear(_png(paths["albedo"].with_name(paths["albedo"].name + ".png"))[..., :3])
    orm = _png(paths["orm"].with_name(paths["orm"].name + ".png"))
    normal = _png(paths["normal"].with_name(paths["normal"].name + ".png"))[..., :3] * 2 - 1
    depth_path = paths["depth"].with_name(paths["depth"].name + ".exr")
    depth = _first_channel(depth_path)
    for name, array in (("albedo", base), ("orm", orm), ("normal", normal), ("depth", depth)):
        if array.shape[:2] != (height, width):
            raise DatasetError(f"{transforms}: frame {file_path}: the {name} image is {array.shape[1]}x"
                               f"{array.shape[0]}, the render is {width}x{height}")
    length = np.linalg.norm(normal, axis=-1)
    mask = (rgba[..., 3] >= 0.5) & (length > 0.5)
    normal = np.where(mask[..., None], normal / np.maximum(length, 1e-6)[..., None], 0).astype(np.float32)
    roughness, metallic = orm[..., 1], orm[..., 2]
    fg = mask[..., None]
    gbuffer = GBuffer(albedo=np.where(fg, base * (1 - metallic[..., None]), 0).astype(np.float32),
                      specular=np.where(fg, 0.04 + (base - 0.04) * metallic[..., None], 0).astype(np.float32),
                      roughness=np.where(mask, roughness, 0).astype(np.float32), normal=normal,
                      depth=np.where(mask, depth, 1e10).astype(np.float32), ao=mask.astype(np.float32),
                      mask=mask.astype(np.float32), metallic=np.where(mask, metallic, 0).astype(np.float32))
    try:
        validate_gbuffer(gbuffer, f"{root / file_path}")
    except JobError as error:
        raise DatasetError(str(error)) from None
    camera = Camera(np.linalg.inv(camera_to_world), projection(camera_angle_x, width, height))
    job = Job(width, height, gbuffer, _hdri(root, frame.get("envmap"), transforms), camera)
    gt = np.where(fg, srgb_to_linear(rgba[..., :3]), 0).astype(np.float32)
    envmap = frame.get("envmap")
    return Sample(name=file_path, scene=str(Path(file_path).parent), split=split, job=job, gt_full=gt,
                  gt_unshadowed=None, hdri=Path(envmap).name if envmap else None, rotation_z=0.0,
                  family=EXPORT_FAMILY)


def write_fixture(root, size: int = 32, views: int = 2) -> Path:
    """A tiny dataset in this layout from analytic spheres on a plane (backend.synthetic), shaded
    Lambert-only under a constant white sky: ``views`` views of one object "00000", test split."""
    from backend.imageio import to_srgb8
    from backend.synthetic import Material, Plane, Sphere, look_at, trace

    root = Path(root)
    folder = root / "test" / "00000"
    folder.mkdir(parents=True, exist_ok=True)
    hdri = np.ones((16, 32, 3), np.float32)
    write_exr(root / "envmap.exr", {c: hdri[..., i] for i, c in enumerate("RGB")})
    objects = [Plane(0.0, 2.5, Material((0.5, 0.5, 0.5), roughness=0.8)),
               Sphere((-1.1, 0.0, 0.5), 0.5, Material((0.8, 0.1, 0.08), roughness=0.6)),
               Sphere((0.0, 0.4, 0.5), 0.5, Material((1.0, 0.78, 0.34), metallic=1.0, roughness=0.25))]
    camera_angle_x = math.radians(40.0)
    frames = []
    for view in range(views):
        azimuth = 2 * math.pi * view / views
        camera = Camera(look_at((4.5 * math.sin(azimuth), -4.5 * math.cos(azimuth), 2.2), (0.0, 0.2, 0.35)),
                        projection(camera_angle_x, size, size))
        g = trace(camera, size, size, objects)
        base = np.where(g.metallic[..., None] > 0, g.specular, g.albedo)
        rel = f"test/00000/{view:03d}"
        stem = root / rel
        alpha = (g.mask * 255).astype(np.uint8)[..., None]
        Image.fromarray(np.concatenate([to_srgb8(g.albedo), alpha], axis=-1), "RGBA").save(f"{stem}.png")
        Image.fromarray(to_srgb8(base)).save(f"{stem}_albedo.png")
        orm = np.stack([np.zeros_like(g.roughness), g.roughness, g.metallic], axis=-1)
        Image.fromarray((orm * 255 + 0.5).astype(np.uint8)).save(f"{stem}_orm.png")
        Image.fromarray(((g.normal * 0.5 + 0.5) * 255 + 0.5).astype(np.uint8)).save(f"{stem}_normal.png")
        write_exr(f"{stem}_depth.exr", {c: g.depth for c in "RGB"})
        frames.append({"envmap": "envmap.exr", "transform_matrix": np.linalg.inv(camera.world_to_camera).tolist(),
                       "file_path": rel, "file_path_albedo": f"{rel}_albedo", "file_path_normal": f"{rel}_normal",
                       "file_path_orm": f"{rel}_orm", "file_path_depth": f"{rel}_depth"})
    transforms = {"camera_angle_x": camera_angle_x, "frames": frames}
    (root / "transforms_test.json").write_text(json.dumps(transforms, indent=1))
    return root
