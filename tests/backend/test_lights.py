"""Analytic lights: closed forms on planes, Cycles' spot and spread, parsing, the renderer and the service."""

import json
import math
import time

import numpy as np
import pytest
import torch

from backend.fastpath import FastShader
from backend.jobformat import JobError, Options, job_from_bytes, load_job, parse_job_json, write_job
from backend.lights import AreaLight, PointLight, SpotLight, Sun, parse_lights, shade_lights
from backend.renderer import Renderer
from backend.service.jobs import DONE, JobManager
from backend.shaders import GGX, Lambert, PaperShader, PixelInputs
from backend.synthetic import constant_hdri, sphere_job

ALBEDO = torch.tensor([0.2, 0.5, 0.8])


def plane(count=7, extent=2.0, normal=(0.0, 0.0, 1.0), wo=(0.0, 0.0, 1.0), albedo=ALBEDO, specular=0.0,
          roughness=1.0):
    """A count x count grid of pixels on the plane z = 0: (pixels, positions)."""
    x = torch.linspace(-extent, extent, count)
    grid = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2)
    positions = torch.cat([grid, torch.zeros(len(grid), 1)], -1)
    size = len(positions)

    def rows(value, width):
        return torch.as_tensor(value, dtype=torch.float32).expand(size, width).clone()

    pixels = PixelInputs(albedo=rows(albedo, 3), specular=rows(specular, 3), roughness=rows(roughness, 1),
                         normal=rows(normal, 3), wo=rows(wo, 3))
    return pixels, positions


def lit(light, pixels, positions, shader=None, **kwargs):
    return shade_lights(shader or Lambert(), pixels, positions, [light], **kwargs)[1]


def unit(*v):
    v = np.asarray(v, float)
    return tuple(v / np.linalg.norm(v))


def test_point_light_on_a_lambert_plane_is_analytic():
    pixels, positions = plane()
    centre, intensity = torch.tensor([0.3, -0.2, 1.5]), torch.tensor([2.0, 3.0, 4.0])
    got = lit(PointLight(position=tuple(centre.tolist()), intensity=tuple(intensity.tolist())), pixels, positions)
    offset = centre - positions
    d = offset.norm(dim=-1, keepdim=True)
    expected = ALBEDO / math.pi * intensity * (offset[:, 2:] / d) / d**2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_a_sphere_light_gives_a_surface_facing_it_exactly_i_over_d2_and_nothing_inside():
    light = PointLight(position=(0.0, 0.0, 2.0), intensity=(5.0, 5.0, 5.0), radius=0.8)
    pixels, positions = plane(count=1, extent=0.0)
    torch.testing.assert_close(lit(light, pixels, positions), ALBEDO[None] / math.pi * 5 / 4, rtol=1e-5, atol=0)
    inside = torch.tensor([[0.0, 0.0, 2.5]])
    assert (lit(light, pixels, inside) == 0).all()


@pytest.mark.parametrize("height", [2.0, 0.3])  # outside and inside the radius
def test_soft_falloff_gives_i_cos_over_d2_plus_r2_as_cycles(height):
    """Blender's Soft Falloff (the default of point and spot lights): E = I cos / (d^2 + r^2), a disc
    facing the surface, with no cut-off inside the radius; far away it is the point light again."""
    light = PointLight(position=(0.0, 0.0, height), intensity=(5.0, 5.0, 5.0), radius=0.8, soft_falloff=True)
    pixels, positions = plane(count=1, extent=0.0)
    expected = ALBEDO[None] / math.pi * 5 / (height**2 + 0.64)
    torch.testing.assert_close(lit(light, pixels, positions), expected, rtol=1e-5, atol=0)
    far = torch.tensor([[0.0, 0.0, -200.0]])
    expected = ALBEDO[None] / math.pi * 5 / (height + 200) ** 2
    torch.testing.assert_close(lit(light, pixels, far, samples=64), expected, rtol=1e-3, atol=0)


def test_a_soft_sun_matches_a_sharp_one_and_keeps_its_irradiance():
    direction = unit(0.4, -0.3, 1.0)
    sharp = Sun(direction=direction, irradiance=(3.0, 2.0, 1.0))
    soft = Sun(direction=direction, irradiance=(3.0, 2.0, 1.0), angle=math.radians(0.5))
    for normal in [(0.0, 0.0, 1.0), unit(1, 0, 0.3), unit(-1, 1, 1)]:
        pixels, positions = plane(count=2, normal=normal)
        a, b = lit(sharp, pixels, positions), lit(soft, pixels, positions)
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-6)
    facing, positions = plane(count=1, normal=direction)  # faces the sun: exactly E albedo / pi
    wide = Sun(direction=direction, irradiance=(3.0, 2.0, 1.0), angle=0.6)
    torch.testing.assert_close(lit(wide, facing, positions), ALBEDO[None] / math.pi * torch.tensor([3.0, 2.0, 1.0]),
                               rtol=1e-5, atol=0)


def test_lambert_under_a_sun_is_albedo_e_cos_over_pi():
    """Energy: no gain and no loss for any normal; back-facing normals get nothing."""
    direction = torch.tensor(unit(0.2, 0.5, 1.0), dtype=torch.float32)
    angles = torch.linspace(0, math.pi, 9)
    normals = torch.stack([torch.sin(angles), torch.zeros(9), torch.cos(angles)], -1)
    pixels = PixelInputs(albedo=ALBEDO.expand(9, 3), specular=torch.zeros(9, 3), roughness=torch.ones(9, 1),
                         normal=normals, wo=normals)
    got = lit(Sun(direction=tuple(direction.tolist()), irradiance=(2.0, 2.0, 2.0)), pixels, torch.zeros(9, 3))
    cos = (normals @ direction).clamp(min=0)[:, None]
    torch.testing.assert_close(got, ALBEDO * 2 / math.pi * cos, rtol=1e-5, atol=1e-7)


def square(distance, size, radiance=1.0, normal=(0.0, 0.0, -1.0), shape="rectangle", spread=math.pi):
    return AreaLight(position=(0.0, 0.0, distance), axes=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), normal=normal,
                     size=(size, size), radiance=(radiance,) * 3, shape=shape, spread=spread)


def test_a_far_square_area_light_is_a_point_light_of_intensity_l_a_cos():
    pixels, positions = plane(count=5, extent=3.0)
    normal = unit(0.3, 0.0, -1.0)
    light = square(20.0, 0.4, radiance=50.0, normal=normal)
    got = lit(light, pixels, positions)
    offset = torch.tensor(light.position) - positions
    d = offset.norm(dim=-1, keepdim=True)
    cos_light = -(offset / d) @ torch.tensor(normal, dtype=torch.float32)
    expected = ALBEDO / math.pi * (50.0 * 0.16 * cos_light[:, None]) * (offset[:, 2:] / d) / d**2
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("samples,tolerance", [(16, 0.02), (256, 2e-3)])
def test_a_disc_light_on_its_axis_matches_the_closed_form(samples, tolerance):
    """E = pi L r^2 / (r^2 + h^2) below the centre of a Lambertian disc of radius r at height h."""
    r, h, radiance = 1.0, 1.5, 2.0
    pixels, positions = plane(count=1, extent=0.0, albedo=(1.0, 1.0, 1.0))
    got = lit(square(h, 2 * r, radiance, shape="ellipse"), pixels, positions, samples=samples)[0, 0] * math.pi
    expected = math.pi * radiance * r * r / (r * r + h * h)
    assert abs(got.item() / expected - 1) < tolerance


def test_area_lights_emit_on_their_normals_side_only():
    pixels, positions = plane(count=3)
    assert (lit(square(2.0, 1.0, normal=(0.0, 0.0, 1.0)), pixels, positions) == 0).all()
    assert (lit(square(2.0, 1.0), pixels, positions) > 0).all()


def test_spread_narrows_the_beam_and_keeps_the_power():
    """Cycles' spread: less light off the axis, more on it; spread 0 lights exactly the footprint with pi L."""
    pixels, positions = plane(count=9, extent=4.0, albedo=(1.0, 1.0, 1.0))
    wide = lit(square(1.0, 1.0), pixels, positions, samples=256)[:, 0]
    narrow = lit(square(1.0, 1.0, spread=math.radians(60)), pixels, positions, samples=256)[:, 0]
    centre = len(wide) // 2
    assert narrow[centre] > 1.2 * wide[centre] and narrow[0] < 0.5 * wide[0]
    assert abs(narrow.sum() / wide.sum() - 1) < 0.15  # the power on the plane, coarsely
    beam = lit(square(1.0, 1.0, radiance=2.0, spread=0.0), pixels, positions)[:, 0] * math.pi
    footprint = (positions[:, :2].abs() <= 0.5).all(-1)
    torch.testing.assert_close(beam, torch.where(footprint, 2 * math.pi, 0.0), rtol=1e-6, atol=0)


def test_spot_is_zero_outside_full_inside_and_monotone_in_the_blend():
    size, blend = math.radians(60), 0.4
    spot = SpotLight(position=(0.0, 0.0, 1.0), intensity=(1.0, 1.0, 1.0), direction=(0.0, 0.0, -1.0),
                     spot_size=size, spot_blend=blend)
    point = PointLight(position=(0.0, 0.0, 1.0), intensity=(1.0, 1.0, 1.0))
    angles = torch.linspace(0, math.radians(50), 101)
    positions = torch.stack([torch.tan(angles), torch.zeros(101), torch.zeros(101)], -1)
    pixels, _ = plane(count=1)
    pixels = PixelInputs(*(t.expand(101, -1) for t in (pixels.albedo, pixels.specular, pixels.roughness,
                                                      pixels.normal, pixels.wo)))
    ratio = (lit(spot, pixels, positions) / lit(point, pixels, positions))[:, 0]
    cos_half = math.cos(size / 2)
    inner = math.acos(cos_half + (1 - cos_half) * blend)  # smoothstep reaches 1 here
    assert (ratio[angles > size / 2 + 1e-4] == 0).all() and (ratio[angles < size / 2 - 1e-3] > 0).all()
    torch.testing.assert_close(ratio[angles <= inner - 1e-3], torch.ones(int((angles <= inner - 1e-3).sum())))
    assert (ratio.diff() <= 1e-6).all()
    assert ((ratio > 0) & (ratio < 1)).sum() > 10  # the blend region is resolved


def test_a_ggx_highlight_from_the_sun_lands_at_the_mirror_direction():
    """Normals up, views sweeping the xz plane: the brightest view is the sun's mirror image."""
    angles = torch.deg2rad(torch.arange(-60.0, 61.0))
    wo = torch.stack([torch.sin(angles), torch.zeros_like(angles), torch.cos(angles)], -1)
    count = len(angles)
    pixels = PixelInputs(albedo=torch.zeros(count, 3), specular=torch.full((count, 3), 0.04),
                         roughness=torch.full((count, 1), 0.15),
                         normal=torch.tensor([[0.0, 0.0, 1.0]]).expand(count, 3), wo=wo)
    sun = Sun(direction=unit(math.sin(math.radians(25)), 0, math.cos(math.radians(25))), irradiance=(1.0,) * 3)
    reference = lit(sun, pixels, torch.zeros(count, 3), GGX())
    fast = lit(sun, pixels, torch.zeros(count, 3), FastShader(GGX()))
    torch.testing.assert_close(fast, reference, rtol=1e-3, atol=1e-6)  # float32 at a sharp peak
    assert math.isclose(math.degrees(angles[reference[:, 1].argmax()].item()), -25.0, abs_tol=0.5)


def test_visibility_multiplies_the_shadowed_part_only():
    pixels, positions = plane(count=2)
    light = AreaLight(**{**vars(square(2.0, 1.0)), "shadow": {"kind": "map"}})
    seen = torch.zeros(len(positions), 16)
    seen[:, :8] = 1
    shadowed, unshadowed = shade_lights(Lambert(), pixels, positions, [light, light], [seen, None])
    one = lit(light, pixels, positions, samples=16)
    assert (shadowed < unshadowed).all() and (shadowed > one).all()
    torch.testing.assert_close(unshadowed, 2 * one)
    half = shade_lights(Lambert(), pixels, positions, [light], [torch.full((len(positions),), 0.5)])[0]
    torch.testing.assert_close(half, one / 2)


def test_the_paper_shader_adds_nothing_for_a_dark_light():
    torch.manual_seed(0)
    shader = PaperShader().eval()
    pixels, positions = plane(count=2)
    with torch.inference_mode():
        dark = lit(Sun(direction=(0.0, 0.0, 1.0), irradiance=(0.0, 0.0, 0.0)), pixels, positions, shader)
        bright = lit(square(2.0, 1.0), pixels, positions, shader, samples=4)
    assert (dark == 0).all() and torch.isfinite(bright).all() and (bright != 0).any()


# -- parsing ------------------------------------------------------------------------------------------

LIGHTS = [
    {"type": "sun", "name": "key", "direction": [0, 0, 1], "irradiance": [3, 3, 3], "angle": 0.01},
    {"type": "point", "name": "bulb", "position": [1, 2, 3], "intensity": [10, 9, 8], "radius": 0.1,
     "soft_falloff": True, "shadow": {"resolution": 512}},
    {"type": "spot", "name": "spot", "position": [0, 0, 3], "intensity": [5, 5, 5], "direction": [0, 0, -1],
     "spot_size": 0.8, "spot_blend": 0.15, "radius": 0, "soft_falloff": False},
    {"type": "area", "name": "box", "position": [0, 0, 2], "axes": [[1, 0, 0], [0, 1, 0]], "normal": [0, 0, -1],
     "size": [1, 0.5], "shape": "ellipse", "radiance": [2, 2, 2], "spread": 1.0},
]


def test_parsed_lights_are_typed_and_write_back_as_they_came():
    lights = parse_lights(LIGHTS)
    assert [type(light) for light in lights] == [Sun, PointLight, SpotLight, AreaLight]
    assert lights[1].shadow == {"resolution": 512} and lights[0].shadow is None
    assert [light.to_dict() for light in lights] == LIGHTS
    assert parse_lights([{"type": "point", "position": [0, 0, 1], "intensity": [1, 1, 1]}])[0].radius == 0


@pytest.mark.parametrize("edit,message", [
    ({"type": "laser"}, "lights[0].type must be one of"),
    ({"colour": [1, 1, 1]}, "unknown key(s) ['colour']"),
    ({"direction": [0, 0, 2]}, "lights[0] ('key').direction must be a unit vector"),
    ({"irradiance": [1, -1, 1]}, "lights[0] ('key').irradiance must lie in [0, inf]"),
    ({"irradiance": [1, float("nan"), 1]}, ".irradiance must be a finite number"),
    ({"angle": 4.0}, ".angle must lie in [0, 3.14"),
    ({"direction": None}, ".direction must be a list of 3 numbers"),
    ({"name": 3}, "lights[0].name must be a string"),
    ({"shadow": [1]}, ".shadow must be an object"),
])
def test_bad_suns_name_the_light_and_the_field(edit, message):
    with pytest.raises(ValueError) as error:
        parse_lights([{**LIGHTS[0], **edit}])
    assert message in str(error.value)


@pytest.mark.parametrize("index,edit,message", [
    (3, {"size": [1, 0]}, "lights[0] ('box').size[1] must lie in (0, inf]"),
    (3, {"shape": "star"}, ".shape must be one of"),
    (3, {"normal": [0, 1, 0]}, "axes and normal must be orthogonal, axes[1].normal"),
    (2, {"spot_blend": 1.5}, "('spot').spot_blend must lie in [0, 1]"),
    (1, {"radius": -1}, "('bulb').radius must lie in [0, inf]"),
    (1, {"intensity": [1, 1]}, ".intensity must be a list of 3 numbers"),
])
def test_bad_lamps_name_the_light_and_the_field(index, edit, message):
    with pytest.raises(ValueError) as error:
        parse_lights([{**LIGHTS[index], **edit}])
    assert message in str(error.value)
    missing = {k: v for k, v in LIGHTS[index].items() if k != "position"}
    with pytest.raises(ValueError, match=r"needs \['position'\]"):
        parse_lights([missing])


def _job_json(job, **changes):
    folder_data = {"format": "pbnds-job", "version": 2, "width": job.width, "height": job.height,
                   "gbuffer": "gbuffer.exr", "hdri": "hdri.exr", "camera": job.camera.to_dict()}
    return {**folder_data, **changes}


def test_job_json_versions_and_light_errors_are_job_errors():
    job = sphere_job(8, 8)
    assert parse_job_json(_job_json(job, version=1))[3] == []
    assert len(parse_job_json(_job_json(job, lights=LIGHTS))[3]) == 4
    with pytest.raises(JobError, match="'lights' needs version 2"):
        parse_job_json(_job_json(job, version=1, lights=LIGHTS))
    with pytest.raises(JobError, match=r"job.json: lights\[0\].type"):
        parse_job_json(_job_json(job, lights=[{"type": "laser"}]))
    with pytest.raises(JobError, match="unknown format version 3"):
        parse_job_json(_job_json(job, version=3))


def test_a_job_round_trip_keeps_the_lights_and_version_1_still_loads(tmp_path):
    job = sphere_job(12, 8)
    # without the placeholder shadow: a job's shadow maps are files (tests/backend/test_shadowmaps.py)
    job.lights = parse_lights([{k: v for k, v in entry.items() if k != "shadow"} for entry in LIGHTS])
    path = write_job(job, tmp_path)
    assert json.loads(path.read_text())["version"] == 2
    assert load_job(tmp_path).lights == job.lights
    data = json.loads(path.read_text())
    del data["lights"]
    path.write_text(json.dumps({**data, "version": 1}))
    assert load_job(tmp_path).lights == []


# -- the renderer and the service ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lit_job():
    job = sphere_job(24, 16, hdri=constant_hdri((0.0, 0.0, 0.0), height=8), options=Options(rays=8))
    job.lights = [Sun(direction=unit(-1, -2, 1), irradiance=(2.0, 1.5, 1.0)),
                  PointLight(position=(1.5, -2.0, 1.0), intensity=(4.0, 4.0, 4.0), radius=0.2)]
    return job


@pytest.mark.parametrize("model", ["lambert", "default"])
def test_under_a_black_hdri_the_image_is_exactly_the_lights(lit_job, model):
    options = Options(model=model, rays=8, sampling="stratified")
    renderer = Renderer("cpu")
    prepared = renderer.prepare(lit_job)
    result = renderer.shade(prepared, lit_job.hdri, options, lights=lit_job.lights)
    expected = torch.zeros(prepared.height * prepared.width, 3)
    with torch.inference_mode():
        expected[prepared.index] = shade_lights(renderer.shader_for(model), prepared.pixels, prepared.positions,
                                                lit_job.lights)[0]
    expected = expected.view(prepared.height, prepared.width, 3).numpy()
    assert expected.max() > 0.1
    np.testing.assert_array_equal(result.lights, expected)
    # the shadow net's bounce light from a black image is not exactly 0 (GroupNorm), about 2e-7
    np.testing.assert_allclose(result.shaded, expected, rtol=0, atol=0 if model == "lambert" else 1e-6)
    np.testing.assert_array_equal(result.unshadowed, expected)
    relit = renderer.relight(renderer.relight_cache(prepared, options), lit_job.hdri, 0.7, options=options,
                             lights=lit_job.lights)
    np.testing.assert_allclose(relit.shaded, expected, rtol=1e-6, atol=1e-7)  # lights do not rotate with the HDRI
    hdri_only = renderer.shade(prepared, constant_hdri((0.5, 0.5, 0.5), height=8), options)
    both = renderer.shade(prepared, constant_hdri((0.5, 0.5, 0.5), height=8), options, lights=lit_job.lights)
    np.testing.assert_allclose(both.shaded, hdri_only.shaded + expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both.shadow, hdri_only.shadow)


def test_the_service_keeps_a_jobs_lights_for_its_relights(lit_job, tmp_path):
    path = write_job(lit_job, tmp_path)
    uploaded = job_from_bytes(path.read_bytes(), (tmp_path / "gbuffer.exr").read_bytes(),
                              (tmp_path / "hdri.exr").read_bytes())
    assert uploaded.lights == lit_job.lights
    manager = JobManager(Renderer("cpu"))
    manager.start()
    try:
        options = Options(model="lambert", rays=8, sampling="stratified")
        uploaded.options = options
        source = _wait(manager, manager.submit(uploaded, decode_ms=0))
        relit = _wait(manager, manager.relight(source, lit_job.hdri, options, decode_ms=0, rotation=0.3))
        assert source.status == relit.status == DONE, (source.error, relit.error)
        assert source.result.lights.max() > 0.1
        np.testing.assert_allclose(relit.result.lights, source.result.lights, rtol=1e-6, atol=1e-7)
    finally:
        manager.stop()


def _wait(manager, record, timeout=120):
    deadline = time.monotonic() + timeout
    while manager.get(record.id).status not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return manager.get(record.id)
