"""Synthetic jobs without Blender: analytic spheres and a ground plane ray-traced into a G-buffer.

Used by the tests, the benchmark and the demo, so the backend is testable on its own. Conventions
match Blender's (Z up, camera looking down -Z, view-axis depth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .camera import camera_rays
from .jobformat import Camera, GBuffer, Job, Options

BUNDLED_HDRI = Path(__file__).parent / "data" / "courtyard_256.exr"


@dataclass
class Material:
    base_color: tuple[float, float, float] = (0.8, 0.8, 0.8)
    metallic: float = 0.0
    roughness: float = 0.5
    specular_level: float = 0.5  # Principled "Specular IOR Level"

    def layers(self) -> tuple[np.ndarray, np.ndarray]:
        """(albedo, F0) as the add-on exports them from a Principled BSDF."""
        base = np.asarray(self.base_color, np.float32)
        albedo = base * (1 - self.metallic)
        f0 = (1 - self.metallic) * 0.08 * self.specular_level + self.metallic * base
        return albedo, np.broadcast_to(f0, (3,)).astype(np.float32)


@dataclass
class Sphere:
    center: tuple[float, float, float]
    radius: float
    material: Material = field(default_factory=Material)


@dataclass
class Plane:
    height: float = 0.0  # the square |x|, |y| <= extent at z = height, normal +Z
    extent: float = 3.0
    material: Material = field(default_factory=Material)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """world_to_camera for a camera at eye looking at target (camera looks down -Z, +Y up)."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    true_up = np.cross(back, right)
    camera_to_world = np.eye(4)
    camera_to_world[:3, 0], camera_to_world[:3, 1], camera_to_world[:3, 2], camera_to_world[:3, 3] = (
        right, true_up, back, eye)
    return np.linalg.inv(camera_to_world)


def perspective(fov_y_degrees: float, aspect: float, near: float = 0.1, far: float = 100.0,
                shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """OpenGL projection as Blender's calc_matrix_camera gives it; shift in NDC units."""
    f = 1 / math.tan(math.radians(fov_y_degrees) / 2)
    return np.array([[f / aspect, 0, shift[0], 0], [0, f, shift[1], 0],
                     [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)], [0, 0, -1, 0]])


def orthographic(half_height: float, aspect: float, near: float = 0.1, far: float = 100.0) -> np.ndarray:
    return np.array([[1 / (half_height * aspect), 0, 0, 0], [0, 1 / half_height, 0, 0],
                     [0, 0, -2 / (far - near), -(far + near) / (far - near)], [0, 0, 0, 1]])


def constant_hdri(value=(1.0, 1.0, 1.0), height: int = 32) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float32), (height, 2 * height, 3)).copy()


def load_bundled_hdri() -> np.ndarray:
    """The small CC0 HDRI shipped for the demo (Poly Haven's courtyard, from Blender's studio lights)."""
    from .exrio import read_exr
    from .jobformat import hdri_from_channels

    return hdri_from_channels(read_exr(BUNDLED_HDRI)[0], BUNDLED_HDRI.name)


def trace(camera: Camera, width: int, height: int, objects: list) -> GBuffer:
    """Ray-trace the objects' G-buffer at pixel centres (binary coverage; AO from a sky-visibility
    estimate of the spheres above the plane; back_depth and next_depth: the second and third surfaces along
    each ray, counting both sides of a sphere and the plane once, as Cycles' surface-counting layers do)."""
    origins, directions = camera_rays(camera, width, height)
    camera_to_world = np.linalg.inv(camera.world_to_camera)
    view_axis = -camera_to_world[:3, 2]
    eye = camera_to_world[:3, 3]
    best = np.full((height, width), np.inf)
    crossings = []  # (H, W) distances where rays cross a surface, inf where they do not
    normal = np.zeros((height, width, 3))
    albedo = np.zeros((height, width, 3), np.float32)
    specular = np.zeros((height, width, 3), np.float32)
    roughness = np.zeros((height, width), np.float32)
    metallic = np.zeros((height, width), np.float32)
    for obj in objects:
        if isinstance(obj, Sphere):
            offset = origins - np.asarray(obj.center)
            b = (offset * directions).sum(-1)
            c = (offset * offset).sum(-1) - obj.radius**2
            disc = b * b - c
            t = -b - np.sqrt(np.maximum(disc, 0))
            hit = (disc > 0) & (t > 0) & (t < best)
            points = origins + t[..., None] * directions
            n = (points - np.asarray(obj.center)) / obj.radius
            crossings += [np.where((disc > 0) & (s > 0), s, np.inf) for s in (t, -b + np.sqrt(np.maximum(disc, 0)))]
        else:
            t = (obj.height - origins[..., 2]) / np.where(np.abs(directions[..., 2]) > 1e-9, directions[..., 2], 1e-9)
            points = origins + t[..., None] * directions
            inside = (np.abs(points[..., 0]) <= obj.extent) & (np.abs(points[..., 1]) <= obj.extent)
            hit = (t > 0) & (t < best) & inside
            n = np.broadcast_to(np.array([0.0, 0.0, 1.0]), origins.shape)
            crossings.append(np.where((t > 0) & inside, t, np.inf))
        best = np.where(hit, t, best)
        normal[hit] = n[hit]
        a, f0 = obj.material.layers()
        albedo[hit], specular[hit] = a, f0
        roughness[hit], metallic[hit] = obj.material.roughness, obj.material.metallic
    mask = np.isfinite(best)
    points = origins + np.where(mask, best, 0)[..., None] * directions
    behind = np.sort(np.stack(crossings + [np.full((height, width), np.inf)] * 2), axis=0)[1:3]  # 2nd, 3rd

    def view_depth(distance):
        """Depth along the view axis of the points at `distance` along the rays, 1e10 (Blender's) where inf."""
        along = (origins + np.where(np.isfinite(distance), distance, 0)[..., None] * directions - eye) @ view_axis
        return np.where(np.isfinite(distance), along, 1e10).astype(np.float32)
    ao = _sky_visibility(points, normal, mask, [o for o in objects if isinstance(o, Sphere)])
    return GBuffer(albedo=albedo, specular=specular, roughness=roughness, normal=normal.astype(np.float32),
                   depth=view_depth(best), ao=ao, mask=mask.astype(np.float32), metallic=metallic,
                   position=np.where(mask[..., None], points, 0).astype(np.float32),
                   back_depth=view_depth(behind[0]), next_depth=view_depth(behind[1]))


def _sky_visibility(points, normal, mask, spheres, samples: int = 32) -> np.ndarray:
    """Fraction of cosine-weighted hemisphere rays that escape the spheres (a simple AO)."""
    rng = np.random.default_rng(0)
    u = rng.random((samples, 2))
    visible = np.zeros(mask.shape, np.float32)
    tangent = np.cross(normal, np.where(np.abs(normal[..., 2:3]) < 0.9, [0, 0, 1.0], [1.0, 0, 0]))
    tangent /= np.maximum(np.linalg.norm(tangent, axis=-1, keepdims=True), 1e-9)
    bitangent = np.cross(normal, tangent)
    for u1, u2 in u:
        r, phi = math.sqrt(u1), 2 * math.pi * u2
        d = r * math.cos(phi) * tangent + r * math.sin(phi) * bitangent + math.sqrt(1 - u1) * normal
        blocked = np.zeros(mask.shape, bool)
        start = points + 1e-4 * normal
        for sphere in spheres:
            offset = start - np.asarray(sphere.center)
            b = (offset * d).sum(-1)
            disc = b * b - ((offset * offset).sum(-1) - sphere.radius**2)
            blocked |= (disc > 0) & (-b - np.sqrt(np.maximum(disc, 0)) > 0)
        visible += ~blocked
    return np.where(mask, visible / samples, 0).astype(np.float32)


def sphere_job(width: int = 64, height: int = 64, material: Material | None = None, hdri: np.ndarray | None = None,
               options: Options | None = None, projection: np.ndarray | None = None) -> Job:
    """One sphere of radius 1 at the origin seen from -Y: the simplest analytic case."""
    world_to_camera = look_at((0.0, -4.0, 0.0), (0.0, 0.0, 0.0))
    projection = perspective(35.0, width / height) if projection is None else projection
    camera = Camera(world_to_camera, projection)
    gbuffer = trace(camera, width, height, [Sphere((0.0, 0.0, 0.0), 1.0, material or Material())])
    return Job(width, height, gbuffer, constant_hdri() if hdri is None else hdri, camera, options or Options())


def demo_scene_job(width: int = 256, height: int = 192, hdri: np.ndarray | None = None,
                   options: Options | None = None) -> Job:
    """Three spheres (rough red plastic, gold, glossy blue) on a grey ground plane."""
    objects = [Plane(0.0, 2.5, Material((0.5, 0.5, 0.5), roughness=0.8)),
               Sphere((-1.1, 0.0, 0.5), 0.5, Material((0.8, 0.1, 0.08), roughness=0.6)),
               Sphere((0.0, 0.4, 0.5), 0.5, Material((1.0, 0.78, 0.34), metallic=1.0, roughness=0.25)),
               Sphere((1.1, 0.0, 0.5), 0.5, Material((0.1, 0.2, 0.7), roughness=0.1))]
    camera = Camera(look_at((0.0, -4.5, 2.2), (0.0, 0.2, 0.35)), perspective(35.0, width / height))
    return Job(width, height, trace(camera, width, height, objects), load_bundled_hdri() if hdri is None else hdri,
               camera, options or Options())
