"""Shadow maps of analytic lights: the `shadow` object of a light entry (docs/job-format.md) and the
visible fraction of the light at each shaded point.

The add-on renders each light's view of the scene as a depth map, so occluders the camera does not
see (off screen, behind others) still cast shadows. A shaded point is moved one texel along its normal
(normal offset), projected into the map, and compared with the map's depths around it with a slope-scaled
bias: percentage-closer filtering on bilinearly weighted depth tests. Lights with a size get percentage-
closer soft shadows: a blocker search estimates the mean occluder distance, which sets the penumbra's
width on the receiver by similar triangles, and the filter takes that width. Taps lie on a Vogel disc
rotated per point (noise instead of banding). Everything is vectorised over points, a chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .exrio import write_exr
from .jobformat import JobError, _gather_layer, _split_layers

PROJECTIONS = ("orthographic", "perspective", "equirectangular")
SURROUND = "surround"  # the job's `surround` map: a panorama at the camera (docs/job-format.md)
PROJECTIONS_OF = {"sun": ("orthographic",), "point": ("perspective", "equirectangular"),
                  "spot": ("perspective", "equirectangular"), "area": ("perspective", "equirectangular"),
                  SURROUND: ("equirectangular",)}
KEYS = {"file", "projection", "world_to_light", "matrix", "bias"}
EMPTY = 1e9  # depths at least this far are misses (Blender writes 1e10)
TAPS = 16  # blocker-search and filter taps per point
PCF_RADIUS = 1.0  # texels: the filter of a hard shadow
MAX_RADIUS = 32.0  # texels: the widest search and filter
NORMAL_OFFSET = 1.0  # texels along the normal
SLOPE_BIAS = 1.0  # texels of depth bias per unit tangent of the angle to the light
MAX_SLOPE = 8.0  # the tangent's cap (grazing light)
SEARCH = 2.0  # a local light's blocker search: this many light radii around the receiver
CHUNK = 32768  # points at a time (memory: ~40 floats per point and tap)


@dataclass
class ShadowMap:
    """One light's depth map, float32, row 0 at the top; misses are +inf."""

    light: str  # the light's name, for messages
    file: str  # relative to job.json
    projection: str
    world_to_light: np.ndarray  # (4, 4)
    matrix: np.ndarray | None  # (4, 4) OpenGL clip matrix; None for equirectangular
    bias: float
    depth: np.ndarray  # (H, W)

    def to_dict(self) -> dict:
        """The light entry's `shadow` object."""
        value = {"file": self.file, "projection": self.projection, "world_to_light": self.world_to_light.tolist(),
                 "bias": self.bias}
        if self.matrix is not None:
            value["matrix"] = self.matrix.tolist()
        return value

    def write(self, folder: Path) -> dict:
        """Write the map's EXR into `folder` (beside job.json); return the `shadow` object."""
        write_exr(folder / self.file, {"depth.Z": self.depth})
        return self.to_dict()


def _matrix(value, where: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise JobError(f"{where} must be a 4x4 matrix of finite numbers")
    return matrix


def parse_shadow(value, light_type: str, light: str,
                 read: Callable[[str], dict[str, np.ndarray]]) -> ShadowMap:
    """The ShadowMap of a light entry's `shadow` object, or of the job's `surround` (light_type and light
    SURROUND); read(file) returns the EXR's channels (or raises JobError)."""
    where = "job.json: surround" if light_type == SURROUND else f"job.json: light {light!r}: shadow"
    of = "the surround map" if light_type == SURROUND else f"shadow map of {light_type} light {light!r}"
    if not isinstance(value, dict):
        raise JobError(f"{where} must be an object")
    unknown = sorted(set(value) - KEYS)
    if unknown:
        raise JobError(f"{where}: unknown key(s) {unknown}")
    projection = value.get("projection")
    if projection not in PROJECTIONS_OF.get(light_type, PROJECTIONS):
        raise JobError(f"{where}.projection must be one of {list(PROJECTIONS_OF.get(light_type, PROJECTIONS))} "
                       f"for {of}, got {projection!r}")
    world_to_light = _matrix(value.get("world_to_light"), f"{where}.world_to_light")
    matrix = None
    if projection == "equirectangular":
        if "matrix" in value:
            raise JobError(f"{where}.matrix is not used by an equirectangular map; leave it out")
    else:
        matrix = _matrix(value.get("matrix"), f"{where}.matrix")
    bias = value.get("bias", 0.0)
    if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias) or bias < 0:
        raise JobError(f"{where}.bias must be a finite number >= 0, got {bias!r}")
    file = value.get("file")
    if not isinstance(file, str) or not file:
        raise JobError(f"{where}.file must be a path relative to job.json")
    layers = _split_layers(read(file))
    if "depth" not in layers:
        raise JobError(f"{file} ({of}): no 'depth' layer (found {sorted(layers)})")
    depth = _gather_layer("depth", 1, layers["depth"], file)
    if np.isnan(depth).any() or depth.min() < 0:
        raise JobError(f"{file} ({of}): depths must be >= 0 and not NaN")
    if projection == "equirectangular" and depth.shape[1] != 2 * depth.shape[0]:
        raise JobError(f"{file} ({of}): an equirectangular map must be 2:1, "
                       f"got {depth.shape[1]}x{depth.shape[0]}")
    depth = np.where(depth >= EMPTY, np.inf, depth).astype(np.float32)
    return ShadowMap(light, file, projection, world_to_light, matrix, float(bias), depth)


def light_size(light) -> float:
    """The extent of a light (backend/lights.py) that softens its shadow, as visibility() takes it: tan of
    a sun's angular radius, a sphere light's radius, the radius of the disc of an area light's area."""
    if light.type == "sun":
        return math.tan(min(light.angle, 3.0) / 2)
    if light.type == "area":
        return math.sqrt(light.area / math.pi)
    return light.radius


def _project(shadow: ShadowMap, points: torch.Tensor, height: int, width: int):
    """(x, y) continuous texel coordinates (texel i spans [i, i + 1)), the depth as the map stores it,
    the world size of a texel there, whether the point is in front of the camera, and the world
    directions (P or 1, 2, 3) in which x and y grow."""
    to_light = torch.as_tensor(shadow.world_to_light, dtype=points.dtype, device=points.device)
    q = points @ to_light[:3, :3].T + to_light[:3, 3]
    if shadow.projection == "equirectangular":
        x, y, distance, longitude, polar = _panorama(q, height, width)
        east = torch.stack([longitude.cos(), torch.zeros_like(x), longitude.sin()], -1)
        south = torch.stack([polar.cos() * longitude.sin(), -polar.sin(), -polar.cos() * longitude.cos()], -1)
        axes = torch.stack([east, south], 1) @ to_light[:3, :3]
        return x, y, distance, distance * (math.pi / height), torch.ones_like(x, dtype=torch.bool), axes
    matrix = torch.as_tensor(shadow.matrix, dtype=points.dtype, device=points.device)
    clip = q @ matrix[:, :3].T + matrix[:, 3]
    w = clip[:, 3]
    front = w > 1e-9
    w = torch.where(front, w, 1.0)
    x = (clip[:, 0] / w + 1) * (width / 2)
    y = (1 - clip[:, 1] / w) * (height / 2)
    # world size of a texel: at unit w for a perspective map (times the depth), everywhere for an orthographic one
    texel = max(2 / (abs(shadow.matrix[0, 0]) * width), 2 / (abs(shadow.matrix[1, 1]) * height)) * w
    return x, y, -q[:, 2], texel, front, torch.stack([to_light[0, :3], -to_light[1, :3]])[None]


def _panorama(q: torch.Tensor, height: int, width: int):
    """Light-space points (P, 3) on an equirectangular map: continuous texel coordinates x, y, their
    distance from its centre, longitude and polar angle."""
    distance = q.norm(dim=-1).clamp(min=1e-12)
    longitude, polar = torch.atan2(q[:, 0], -q[:, 2]), torch.acos((q[:, 1] / distance).clamp(-1, 1))
    return (0.5 + longitude / (2 * math.pi)) * width, polar / math.pi * height, distance, longitude, polar


def _light_directions(shadow: ShadowMap, points: torch.Tensor) -> torch.Tensor:
    """Unit vectors from the points towards the light: the sun's camera +Z, else towards the camera."""
    to_world = torch.as_tensor(np.linalg.inv(shadow.world_to_light), dtype=points.dtype, device=points.device)
    if shadow.projection == "orthographic":
        return (to_world[:3, 2] / to_world[:3, 2].norm()).expand_as(points)
    return torch.nn.functional.normalize(to_world[:3, 3] - points, dim=-1)


class _Lookup:
    """Depth tests against one map on a device: padded so that taps off a planar map read +inf (lit)."""

    def __init__(self, shadow: ShadowMap, device: torch.device):
        depth = torch.as_tensor(shadow.depth, device=device)
        self.height, self.width = depth.shape
        self.wrap = shadow.projection == "equirectangular"
        self.padded = torch.nn.functional.pad(depth, (1, 1, 1, 1), value=math.inf).flatten()

    def texels(self, col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Depths at integer texel coordinates: wrapped around and clamped at the poles for a panorama,
        +inf beyond a planar map's border."""
        if self.wrap:
            col, row = col.remainder(self.width), row.clamp(0, self.height - 1)
        else:
            col, row = col.clamp(-1, self.width), row.clamp(-1, self.height)
        return self.padded[((row + 1) * (self.width + 2) + col + 1).long()]

    def lit(self, x: torch.Tensor, y: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Bilinearly weighted depth tests at continuous coordinates: the lit fraction."""
        x, y = x - 0.5, y - 0.5
        col, row = x.floor(), y.floor()
        fx, fy = x - col, y - row
        out = 0
        for dc, dr, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                               (1, 1, fx * fy)):
            out = out + weight * (depth <= self.texels(col + dc, row + dr))
        return out


class Depths:
    """The distance a panorama holds along each point's direction (its nearest texel) beside the point's own
    distance from its centre: the screen-space march's surround map (backend/screenspace.py)."""

    def __init__(self, shadow: ShadowMap, device: torch.device):
        if shadow.projection != "equirectangular":
            raise ValueError(f"{shadow.light}: a surround map is equirectangular, not {shadow.projection}")
        self.lookup = _Lookup(shadow, device)
        to_light = torch.as_tensor(shadow.world_to_light, dtype=torch.float32, device=device)
        self.rotation, self.offset = to_light[:3, :3].T.contiguous(), to_light[:3, 3]

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the points' distances, the map's distances there), (P,) each, for world points (P, 3)."""
        x, y, distance, _, _ = _panorama(points @ self.rotation + self.offset, self.lookup.height, self.lookup.width)
        return distance, self.lookup.texels(x.floor(), y.floor())


def _disc(count: int, device: torch.device) -> torch.Tensor:
    """A Vogel (golden-angle) disc of `count` taps in the unit disc, (count, 2)."""
    k = torch.arange(count, device=device, dtype=torch.float32)
    radius, angle = ((k + 0.5) / count).sqrt(), k * (math.pi * (3 - math.sqrt(5)))
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1)


def visibility(shadow: ShadowMap, positions: torch.Tensor, normals: torch.Tensor, size: float = 0.0,
               chunk: int = CHUNK) -> torch.Tensor:
    """The light's visible fraction (P,) in [0, 1] at world positions with unit normals (P, 3).

    size: the light's extent that softens its shadow: tan(angle / 2) for a sun, the radius of the emitting
    sphere or disc for the other lights (0: a hard shadow, filtered over a texel)."""
    device = positions.device
    lookup = _Lookup(shadow, device)
    disc = _disc(TAPS, device)
    out = torch.empty(len(positions), device=device)
    for lo in range(0, len(positions), chunk):
        hi = min(lo + chunk, len(positions))
        out[lo:hi] = _chunk(shadow, lookup, disc, positions[lo:hi].float(), normals[lo:hi].float(), size, lo)
    return out


def _chunk(shadow: ShadowMap, lookup: _Lookup, disc: torch.Tensor, points: torch.Tensor, normals: torch.Tensor,
           size: float, first: int) -> torch.Tensor:
    towards = _light_directions(shadow, points)
    cos = (normals * towards).sum(-1).clamp(min=1e-3)
    tan = ((1 - cos * cos).clamp(min=0).sqrt() / cos).clamp(max=MAX_SLOPE)
    texel = _project(shadow, points, lookup.height, lookup.width)[3]
    x, y, depth, texel, front, axes = _project(shadow, points + normals * (NORMAL_OFFSET * texel)[:, None],
                                               lookup.height, lookup.width)
    depth = depth - shadow.bias - SLOPE_BIAS * texel * tan
    # Receiver-plane depth: the receiver's tangent plane, extrapolated to each tap, is what a tap compares
    # (else a wide filter on a sloped receiver shadows the receiver itself). Per texel along x and y:
    slope = (axes @ normals[:, :, None])[..., 0] / cos[:, None]
    slope = slope.clamp(-MAX_SLOPE, MAX_SLOPE) * texel[:, None]
    # One rotation of the disc per point; a panorama's texels narrow towards its poles (stretch).
    angle = (torch.arange(first, first + len(points), device=points.device) * 0.6180339887).frac() * (2 * math.pi)
    cos_a, sin_a = angle.cos()[:, None], angle.sin()[:, None]
    dx = disc[:, 0] * cos_a - disc[:, 1] * sin_a
    dy = disc[:, 0] * sin_a + disc[:, 1] * cos_a
    stretch = (y / lookup.height * math.pi).sin().clamp(min=1 / 8).reciprocal()[:, None] if lookup.wrap else 1
    radius = torch.full_like(depth, PCF_RADIUS)
    found = torch.ones_like(front)
    if size > 0:
        # Blocker search over the widest penumbra a blocker could cast here.
        reach = depth * size if shadow.projection == "orthographic" else torch.full_like(depth, SEARCH * size)
        search = (reach / texel).clamp(PCF_RADIUS, MAX_RADIUS)[:, None]
        found_depth = lookup.texels((x[:, None] + dx * stretch * search).floor(), (y[:, None] + dy * search).floor())
        blocker = found_depth < depth[:, None] + (slope[:, :1] * dx + slope[:, 1:] * dy) * search
        found = blocker.any(-1)
        mean = torch.where(blocker, found_depth, 0).sum(-1) / blocker.sum(-1).clamp(min=1)
        gap = (depth - mean).clamp(min=0)
        penumbra = gap * size if shadow.projection == "orthographic" else size * gap / mean.clamp(min=1e-6)
        radius = (penumbra / texel).clamp(PCF_RADIUS, MAX_RADIUS)
    radius = radius[:, None]
    receiver = depth[:, None] + (slope[:, :1] * dx + slope[:, 1:] * dy) * radius
    lit = lookup.lit(x[:, None] + dx * stretch * radius, y[:, None] + dy * radius, receiver).mean(-1)
    return torch.where(front & found, lit, 1.0)
