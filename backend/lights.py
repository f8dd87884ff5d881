"""Analytic lights (job format version 2): their parsing and their exact, deterministic shading.

Each light turns the foreground pixels' world positions (P, 3) into light samples: directions wi
(1 or P, S, 3) from the surface towards the light and irradiances E (1 or P, S, 3), such that the
reflected radiance is sum_s f(wi_s) cos(wi_s) E_s, which a linear shader evaluates through its
brdf_cos. The sample sets are seeded low-discrepancy sets (the same image every time):

- sun: one direction (angle 0), or S directions uniform over the disc's cone; every sample carries
  E / sum_s cos(wi_s, axis), so a surface facing the sun receives exactly `irradiance`.
- point, spot: the direction to the centre with E = I / d^2 (radius 0), or S directions uniform over
  the cone the sphere subtends, normalised in the same way (a uniform sphere of radiance I / (pi r^2)
  gives a surface facing it exactly I / d^2); a surface inside the sphere gets no light. With
  `soft_falloff` (Blender's default "Soft Falloff") the light is a disc of radius r facing the surface:
  the cone it subtends, normalised to I / (d^2 + r^2), which is what Cycles renders then. Spots are
  attenuated per sample as Cycles' spot_light_attenuation: smoothstep((cos - cos_half) / ((1 - cos_half)
  blend)) with cos the angle between the spot's axis and the direction from the light to the surface.
- area: S stratified points over the rectangle or ellipse (Sobol points, concentric map for the
  ellipse), E_s = L A cos_light g(a) / (d^2 S) on the emitting side, where g is Cycles' spread
  (area_light_spread_attenuation: the soft-box grid max(tan(h) - tan(a), 0) / (tan(h) - h), h =
  spread / 2, a the angle to the light's normal; power-preserving; g = 1 for spread pi). Spread 0 is
  a collimated beam: the footprint of the shape receives pi L along the normal.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import ClassVar

import torch

from .sampling import UNIFORM_SPHERE_PDF, RaySet, _uniforms, to_world
from .shaders import PixelInputs, Shader

DEFAULT_SAMPLES = 16  # per area light, soft sun and sphere light
UNIT_TOLERANCE = 1e-3  # |v| = 1 and orthogonality, as Blender writes float32 vectors
ANGLE_SLACK = 1e-5  # Blender's float32 pi is above math.pi
SHAPES = ("rectangle", "ellipse")


class LightError(ValueError):
    """A light entry that breaks the contract (jobformat reports it as a JobError)."""


# ----------------------------------------------------------------------------------------------
# Parsing


def _number(value, where: str, low: float = -math.inf, high: float = math.inf, *, above: bool = False) -> float:
    """A finite float in [low, high] ((low, high] when `above`)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LightError(f"{where} must be a finite number, got {value!r}")
    if value < low or value > high or (above and value <= low):
        bounds = f"{'(' if above else '['}{low:g}, {high:g}]"
        raise LightError(f"{where} must lie in {bounds}, got {value!r}")
    return float(value)


def _vector(value, where: str, *, unit: bool = False, colour: bool = False) -> tuple[float, float, float]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise LightError(f"{where} must be a list of 3 numbers, got {value!r}")
    vector = tuple(_number(v, where, 0.0 if colour else -math.inf) for v in value)
    if unit and abs(math.sqrt(sum(v * v for v in vector)) - 1) > UNIT_TOLERANCE:
        raise LightError(f"{where} must be a unit vector, got {list(vector)}")
    return vector


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise LightError(f"{where} must be true or false, got {value!r}")
    return value


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, kw_only=True)
class Light:
    """Base of the light types; `type` is the job.json name, FIELDS the type's validators."""

    type: ClassVar[str]
    FIELDS: ClassVar[dict] = {}
    name: str = ""
    shadow: dict | None = None  # opaque here; a ShadowMap (backend/shadowmaps.py) once the job's files are read

    @classmethod
    def from_dict(cls, data: dict, index: int) -> Light:
        where = f"lights[{index}]" + (f" ({data['name']!r})" if isinstance(data.get("name"), str) else "")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"type"})
        if unknown:
            raise LightError(f"{where}: unknown key(s) {unknown} for a {cls.type} light; known: {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise LightError(f"{where}: a {cls.type} light needs {missing}")
        if not isinstance(data.get("name", ""), str):
            raise LightError(f"{where}.name must be a string")
        if data.get("shadow") is not None and not isinstance(data["shadow"], dict):
            raise LightError(f"{where}.shadow must be an object")
        values = {key: cls.FIELDS[key](value, f"{where}.{key}") if key in cls.FIELDS else value
                  for key, value in data.items() if key != "type"}
        light = cls(**values)
        light.check(where)
        return light

    def check(self, where: str) -> None:
        """Checks across fields."""

    def to_dict(self) -> dict:
        values = {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}
        if values["shadow"] is None:
            del values["shadow"]
        return {"type": self.type, **values}

    def sample(self, positions: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(wi, E): directions (1 or P, S, 3) towards the light and irradiances (1 or P, S, 3)."""
        raise NotImplementedError


def _tensor(value, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _unit_square(count: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """The seeded Sobol points of every light's sample set, (count, 2)."""
    return _uniforms(count, 2, seed, True).to(like)


def _cone(axis: torch.Tensor, one_minus_cos: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions uniform over cones (axis (B, 3), 1 - cos(half angle) (B, 1)) at points u (S, 2): the
    directions (B, S, 3) and their cosines to the axis (B, S)."""
    cos = 1 - u[:, 0] * one_minus_cos
    sin = torch.sqrt((1 - cos * cos).clamp(min=0))
    phi = 2 * math.pi * u[:, 1]
    local = torch.stack([sin * torch.cos(phi), sin * torch.sin(phi), cos], dim=-1)
    return to_world(local, axis), cos


@dataclass(frozen=True, kw_only=True)
class Sun(Light):
    type: ClassVar[str] = "sun"
    FIELDS: ClassVar[dict] = {
        "direction": lambda v, w: _vector(v, w, unit=True),
        "irradiance": lambda v, w: _vector(v, w, colour=True),
        "angle": lambda v, w: _number(v, w, 0.0, math.pi + ANGLE_SLACK)}
    direction: tuple[float, float, float]
    irradiance: tuple[float, float, float]
    angle: float = 0.0

    def sample(self, positions, count, seed):
        axis = _tensor([self.direction], positions)
        irradiance = _tensor(self.irradiance, positions)
        if self.angle == 0:
            return axis[:, None], irradiance[None, None]
        one_minus_cos = _tensor([[2 * math.sin(self.angle / 4) ** 2]], positions)  # 1 - cos(angle / 2)
        directions, cos = _cone(axis, one_minus_cos, _unit_square(count, seed, positions))
        return directions, (irradiance / cos.sum())[None, None].expand(1, count, 3)


@dataclass(frozen=True, kw_only=True)
class PointLight(Light):
    type: ClassVar[str] = "point"
    FIELDS: ClassVar[dict] = {
        "position": _vector,
        "intensity": lambda v, w: _vector(v, w, colour=True),
        "radius": lambda v, w: _number(v, w, 0.0),
        "soft_falloff": _flag}
    position: tuple[float, float, float]
    intensity: tuple[float, float, float]
    radius: float = 0.0
    soft_falloff: bool = False

    def sample(self, positions, count, seed):
        offset = _tensor(self.position, positions) - positions
        distance2 = offset.square().sum(-1, keepdim=True)  # (P, 1)
        axis = offset * torch.rsqrt(distance2.clamp(min=1e-20))
        r2 = self.radius**2
        falloff = distance2 + r2 if self.soft_falloff else distance2
        radiant = _tensor(self.intensity, positions) / falloff.clamp(min=1e-20)  # (P, 3) I / d^2
        if self.radius == 0:
            directions = axis[:, None]
            irradiance = radiant[:, None]
        else:
            sin2 = (r2 / falloff).clamp(max=1)  # of the cone the sphere (or the facing disc) subtends
            one_minus_cos = sin2 / (1 + torch.sqrt(1 - sin2))  # 1 - cos(half angle), without cancellation
            directions, cos = _cone(axis, one_minus_cos, _unit_square(count, seed, positions))
            if not self.soft_falloff:
                radiant = radiant * (distance2 > r2).to(radiant.dtype)  # inside the sphere: no light
            irradiance = (radiant / cos.sum(-1, keepdim=True))[:, None].expand(-1, count, -1)
        return directions, irradiance * self.attenuation(directions)[..., None]

    def attenuation(self, directions: torch.Tensor) -> torch.Tensor:
        """Per-sample emission factor (P, S): 1 for a point light."""
        return torch.ones(directions.shape[:2], device=directions.device)


def smoothstep(x: torch.Tensor) -> torch.Tensor:
    """Cycles' smoothstepf: 3x^2 - 2x^3 of x clamped to [0, 1]."""
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


@dataclass(frozen=True, kw_only=True)
class SpotLight(PointLight):
    type: ClassVar[str] = "spot"
    FIELDS: ClassVar[dict] = {
        **PointLight.FIELDS,
        "direction": lambda v, w: _vector(v, w, unit=True),
        "spot_size": lambda v, w: _number(v, w, 0.0, math.pi + ANGLE_SLACK, above=True),
        "spot_blend": lambda v, w: _number(v, w, 0.0, 1.0)}
    direction: tuple[float, float, float]
    spot_size: float
    spot_blend: float = 0.0

    def attenuation(self, directions):
        """Cycles' spot_light_attenuation of the direction from the light to the surface (-wi)."""
        cos_half = math.cos(min(self.spot_size, math.pi) / 2)
        cos = -(directions * _tensor(self.direction, directions)).sum(-1)
        if self.spot_blend == 0:
            return (cos > cos_half).to(directions.dtype)
        return smoothstep((cos - cos_half) / ((1 - cos_half) * self.spot_blend))


def _concentric_disc(u: torch.Tensor) -> torch.Tensor:
    """Shirley and Chiu's area-preserving map of the unit square onto the unit disc: (S, 2)."""
    a, b = (2 * u - 1).unbind(-1)
    wide = a.abs() > b.abs()
    radius = torch.where(wide, a, b)
    safe = torch.where(radius == 0, 1.0, radius)
    phi = torch.where(wide, math.pi / 4 * b / safe, math.pi / 2 - math.pi / 4 * a / safe)
    return torch.stack([radius * torch.cos(phi), radius * torch.sin(phi)], dim=-1)


@dataclass(frozen=True, kw_only=True)
class AreaLight(Light):
    type: ClassVar[str] = "area"
    FIELDS: ClassVar[dict] = {
        "position": _vector,
        "axes": lambda v, w: _axes(v, w),
        "normal": lambda v, w: _vector(v, w, unit=True),
        "size": lambda v, w: _size(v, w),
        "shape": lambda v, w: _shape(v, w),
        "radiance": lambda v, w: _vector(v, w, colour=True),
        "spread": lambda v, w: _number(v, w, 0.0, math.pi + ANGLE_SLACK)}
    position: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], tuple[float, float, float]]
    normal: tuple[float, float, float]
    size: tuple[float, float]
    radiance: tuple[float, float, float]
    shape: str = "rectangle"
    spread: float = math.pi

    def check(self, where):
        (x, y), n = self.axes, self.normal
        for label, value in (("axes[0].axes[1]", _dot(x, y)), ("axes[0].normal", _dot(x, n)),
                             ("axes[1].normal", _dot(y, n))):
            if abs(value) > UNIT_TOLERANCE:
                raise LightError(f"{where}: axes and normal must be orthogonal, {label} = {value:.4g}")

    def to_dict(self):
        values = super().to_dict()
        values["axes"] = [list(a) for a in self.axes]
        return values

    @property
    def area(self) -> float:
        width, height = self.size
        return width * height * (math.pi / 4 if self.shape == "ellipse" else 1.0)

    def _tensors(self, like: torch.Tensor):
        return (_tensor(v, like) for v in (self.position, self.axes[0], self.axes[1], self.normal, self.radiance))

    def sample(self, positions, count, seed):
        if self.spread <= ANGLE_SLACK:
            return self._collimated(positions)
        centre, x_axis, y_axis, normal, radiance = self._tensors(positions)
        width, height = self.size
        u = _unit_square(count, seed, positions)
        local = _concentric_disc(u) / 2 if self.shape == "ellipse" else u - 0.5
        points = centre + local[:, :1] * width * x_axis + local[:, 1:] * height * y_axis  # (S, 3)
        offset = points[None] - positions[:, None]  # (P, S, 3)
        distance2 = offset.square().sum(-1).clamp(min=1e-20)
        directions = offset * torch.rsqrt(distance2)[..., None]
        cos_light = -(directions * normal).sum(-1)  # > 0 on the emitting side
        weight = cos_light.clamp(min=0) * self._spread(cos_light) * (self.area / count) / distance2
        return directions, weight[..., None] * radiance

    def _spread(self, cos: torch.Tensor) -> torch.Tensor:
        """Cycles' area_light_spread_attenuation at the emission angle a (cos a = `cos` > 0)."""
        if self.spread >= math.pi - ANGLE_SLACK:
            return torch.ones_like(cos)
        half = self.spread / 2
        tan_half = math.tan(half)
        normalise = 1 / (tan_half - half) if half > 0.05 else 3 / half**3  # Taylor series below 0.05
        cos = cos.clamp(min=1e-12)
        tan = torch.sqrt((1 - cos * cos).clamp(min=0)) / cos
        return ((tan_half - tan) * normalise).clamp(min=0)

    def _collimated(self, positions):
        """Spread 0: the shape's footprint along the normal receives pi L (all the power, as Cycles)."""
        centre, x_axis, y_axis, normal, radiance = self._tensors(positions)
        offset = positions - centre
        a = 2 * (offset * x_axis).sum(-1) / self.size[0]
        b = 2 * (offset * y_axis).sum(-1) / self.size[1]
        inside = (a * a + b * b <= 1) if self.shape == "ellipse" else (a.abs() <= 1) & (b.abs() <= 1)
        lit = inside & ((offset * normal).sum(-1) > 0)
        return -normal[None, None], (math.pi * lit[:, None, None]) * radiance


def _axes(value, where):
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise LightError(f"{where} must be [x, y], two unit vectors, got {value!r}")
    return tuple(_vector(v, f"{where}[{i}]", unit=True) for i, v in enumerate(value))


def _size(value, where):
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise LightError(f"{where} must be [x, y] in metres, got {value!r}")
    return tuple(_number(v, f"{where}[{i}]", 0.0, above=True) for i, v in enumerate(value))


def _shape(value, where):
    if value not in SHAPES:
        raise LightError(f"{where} must be one of {list(SHAPES)}, got {value!r}")
    return value


TYPES = {cls.type: cls for cls in (Sun, PointLight, SpotLight, AreaLight)}


def parse_lights(value) -> list[Light]:
    """job.json's `lights` list as typed lights; a LightError names the light and the field."""
    if not isinstance(value, list):
        raise LightError(f"'lights' must be a list, got {type(value).__name__}")
    lights = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise LightError(f"lights[{index}] must be an object")
        kind = entry.get("type")
        if kind not in TYPES:
            raise LightError(f"lights[{index}].type must be one of {list(TYPES)}, got {kind!r}")
        lights.append(TYPES[kind].from_dict(entry, index))
    return lights


# ----------------------------------------------------------------------------------------------
# Shading


def contributions(shader, pixels: PixelInputs, directions: torch.Tensor, irradiance: torch.Tensor) -> torch.Tensor:
    """Each light sample's reflected radiance, (P, S, 3).

    A linear shader (every shader with brdf_cos, FastShader included) gives f cos E exactly. A shader not
    linear in Li (the paper-faithful one) learned the mean over uniform rays of about 4 pi f cos Li, so each
    sample is one ray of radiance E / (4 pi) through its forward, less the same ray without light (its
    output is not zero in the dark): an approximation, exact only as far as the network is linear.
    """
    linear = not isinstance(shader, Shader) or shader.unbiased  # a FastShader is a linear shader's fast path
    if linear:
        return shader.brdf_cos(pixels, directions) * irradiance
    count = len(pixels)
    directions = directions.expand(count, -1, -1)
    irradiance = irradiance.expand(count, -1, -1)
    pdf = torch.full((count, 1), UNIFORM_SPHERE_PDF, device=directions.device)
    out = []
    for s in range(directions.shape[1]):
        rays = RaySet(directions[:, s:s + 1], pdf)
        radiance = irradiance[:, s:s + 1] / (4 * math.pi)
        out.append(shader(pixels, rays, radiance) - shader(pixels, rays, torch.zeros_like(radiance)))
    return torch.stack(out, dim=1)


def shade_lights(shader, pixels: PixelInputs, positions: torch.Tensor, lights: list[Light],
                 visibility: list[torch.Tensor | None] | None = None, *, samples: int = DEFAULT_SAMPLES,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The lights' reflected radiance at the pixels (positions (P, 3)): (shadowed, unshadowed), each (P, 3).

    visibility[i] (P,) or (P, S), or None (fully visible), multiplies light i's samples for `shadowed`.
    """
    unshadowed = torch.zeros(len(pixels), 3, device=positions.device)
    shadowed = torch.zeros_like(unshadowed)
    for index, light in enumerate(lights):
        value = contributions(shader, pixels, *light.sample(positions, samples, seed))
        unshadowed += value.sum(1)
        seen = visibility[index] if visibility is not None else None
        if seen is None:
            shadowed += value.sum(1)
        else:
            seen = seen[:, None] if seen.dim() == 1 else seen
            shadowed += (value * seen[..., None]).sum(1)
    return shadowed, unshadowed
