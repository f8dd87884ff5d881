"""The job format, version 2: the one contract between the add-on and the backend.

docs/job-format.md is its specification; this module is its only implementation. A job is a
folder with job.json, gbuffer.exr and hdri.exr; a result is one multilayer EXR. Every problem is a
JobError naming the file, layer or option at fault; nothing is clamped or renormalised silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .exrio import ExrError, ExrTooLarge, read_exr, read_exr_bytes, write_exr
from .lights import Light, LightError, parse_lights

FORMAT = "pbnds-job"
VERSION = 2
VERSIONS = (1, 2)  # version 1: no lights
SAMPLINGS = ("uniform", "cosine", "stratified", "importance", "mis")
MAX_RAYS = 4096
MAX_SEED = 2**63 - 1  # torch's generators take seeds below 2^64, and the ray sets add small offsets
MAX_SIZE = 16384  # width and height
MAX_CONDITION = 1e14  # camera matrices beyond this condition number cannot be inverted meaningfully
RANGE_SLACK = 1e-3
NORMAL_TOLERANCE = 1e-2

# layer name -> channel count; single-channel layers accept any one channel name
REQUIRED_LAYERS = {"albedo": 3, "specular": 3, "roughness": 1, "normal": 3, "depth": 1, "ao": 1, "mask": 1}
OPTIONAL_LAYERS = {"metallic": 1, "position": 3, "coverage": 1, "back_depth": 1, "next_depth": 1}
PEELED_DEPTHS = ("back_depth", "next_depth")  # surfaces behind the visible one: +Inf where there is none
UNIT_RANGE_LAYERS = ("albedo", "specular", "roughness", "ao", "mask", "metallic")
THREE_CHANNEL_NAMES = (("R", "G", "B"), ("X", "Y", "Z"))
ONE_CHANNEL_NAMES = ("Y", "V", "X", "Z", "R", "A")


class JobError(ValueError):
    """A job, G-buffer, HDRI or option that breaks the contract; the message names the problem."""


class JobTooLarge(JobError):
    """A job or file larger than the reader's pixel budget."""


def parse_json(data: bytes | str, source: str):
    """json.loads with a JobError naming `source` for anything that is not JSON or is nested too deeply."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JobError(f"{source} is not valid JSON: {error}") from None
    except RecursionError:
        raise JobError(f"{source} is nested too deeply to parse") from None


@dataclass
class Options:
    model: str = "default"
    rays: int = 128
    sampling: str = "mis"
    seed: int = 0
    shadows: bool = True
    preview: bool = False  # interactive previews: a coarser screen-space transport (backend/screenspace.py)

    @classmethod
    def from_dict(cls, values: dict | None, defaults: Options | None = None) -> Options:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise JobError(f"unknown option(s) {unknown}; known options are {sorted(known)}")
        options = cls(**{**asdict(defaults or cls()), **values})
        options.validate()
        return options

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise JobError(f"option 'model' must be a non-empty string, got {self.model!r}")
        if isinstance(self.rays, bool) or not isinstance(self.rays, int) or not 1 <= self.rays <= MAX_RAYS:
            raise JobError(f"option 'rays' must be an integer in 1..{MAX_RAYS}, got {self.rays!r}")
        if self.sampling not in SAMPLINGS:
            raise JobError(f"option 'sampling' must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise JobError(f"option 'seed' must be an integer in 0..2^63-1, got {self.seed!r}")
        if not isinstance(self.shadows, bool):
            raise JobError(f"option 'shadows' must be true or false, got {self.shadows!r}")
        if not isinstance(self.preview, bool):
            raise JobError(f"option 'preview' must be true or false, got {self.preview!r}")


@dataclass
class Camera:
    world_to_camera: np.ndarray  # (4, 4) float64, row-major as Blender prints it
    projection: np.ndarray  # (4, 4) float64, OpenGL clip space

    def to_dict(self) -> dict:
        return {"world_to_camera": self.world_to_camera.tolist(), "projection": self.projection.tolist()}


@dataclass
class GBuffer:
    """Per-pixel material and geometry, float32, first row = top of the image."""

    albedo: np.ndarray  # (H, W, 3)
    specular: np.ndarray  # (H, W, 3) F0 colour
    roughness: np.ndarray  # (H, W)
    normal: np.ndarray  # (H, W, 3) world space, unit length on the foreground
    depth: np.ndarray  # (H, W)
    ao: np.ndarray  # (H, W)
    mask: np.ndarray  # (H, W) coverage 0..1
    metallic: np.ndarray | None = None
    position: np.ndarray | None = None
    coverage: np.ndarray | None = None  # (H, W) 0..1 through the pixel filter, also beyond the mask
    back_depth: np.ndarray | None = None  # (H, W) depth of the second surface along the ray (a closed object's back)
    next_depth: np.ndarray | None = None  # (H, W) ... of the third (the next object, or a hollow one's far wall)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self.mask.shape

    @property
    def foreground(self) -> np.ndarray:
        return self.mask > 0

    def layers(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Job:
    width: int
    height: int
    gbuffer: GBuffer
    hdri: np.ndarray  # (h, 2h, 3) linear RGB, first row = zenith
    camera: Camera
    options: Options = field(default_factory=Options)
    frame: int = 1
    lights: list[Light] = field(default_factory=list)
    # the depth of everything around the camera (backend/shadowmaps.py ShadowMap, equirectangular), for the
    # occluders that the G-buffer does not show; None without
    surround: object | None = None


TRANSPORT_LAYERS = {"visibility": 1, "bounce": 3, "reflection": 3}  # name: channels


@dataclass
class Result:
    """`shaded` and `unshadowed` are premultiplied by `mask`, their alpha: the G-buffer's coverage where it
    has that layer (anti-aliased edges, backend/edges.py), else its mask."""

    shaded: np.ndarray  # (H, W, 3)
    unshadowed: np.ndarray  # (H, W, 3)
    shadow: np.ndarray  # (H, W)
    lights: np.ndarray  # (H, W, 3) the lamps' shadowed part of `shaded`
    mask: np.ndarray  # (H, W) alpha
    meta: dict = field(default_factory=dict)
    # the screen-space terms before the shadow net, for debugging: visibility (H, W), bounce and
    # reflection (H, W, 3); empty where the model has no transport shadow net or shadows are off
    transport: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Reading


def _matrix(value, name: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise JobError(f"job.json: camera.{name} must be a 4x4 matrix of finite numbers")
    _require_invertible(matrix, f"camera.{name}")
    return matrix


def _require_invertible(matrix: np.ndarray, name: str) -> None:
    """The renderer inverts the camera matrices (backend/camera.py); a singular one fails at submit, not there."""
    if not np.linalg.cond(matrix) <= MAX_CONDITION:  # inf or NaN for a singular matrix
        raise JobError(f"job.json: {name} is singular (not invertible)")


def parse_job_json(data: dict) -> tuple[dict, Camera, Options, list[Light]]:
    """Validate job.json's fields; return (the raw dict, camera, options, lights)."""
    if not isinstance(data, dict):
        raise JobError("job.json must hold a JSON object")
    if data.get("format") != FORMAT:
        raise JobError(f"job.json: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if isinstance(version, bool) or version not in VERSIONS:
        raise JobError(f"job.json: unknown format version {version!r}; this backend reads {list(VERSIONS)}")
    known = {"format", "version", "width", "height", "gbuffer", "hdri", "frame", "camera", "options"}
    if version >= 2:
        known |= {"lights", "surround"}
    unknown = sorted(set(data) - known)
    if unknown:
        newer = [repr(key) for key in ("lights", "surround") if key in unknown]
        hint = f" ({' and '.join(newer)} {'needs' if len(newer) == 1 else 'need'} version 2)" if newer else ""
        raise JobError(f"job.json: unknown key(s) {unknown}{hint}")
    for key in ("width", "height"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise JobError(f"job.json: '{key}' must be an integer in 1..{MAX_SIZE}, got {value!r}")
    frame = data.get("frame", 1)
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise JobError(f"job.json: 'frame' must be an integer, got {frame!r}")
    for key in ("gbuffer", "hdri"):
        if not isinstance(data.get(key, ""), str):
            raise JobError(f"job.json: '{key}' must be a file name, got {data[key]!r}")
    camera = data.get("camera")
    if not isinstance(camera, dict):
        raise JobError("job.json: 'camera' with 'world_to_camera' and 'projection' is required")
    camera = Camera(_matrix(camera.get("world_to_camera"), "world_to_camera"),
                    _matrix(camera.get("projection"), "projection"))
    _require_invertible(camera.projection @ camera.world_to_camera, "camera.projection @ camera.world_to_camera")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise JobError("job.json: 'options' must be an object")
    try:
        lights = parse_lights(data.get("lights", []))
    except LightError as error:
        raise JobError(f"job.json: {error}") from None
    return data, camera, Options.from_dict(options), lights


def _split_layers(channels: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{'ViewLayer.albedo.R': a} -> {'albedo': {'R': a}}: the last two dot-separated parts count."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, array in channels.items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        layers.setdefault(parts[-2].lower(), {})[parts[-1].upper()] = array
    return layers


def _gather_layer(name: str, count: int, channels: dict[str, np.ndarray], source: str) -> np.ndarray:
    if count == 1:
        for key in ONE_CHANNEL_NAMES:
            if key in channels:
                return channels[key]
        raise JobError(f"{source}: layer '{name}' has no usable channel (found {sorted(channels)})")
    for names in THREE_CHANNEL_NAMES:
        if all(key in channels for key in names):
            return np.stack([channels[key] for key in names], axis=-1)
    raise JobError(f"{source}: layer '{name}' needs channels R,G,B or X,Y,Z (found {sorted(channels)})")


def _first_bad_pixel(bad: np.ndarray) -> str:
    row, col = np.argwhere(bad)[0][:2]
    return f"{int(bad.sum())} pixel(s), first at row {row}, column {col}"


def gbuffer_from_channels(channels: dict[str, np.ndarray], width: int, height: int,
                          source: str = "gbuffer.exr") -> GBuffer:
    layers = _split_layers(channels)
    values: dict[str, np.ndarray] = {}
    for name, count in {**REQUIRED_LAYERS, **OPTIONAL_LAYERS}.items():
        if name not in layers:
            if name in REQUIRED_LAYERS:
                raise JobError(f"{source}: required layer '{name}' is missing (found {sorted(layers)})")
            continue
        array = _gather_layer(name, count, layers[name], source)
        if array.shape[:2] != (height, width):
            raise JobError(f"{source}: layer '{name}' is {array.shape[1]}x{array.shape[0]}, "
                           f"the job is {width}x{height}")
        values[name] = np.ascontiguousarray(array, dtype=np.float32)
    gbuffer = GBuffer(**values)
    validate_gbuffer(gbuffer, source)
    return gbuffer


def validate_gbuffer(gbuffer: GBuffer, source: str = "gbuffer.exr") -> None:
    """Finite values on the foreground, unit-range layers in [0, 1], unit normals.

    Whole layers are checked first with vectorised reductions (most uploads are clean); only a layer
    that fails them is looked at pixel by pixel, since the background may hold anything.
    """
    mask = gbuffer.mask
    if not np.isfinite(mask).all():
        raise JobError(f"{source}: layer 'mask' holds NaN or Inf in {_first_bad_pixel(~np.isfinite(mask))}")
    coverage = gbuffer.coverage
    if coverage is not None and not (np.isfinite(coverage).all() and coverage.min() >= -RANGE_SLACK
                                     and coverage.max() <= 1 + RANGE_SLACK):
        raise JobError(f"{source}: layer 'coverage' must lie in [0, 1] everywhere, found NaN, Inf or values "
                       f"in [{np.nanmin(coverage):.4g}, {np.nanmax(coverage):.4g}]")
    foreground = gbuffer.foreground
    for name, array in gbuffer.layers().items():
        finite = bool(np.isfinite(array.min())) and bool(np.isfinite(array.max()))  # NaN and +-Inf propagate
        if not finite:
            bad = ~np.isfinite(array) & ((array != np.inf) if name in PEELED_DEPTHS else True)  # +Inf: no surface
            where = (bad.any(axis=-1) if bad.ndim == 3 else bad) & foreground
            if where.any():
                raise JobError(f"{source}: layer '{name}' holds NaN or Inf in foreground {_first_bad_pixel(where)}")
        if name in UNIT_RANGE_LAYERS and not (finite and array.min() >= -RANGE_SLACK
                                              and array.max() <= 1 + RANGE_SLACK):
            values = array[foreground]
            if values.size and (values.min() < -RANGE_SLACK or values.max() > 1 + RANGE_SLACK):
                raise JobError(f"{source}: layer '{name}' must lie in [0, 1] on the foreground, "
                               f"found values in [{values.min():.4g}, {values.max():.4g}]")
    normal = gbuffer.normal
    length = np.sqrt(np.einsum("...i,...i->...", normal, normal))
    bad = foreground & (np.abs(length - 1) > NORMAL_TOLERANCE)
    if bad.any():
        raise JobError(f"{source}: layer 'normal' is not unit length in foreground {_first_bad_pixel(bad)} "
                       f"(length {length[bad][0]:.3f}); render the G-buffer with a narrow pixel filter")


def validate_hdri(hdri: np.ndarray, source: str = "hdri.exr") -> None:
    height, width = hdri.shape[:2]
    if width != 2 * height:
        raise JobError(f"{source}: an equirectangular HDRI must be 2:1, got {width}x{height}")
    if not np.isfinite(hdri).all():
        raise JobError(f"{source}: holds NaN or Inf in {_first_bad_pixel((~np.isfinite(hdri)).any(axis=-1))}")
    if hdri.min() < 0:
        raise JobError(f"{source}: holds negative radiance in {_first_bad_pixel((hdri < 0).any(axis=-1))}")


def hdri_from_channels(channels: dict[str, np.ndarray], source: str = "hdri.exr") -> np.ndarray:
    by_channel: dict[str, np.ndarray] = {}
    for name, array in channels.items():
        by_channel.setdefault(name.split(".")[-1].upper(), array)
    if not all(key in by_channel for key in "RGB"):
        raise JobError(f"{source}: needs R, G and B channels (found {sorted(channels)})")
    hdri = np.ascontiguousarray(np.stack([by_channel[key] for key in "RGB"], axis=-1), dtype=np.float32)
    validate_hdri(hdri, source)
    return hdri


def _read(reader, source: str):
    try:
        return reader()
    except ExrTooLarge as error:
        raise JobTooLarge(f"{source}: {error}") from None
    except ExrError as error:
        raise JobError(f"{source}: {error}") from None


def job_from_parts(job_data: dict, gbuffer_channels: dict, hdri_channels: dict,
                   defaults: Options | None = None, read: Callable[[str], dict] | None = None) -> Job:
    """A job from job.json's dict and its EXRs' channels; read(file) gives the channels of another file
    of the job (the lights' shadow maps)."""
    data, camera, _, lights = parse_job_json(job_data)
    options = Options.from_dict(data.get("options"), defaults)
    width, height = data["width"], data["height"]
    return Job(width=width, height=height,
               gbuffer=gbuffer_from_channels(gbuffer_channels, width, height, data.get("gbuffer", "gbuffer.exr")),
               hdri=hdri_from_channels(hdri_channels, data.get("hdri", "hdri.exr")),
               camera=camera, options=options, frame=data.get("frame", 1),
               **_depth_maps(lights, data.get("surround"), read))


def _depth_maps(lights: list[Light], surround: dict | None, read: Callable[[str], dict] | None) -> dict:
    """{"lights": the lights with their `shadow` objects read into ShadowMaps (backend/shadowmaps.py),
    "surround": the surround map's ShadowMap or None}."""
    from .shadowmaps import SURROUND, parse_shadow  # it imports this module

    def channels(file: str) -> dict:
        if read is None:
            raise JobError(f"job.json: depth map {file!r} was not given with the job")
        return read(file)

    return {"lights": [light if light.shadow is None else
                       replace(light, shadow=parse_shadow(light.shadow, light.type, light.name, channels))
                       for light in lights],
            "surround": None if surround is None else parse_shadow(surround, SURROUND, SURROUND, channels)}


def load_job(path: str | Path, defaults: Options | None = None) -> Job:
    """Read a job from job.json (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "job.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise JobError(f"job file {path} does not exist") from None
    data = parse_json(text, path.name)
    parse_job_json(data)
    for key in ("gbuffer", "hdri"):
        if not isinstance(data.get(key), str):
            raise JobError(f"job.json: '{key}' must be a path relative to job.json")
        if not (path.parent / data[key]).is_file():
            raise JobError(f"job.json: {key} file {data[key]!r} does not exist beside {path.name}")
    gbuffer_channels, _ = _read(lambda: read_exr(path.parent / data["gbuffer"]), data["gbuffer"])
    hdri_channels, _ = _read(lambda: read_exr(path.parent / data["hdri"]), data["hdri"])

    def read(file: str) -> dict:
        if not (path.parent / file).is_file():
            raise JobError(f"job.json: depth map file {file!r} does not exist beside {path.name}")
        return _read(lambda: read_exr(path.parent / file), file)[0]

    return job_from_parts(data, gbuffer_channels, hdri_channels, defaults, read)


def job_from_bytes(job_json: bytes, gbuffer_exr: bytes, hdri_exr: bytes, defaults: Options | None = None,
                   files: dict[str, bytes] | None = None, max_pixels: int | None = None) -> Job:
    """Read a job uploaded as bytes (the service's path); `files`: the job's other files (shadow maps) by
    the name job.json gives them. Every image's header is checked before its pixels are decoded: the
    G-buffer must have the job's size, and no image (nor the job) more than `max_pixels` pixels."""
    data = parse_json(job_json, "job.json")
    parse_job_json(data)
    width, height = data["width"], data["height"]
    if max_pixels is not None and width * height > max_pixels:
        raise JobTooLarge(f"job.json: 'width' x 'height' ({width}x{height}) is more than this service's budget "
                          f"of {max_pixels} pixels (pbnds serve --max-pixels)")
    gbuffer_channels, _ = _read(lambda: read_exr_bytes(gbuffer_exr, "gbuffer.exr", size=(width, height),
                                                       max_pixels=max_pixels), "gbuffer.exr")
    hdri_channels, _ = _read(lambda: read_exr_bytes(hdri_exr, "hdri.exr", max_pixels=max_pixels), "hdri.exr")
    files = files or {}

    def read(file: str) -> dict:
        if file not in files:
            raise JobError(f"job.json: depth map file {file!r} was not uploaded with the job")
        return _read(lambda: read_exr_bytes(files[file], file, max_pixels=max_pixels), file)[0]

    return job_from_parts(data, gbuffer_channels, hdri_channels, defaults, read)


def hdri_from_bytes(hdri_exr: bytes, max_pixels: int | None = None) -> np.ndarray:
    channels, _ = _read(lambda: read_exr_bytes(hdri_exr, "hdri.exr", max_pixels=max_pixels), "hdri.exr")
    return hdri_from_channels(channels)


# ----------------------------------------------------------------------------------------------
# Writing


def _layer_channels(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    if array.ndim == 2:
        return {f"{name}.Y": array}
    names = "XYZ" if name in ("normal", "position") else "RGB"
    return {f"{name}.{key}": array[..., i] for i, key in enumerate(names)}


def write_job(job: Job, folder: str | Path, *, half: bool = False) -> Path:
    """Write job.json, gbuffer.exr and hdri.exr into folder; return the job.json path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    channels: dict[str, np.ndarray] = {}
    for name, array in job.gbuffer.layers().items():
        channels.update(_layer_channels(name, array))
    write_exr(folder / "gbuffer.exr", channels, half=half)
    write_exr(folder / "hdri.exr", {c: job.hdri[..., i] for i, c in enumerate("RGB")}, half=False)
    data = {"format": FORMAT, "version": VERSION, "width": job.width, "height": job.height,
            "gbuffer": "gbuffer.exr", "hdri": "hdri.exr", "frame": job.frame,
            "camera": job.camera.to_dict(), "options": asdict(job.options),
            "lights": [_light_entry(light, folder) for light in job.lights]}
    if job.surround is not None:
        data["surround"] = job.surround.write(folder)
    (folder / "job.json").write_text(json.dumps(data, indent=1))
    return folder / "job.json"


def _light_entry(light: Light, folder: Path) -> dict:
    """A light's job.json entry; a shadow map that was read (a ShadowMap) is written beside job.json."""
    if light.shadow is None or isinstance(light.shadow, dict):
        return light.to_dict()
    return {**replace(light, shadow=None).to_dict(), "shadow": light.shadow.write(folder)}


def result_channels(result: Result) -> dict[str, np.ndarray]:
    channels: dict[str, np.ndarray] = {}
    for name in ("shaded", "unshadowed", "lights", "shadow", "mask"):
        channels.update(_layer_channels(name, getattr(result, name)))
    for name, array in result.transport.items():
        channels.update(_layer_channels(name, array))
    return channels


def write_result(path: str | Path, result: Result, *, half: bool = False) -> None:
    write_exr(path, result_channels(result), half=half, meta=result.meta)


def read_result(path: str | Path) -> Result:
    channels, meta = read_exr(path)
    layers = _split_layers(channels)
    try:
        return Result(shaded=_gather_layer("shaded", 3, layers["shaded"], str(path)),
                      unshadowed=_gather_layer("unshadowed", 3, layers["unshadowed"], str(path)),
                      lights=_gather_layer("lights", 3, layers["lights"], str(path)),
                      shadow=_gather_layer("shadow", 1, layers["shadow"], str(path)),
                      mask=_gather_layer("mask", 1, layers["mask"], str(path)), meta=meta,
                      transport={name: _gather_layer(name, count, layers[name], str(path))
                                 for name, count in TRANSPORT_LAYERS.items() if name in layers})
    except KeyError as missing:
        raise JobError(f"{path}: result layer {missing} is missing") from None

