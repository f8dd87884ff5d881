"""Shadow maps of analytic lights against ray-traced shadows of a sphere above a plane (no Blender)."""

import math

import numpy as np
import pytest
import torch

from backend.exrio import write_exr
from backend.jobformat import Camera, Job, JobError, Options, job_from_bytes, load_job, write_job
from backend.lights import Sun
from backend.renderer import Renderer
from backend.shadowmaps import ShadowMap, parse_shadow, visibility
from backend.synthetic import Plane, Sphere, constant_hdri, look_at, orthographic, perspective, trace

CENTRE, RADIUS = np.array([0.0, 0.0, 1.0]), 0.5  # the sphere; the plane is z = 0, |x|, |y| <= EXTENT
EXTENT = 3.0


def hits(origins, directions):
    """Distance along unit rays to the sphere or the plane, inf where they miss both."""
    offset = origins - CENTRE
    b = (offset * directions).sum(-1)
    disc = b * b - ((offset * offset).sum(-1) - RADIUS**2)
    t_sphere = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    t_sphere = np.where(t_sphere > 1e-9, t_sphere, np.inf)
    dz = np.where(np.abs(directions[..., 2]) > 1e-12, directions[..., 2], 1e-12)
    t_plane = -origins[..., 2] / dz
    ground = origins + t_plane[..., None] * directions
    inside = (np.abs(ground[..., 0]) <= EXTENT) & (np.abs(ground[..., 1]) <= EXTENT) & (t_plane > 1e-9)
    return np.minimum(t_sphere, np.where(inside, t_plane, np.inf))


def render_map(projection, world_to_light, matrix=None, size=256):
    """The map the add-on would render: depths of the analytic scene per texel centre."""
    to_world = np.linalg.inv(world_to_light)
    height, width = (size // 2, size) if projection == "equirectangular" else (size, size)
    col, row = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    if projection == "equirectangular":
        lon, polar = (col / width - 0.5) * 2 * math.pi, row / height * math.pi
        local = np.stack([np.sin(polar) * np.sin(lon), np.cos(polar), -np.sin(polar) * np.cos(lon)], -1)
        directions = local @ to_world[:3, :3].T
        return ShadowMap("light", "shadow_0.exr", projection, world_to_light, None, 0.0,
                         hits(np.broadcast_to(to_world[:3, 3], directions.shape), directions).astype(np.float32))
    ndc = np.stack([col / width * 2 - 1, 1 - row / height * 2], -1)
    unproject = to_world @ np.linalg.inv(matrix)
    near, far = (np.concatenate([ndc, np.full_like(ndc[..., :1], z), np.ones_like(ndc[..., :1])], -1) @ unproject.T
                 for z in (-1.0, 1.0))
    near, far = near[..., :3] / near[..., 3:], far[..., :3] / far[..., 3:]
    directions = (far - near) / np.linalg.norm(far - near, axis=-1, keepdims=True)
    view_axis = -to_world[:3, 2]
    origins = near - (((near - to_world[:3, 3]) @ view_axis) / (directions @ view_axis))[..., None] * directions
    depth = hits(origins, directions) * (directions @ view_axis)  # along the view axis, from the camera's plane
    return ShadowMap("light", "shadow_0.exr", projection, world_to_light, matrix, 0.0, depth.astype(np.float32))


def sun_map(direction, size=256):
    """An orthographic map along `direction` (towards the sun) covering the plane and the sphere."""
    centre = np.array([0.0, 0.0, 0.5])
    up = (0.0, 1.0, 0.0) if abs(direction[2]) > 0.99 else (0.0, 0.0, 1.0)
    world_to_light = look_at(centre + 10 * direction, centre, up)
    return render_map("orthographic", world_to_light, orthographic(EXTENT * 1.5, 1.0, 1.0, 20.0), size)


def ground(step=0.02):
    """Points of the plane on a grid, (N, 3), with their normals."""
    axis = np.arange(-2.5, 2.5, step) + step / 2
    x, y = np.meshgrid(axis, axis)
    points = np.stack([x, y, np.zeros_like(x)], -1).reshape(-1, 3)
    return points, np.broadcast_to([0.0, 0.0, 1.0], points.shape)


def sphere_points(count=4000):
    k = np.arange(count) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / count), k * math.pi * (3 - math.sqrt(5))
    normals = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], -1)
    return CENTRE + RADIUS * normals, normals


def miss_distance(points, towards):
    """Distance from the sphere's centre to each ray point -> light (negative: the sphere is behind), minus
    the radius: < 0 in shadow, > 0 lit."""
    offset = CENTRE - points
    along = (offset * towards).sum(-1)
    return np.where(along > 0, np.linalg.norm(offset - along[..., None] * towards, axis=-1) - RADIUS, np.inf)


def run(shadow, points, normals, size=0.0):
    return visibility(shadow, torch.as_tensor(points, dtype=torch.float32),
                      torch.as_tensor(np.ascontiguousarray(normals), dtype=torch.float32), size).numpy()


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("elevation", [90, 45])
def test_hard_sun_shadow_matches_ray_tracing_without_acne(elevation):
    sun = unit([math.cos(math.radians(elevation)), 0.3 * math.cos(math.radians(elevation)),
                math.sin(math.radians(elevation))])
    shadow = sun_map(sun)
    points, normals = ground()
    lit = run(shadow, points, normals)
    miss = miss_distance(points, sun)
    expected_area = (miss < 0).sum()
    assert abs((lit < 0.5).sum() - expected_area) < 0.1 * expected_area
    assert ((lit < 0.5) == (miss < 0)).mean() > 0.995
    texel = 2 * EXTENT * 1.5 / 256
    assert lit[miss > 3 * texel].min() > 0.99  # no acne on the lit plane (the filter reaches ~2.5 texels)
    assert lit[miss < -3 * texel].max() < 0.01
    on_sphere, sphere_normals = sphere_points()
    facing = sphere_normals @ sun > 0.3
    assert run(shadow, on_sphere[facing], sphere_normals[facing]).min() > 0.99  # nor on the lit sphere


def soft_truth(points, sun, angle, rays=400):
    """The visible fraction of a sun disc of full angle `angle`, by rays over the disc."""
    tangent = unit(np.cross(sun, [0.0, 0.0, 1.0]) if abs(sun[2]) < 0.99 else np.cross(sun, [1.0, 0.0, 0.0]))
    bitangent = np.cross(sun, tangent)
    k = np.arange(rays) + 0.5
    r, phi = np.sqrt(k / rays) * math.tan(angle / 2), k * math.pi * (3 - math.sqrt(5))
    directions = sun + r[:, None] * (np.cos(phi)[:, None] * tangent + np.sin(phi)[:, None] * bitangent)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    return np.mean([miss_distance(points, d) > 0 for d in directions], axis=0)


def penumbra_width(values, step):
    return ((values > 0.05) & (values < 0.95)).sum() * step


@pytest.mark.parametrize("elevation", [90, 45])
def test_soft_sun_penumbra_grows_with_the_angle_and_matches_ray_tracing(elevation):
    sun = unit([math.cos(math.radians(elevation)), 0.0, math.sin(math.radians(elevation))])
    shadow = sun_map(sun)
    step = 0.005
    xs = np.arange(-2.5, 2.5, step)
    line = np.stack([xs, np.zeros_like(xs), np.zeros_like(xs)], -1)  # through the shadow's centre, along x
    normals = np.broadcast_to([0.0, 0.0, 1.0], line.shape)
    widths = []
    for degrees in (3, 10, 20):
        angle = math.radians(degrees)
        lit = run(shadow, line, normals, math.tan(angle / 2))
        truth = soft_truth(line, sun, angle)
        widths.append((penumbra_width(lit, step), penumbra_width(truth, step)))
        assert np.abs(lit - truth).mean() < 0.03, degrees
        assert abs(widths[-1][0] - widths[-1][1]) < 0.35 * widths[-1][1] + 0.05, (degrees, widths[-1])
    assert widths[0][0] < widths[1][0] < widths[2][0]
    points, normals = ground(0.05)
    lit = run(shadow, points, normals, math.tan(math.radians(10) / 2))
    assert lit[miss_distance(points, sun) > 0.4].min() > 0.99  # far from the penumbra: fully lit


def test_point_light_panorama_and_spot_perspective():
    position = np.array([0.8, 0.3, 2.6])
    points, normals = ground()
    miss = miss_distance(points, (position - points) / np.linalg.norm(position - points, axis=-1, keepdims=True))
    rotated = look_at(position, position + [0.3, -0.2, -1.0])  # any orientation of the panorama works
    maps = [render_map("equirectangular", rotated, size=1024),
            render_map("perspective", look_at(position, [0.0, 0.0, 0.0]), perspective(120.0, 1.0, 0.05, 20.0))]
    for shadow in maps:
        lit = run(shadow, points, normals)
        assert abs((lit < 0.5).sum() - (miss < 0).sum()) < 0.1 * (miss < 0).sum(), shadow.projection
        assert lit[miss > 0.05].min() > 0.99, shadow.projection
    soft = run(maps[0], points, normals, 0.2)  # a sphere light: a penumbra around a smaller umbra
    assert (soft < 0.05).sum() < (miss < 0).sum() < (soft < 0.95).sum()


def test_points_off_a_planar_map_or_behind_it_are_lit():
    shadow = render_map("perspective", look_at([0.0, 0.0, 2.6], [0.0, 0.0, 0.0], (0.0, 1.0, 0.0)),
                        perspective(20.0, 1.0, 0.05, 20.0))
    points = np.array([[2.0, 2.0, 0.0], [0.0, 0.0, 5.0]])  # outside the cone; behind the light
    assert (run(shadow, points, np.broadcast_to([0.0, 0.0, 1.0], points.shape)) == 1).all()


def test_parse_shadow(tmp_path):
    depth = np.full((4, 8), 1e10, np.float32)
    write_exr(tmp_path / "shadow_0.exr", {"ViewLayer.Depth.Z": depth, "ViewLayer.Combined.R": depth})

    def read(name):
        from backend.exrio import read_exr

        return read_exr(tmp_path / name)[0]

    entry = {"file": "shadow_0.exr", "projection": "equirectangular", "world_to_light": np.eye(4).tolist(),
             "bias": 0.01}
    shadow = parse_shadow(entry, "point", "Lamp", read)
    assert shadow.depth.shape == (4, 8) and np.isinf(shadow.depth).all() and shadow.bias == 0.01
    for change, message in [({"projection": "orthographic"}, "projection"), ({"matrix": np.eye(4).tolist()}, "matrix"),
                            ({"bias": -1}, "bias"), ({"world_to_light": [[1, 0]]}, "world_to_light"),
                            ({"extra": 1}, "unknown"), ({"file": 3}, "file")]:
        with pytest.raises(JobError, match=f"'Lamp'.*{message}|{message}.*'Lamp'"):
            parse_shadow({**entry, **change}, "point", "Lamp", read)
    with pytest.raises(JobError, match="sun"):
        parse_shadow(entry, "sun", "Lamp", read)
    write_exr(tmp_path / "shadow_0.exr", {"Combined.R": depth})
    with pytest.raises(JobError, match="depth"):
        parse_shadow(entry, "point", "Lamp", read)


def test_a_job_with_a_shadowed_sun_renders_its_shadow_and_round_trips(tmp_path):
    """write_job writes the map beside job.json, load_job and job_from_bytes read it back, and the
    renderer's lights layer is dark exactly where the sphere blocks the sun (ray-traced)."""
    sun = unit([0.5, 0.2, 1.0])
    camera = Camera(look_at((0.0, -4.5, 3.0), (0.0, 0.0, 0.3)), perspective(40.0, 1.0))
    gbuffer = trace(camera, 64, 64, [Plane(0.0, EXTENT), Sphere(tuple(CENTRE), RADIUS)])
    light = Sun(name="Sun", direction=tuple(sun), irradiance=(3.0, 3.0, 3.0), shadow=sun_map(sun))
    job = Job(64, 64, gbuffer, constant_hdri((0.0, 0.0, 0.0)), camera, Options(model="lambert", rays=1, shadows=False),
              lights=[light])
    write_job(job, tmp_path)
    assert (tmp_path / "shadow_0.exr").is_file()
    loaded = load_job(tmp_path)
    np.testing.assert_array_equal(loaded.lights[0].shadow.depth, light.shadow.depth)
    result = Renderer("cpu").render(loaded)
    plane = (gbuffer.mask > 0) & (gbuffer.normal[..., 2] > 0.99)
    shadowed = result.lights[..., 0][plane] < 0.5 * result.unshadowed[..., 0][plane]
    expected = miss_distance(gbuffer.position[plane].astype(np.float64), sun) < 0
    assert 0.03 < expected.mean() and (shadowed == expected).mean() > 0.98
    files = {"shadow_0.exr": (tmp_path / "shadow_0.exr").read_bytes()}
    parts = [(tmp_path / name).read_bytes() for name in ("job.json", "gbuffer.exr", "hdri.exr")]
    assert job_from_bytes(*parts, files=files).lights[0].shadow.projection == "orthographic"
    with pytest.raises(JobError, match="shadow_0.exr.*not uploaded"):
        job_from_bytes(*parts)
    (tmp_path / "shadow_0.exr").unlink()
    with pytest.raises(JobError, match="shadow_0.exr.*does not exist"):
        load_job(tmp_path)


def test_the_surround_map_round_trips_and_must_be_a_panorama(tmp_path):
    """The job's `surround` (the depth all around the camera) is written beside job.json, read back by
    load_job and job_from_bytes, and must be an equirectangular map of a version 2 job."""
    import json

    from backend.shadowmaps import SURROUND

    camera = Camera(look_at((0.0, -4.5, 3.0), (0.0, 0.0, 0.3)), perspective(40.0, 1.0))
    gbuffer = trace(camera, 16, 16, [Plane(0.0, EXTENT)])
    depth = np.linspace(1.0, 9.0, 32, dtype=np.float32).reshape(4, 8)
    surround = ShadowMap(SURROUND, "surround.exr", "equirectangular", np.eye(4), None, 0.0, depth)
    job = Job(16, 16, gbuffer, constant_hdri((1.0, 1.0, 1.0)), camera, surround=surround)
    write_job(job, tmp_path)
    loaded = load_job(tmp_path)
    np.testing.assert_array_equal(loaded.surround.depth, depth)
    parts = [(tmp_path / name).read_bytes() for name in ("job.json", "gbuffer.exr", "hdri.exr")]
    files = {"surround.exr": (tmp_path / "surround.exr").read_bytes()}
    assert job_from_bytes(*parts, files=files).surround.projection == "equirectangular"
    with pytest.raises(JobError, match="surround.exr.*not uploaded"):
        job_from_bytes(*parts)
    data = json.loads((tmp_path / "job.json").read_text())
    for change, message in [({"version": 1}, "'surround' need version 2"),
                            ({"surround": {**data["surround"], "projection": "orthographic"}},
                             "surround.projection .*surround map")]:
        (tmp_path / "job.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(JobError, match=message):
            load_job(tmp_path)
