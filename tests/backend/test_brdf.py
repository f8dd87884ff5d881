"""Physics checks of the classical shaders: white furnace, an analytic case, convergence; GGX's
directional-albedo table and its multiple-scattering energy compensation."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend import brdf
from backend.envmap import EnvironmentMap
from backend.jobformat import Options
from backend.renderer import Renderer
from backend.sampling import make_rays
from backend.shaders import GGX, BlinnPhong, Lambert, PixelInputs
from backend.synthetic import Material, constant_hdri, sphere_job


def pixels_for(view_angles, albedo, specular, roughness, device="cpu"):
    """One pixel per view angle (radians from the normal), normal +Z."""
    count = len(view_angles)
    wo = torch.stack([torch.sin(view_angles), torch.zeros(count), torch.cos(view_angles)], -1)
    normal = torch.tensor([0.0, 0.0, 1.0]).expand(count, 3)
    return PixelInputs(*(t.to(device) for t in (torch.full((count, 3), albedo), torch.full((count, 3), specular),
                                                  torch.full((count, 1), roughness), normal, wo)))


def furnace(shader, pixels, rays=1 << 15, device="cpu"):
    """Reflected radiance under a constant unit environment, by stratified sphere sampling."""
    ray_set = make_rays("stratified", rays, 0, device=device)
    radiance = torch.ones(1, rays, 3, device=device)
    return shader.to(device)(pixels, ray_set, radiance)


ANGLES = torch.linspace(0, math.radians(85), 9)


def test_white_furnace_lambert(device):
    out = furnace(Lambert(), pixels_for(ANGLES, 1.0, 0.0, 0.5, device), device=device)
    torch.testing.assert_close(out, torch.ones_like(out), atol=5e-3, rtol=0)


@pytest.mark.parametrize("shader", [GGX(), BlinnPhong()], ids=["ggx", "blinn-phong"])
@pytest.mark.parametrize("roughness", [0.2, 0.5, 1.0])
def test_specular_never_exceeds_one(device, shader, roughness):
    """A perfect white specular layer (F0 = 1, no diffuse) reflects at most what arrives."""
    out = furnace(shader, pixels_for(ANGLES, 0.0, 1.0, roughness, device), device=device)
    assert out.max().item() <= 1.0 + 1e-2, out[:, 0]
    if roughness <= 0.5:  # single scattering loses little energy at normal view unless rough
        assert out[0, 0].item() > 0.9


@pytest.mark.parametrize("shader", [GGX(), BlinnPhong()], ids=["ggx", "blinn-phong"])
def test_diffuse_plus_specular_conserves_energy(device, shader):
    out = furnace(shader, pixels_for(ANGLES, 1.0, 0.04, 0.5, device), device=device)
    assert out.max().item() <= 1.0 + 1e-2


class SingleScatterGGX(GGX):
    """GGX without the multiple-scattering compensation."""

    def specular_lobe(self, pixels, g):
        return brdf.ggx_single_scatter(pixels.specular, pixels.roughness, g)


def lobe_furnace(shader, pixels, rays=1 << 14):
    """The furnace with mis rays (cosine and GGX-lobe halves): narrow lobes are resolved too."""
    ray_set = make_rays("mis", rays, 0, normals=pixels.normal, wo=pixels.wo, roughness=pixels.roughness)
    return shader(pixels, ray_set, torch.ones(1, rays, 3))


FURNACE_ANGLES = torch.tensor([0.0, 30.0, 60.0, 75.0, 85.0]).deg2rad()
FURNACE_ROUGHNESS = [0.2, 0.5, 0.7, 1.0]  # none of them a node of the table but 1: its interpolation is in the test


@pytest.mark.parametrize("roughness", FURNACE_ROUGHNESS)
def test_compensated_ggx_white_furnace(roughness):
    """A white metal (F0 = 1) with the multiple-scattering compensation reflects all that arrives (Cycles'
    Multiscatter GGX), by Monte Carlo over the lobe rather than through the table."""
    out = lobe_furnace(GGX(), pixels_for(FURNACE_ANGLES, 0.0, 1.0, roughness))[:, 0]
    torch.testing.assert_close(out, torch.ones_like(out), atol=0.02, rtol=0)


@pytest.mark.parametrize("roughness", FURNACE_ROUGHNESS)
def test_single_scatter_albedo_is_the_table(roughness):
    """The table's E (F0 = 1) and E5 (F0 = 0) are the single-scatter lobe's directional albedos: Monte Carlo
    against the bilinear lookup."""
    pixels = pixels_for(FURNACE_ANGLES, 0.0, 1.0, roughness)
    e, e5, _ = brdf.ggx_albedo(pixels.roughness, pixels.wo[:, 2:])
    white = lobe_furnace(SingleScatterGGX(), pixels)[:, 0]
    black = lobe_furnace(SingleScatterGGX(), pixels_for(FURNACE_ANGLES, 0.0, 0.0, roughness))[:, 0]
    torch.testing.assert_close(white, e[:, 0], atol=0.01, rtol=0)
    torch.testing.assert_close(black, e5[:, 0], atol=0.005, rtol=0)


def test_single_scatter_loses_energy():
    """At normal view a white single-scattering lobe reflects less the rougher it is: the light that bounces
    between microfacets more than once is lost, 69% of it at roughness 1."""
    up = torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3)
    pixels = PixelInputs(torch.zeros(4, 3), torch.ones(4, 3), torch.tensor(FURNACE_ROUGHNESS)[:, None], up, up)
    white = lobe_furnace(SingleScatterGGX(), pixels)[:, 0]
    torch.testing.assert_close(white, torch.tensor([0.9985, 0.9153, 0.6975, 0.3068]), atol=0.01, rtol=0)
    compensated = lobe_furnace(GGX(), pixels)[:, 0]
    torch.testing.assert_close(compensated, torch.ones(4), atol=0.01, rtol=0)


# Cycles' own tables (ggx_E, ggx_Eavg; its Monte Carlo, 2^23 and 2^26 samples a node): (roughness, n.o) -> E
CYCLES_E = {(1.0, 1.0): 0.306853, (22 / 31, 1.0): 0.684249, (8 / 31, 1.0): 0.995072, (15 / 31, 15 / 31): 0.866586,
            (1.0, 3 / 31): 0.765057, (10 / 31, 3 / 31): 0.884058, (3 / 31, 3 / 31): 0.994519, (1.0, 0.0): 0.999079}
CYCLES_E_AVG = {1.0: 0.409137, 22 / 31: 0.697631, 15 / 31: 0.893209, 8 / 31: 0.985805}


def test_table_matches_cycles():
    keys = list(CYCLES_E)
    roughness = torch.tensor([[r] for r, _ in keys])
    e, _, _ = brdf.ggx_albedo(roughness, torch.tensor([[mu] for _, mu in keys]))
    torch.testing.assert_close(e[:, 0], torch.tensor(list(CYCLES_E.values())), atol=5e-4, rtol=0)
    _, _, average = brdf.ggx_albedo(torch.tensor([[r] for r in CYCLES_E_AVG]), torch.ones(len(CYCLES_E_AVG), 1))
    torch.testing.assert_close(average[:, 0], torch.tensor(list(CYCLES_E_AVG.values())), atol=5e-4, rtol=0)


def test_write_albedo_table_reproduces_the_stored_table(tmp_path):
    """The shipped table is what write_albedo_table computes (here with 48 x 48 points a node, not 128 x 128)."""
    path = tmp_path / "albedo.safetensors"
    brdf.write_albedo_table(path, samples=48)
    small, stored = load_file(str(path)), load_file(str(brdf.ALBEDO_TABLE))
    assert small.keys() == stored.keys() == {"E", "E5", "E_avg"}
    assert stored["E"].shape == stored["E5"].shape == (brdf.ALBEDO_TABLE_SIZE,) * 2
    for name, tolerance in (("E", 2e-3), ("E5", 1e-3), ("E_avg", 1e-3)):
        torch.testing.assert_close(small[name], stored[name], atol=tolerance, rtol=0, msg=name)


def test_compensation_is_kulla_conty():
    """F0 = 1: 1 / E. Coloured F0: 1 + F_ms (1 - E) / E, F_ms = F_avg E_avg / (1 - F_avg (1 - E_avg))."""
    roughness, mu = torch.tensor([[0.7], [1.0], [0.3]]), torch.tensor([[1.0], [0.4], [0.1]])
    e, _, average = brdf.ggx_albedo(roughness, mu)
    torch.testing.assert_close(brdf.ggx_energy_compensation(torch.ones(3, 3), roughness, mu), (1 / e).expand(3, 3))
    f0 = torch.tensor([0.9, 0.6, 0.04]).expand(3, 3)
    f_avg = f0 + (1 - f0) / 21
    expected = 1 + f_avg * average / (1 - f_avg * (1 - average)) * (1 - e) / e
    torch.testing.assert_close(brdf.ggx_energy_compensation(f0, roughness, mu), expected)
    assert (brdf.ggx_specular_albedo(f0, roughness, mu) <= 1).all()


@pytest.mark.parametrize("roughness", [0.3, 0.7, 1.0])
def test_diffuse_layering_by_the_specular_albedo(roughness):
    """diffuse_weight with roughness: 1 - the compensated lobe's albedo (Cycles' layering), so a white base
    under it reflects exactly all that arrives, by Monte Carlo; without roughness it is 1 - F(n.o),
    unchanged, which leaves far less to the base at grazing views; and that is the smooth limit."""
    pixels = pixels_for(FURNACE_ANGLES, 1.0, 0.04, roughness)
    g = brdf.geometry(pixels.normal, pixels.wo, pixels.normal[:, None])
    n_dot_o = g.n_dot_o[:, 0]
    layered = brdf.diffuse_weight(pixels.specular, g, pixels.roughness)[:, 0]
    torch.testing.assert_close(layered, 1 - brdf.ggx_specular_albedo(pixels.specular, pixels.roughness, n_dot_o))
    specular = lobe_furnace(GGX(), pixels_for(FURNACE_ANGLES, 0.0, 0.04, roughness))
    torch.testing.assert_close(specular + layered, torch.ones_like(specular), atol=0.01, rtol=0)
    smooth = brdf.diffuse_weight(pixels.specular, g)[:, 0]
    torch.testing.assert_close(smooth, 1 - brdf.schlick_fresnel(pixels.specular, n_dot_o))
    assert layered[-1, 0] > smooth[-1, 0] + 0.2  # 85 degrees: Schlick's F(n.o) ~ 0.6 is no rough lobe's albedo
    smooth_lobe = brdf.diffuse_weight_at(pixels.specular, n_dot_o, torch.zeros_like(pixels.roughness))
    torch.testing.assert_close(smooth_lobe, smooth, atol=2e-3, rtol=0)


def test_table_loaded_under_inference_mode_serves_autograd():
    """The table is cached on first use, which is often in the renderer's inference mode; training, later,
    must still be able to differentiate through the compensation."""
    brdf._load_albedo_tables.cache_clear()
    roughness = torch.tensor([[0.6]])
    with torch.inference_mode():
        brdf.ggx_energy_compensation(torch.ones(1, 3), roughness, torch.tensor([[0.5]]))
    roughness.requires_grad_(True)
    brdf.ggx_energy_compensation(torch.full((1, 3), 0.5), roughness, torch.tensor([[0.5]])).sum().backward()
    assert roughness.grad is not None and roughness.grad.abs().item() > 0


def test_lambert_under_one_bright_texel_matches_closed_form():
    """A single lit texel of solid angle dw at direction l: L = albedo / pi * E * cos(theta_l) * dw."""
    height = 64
    image = np.zeros((height, 2 * height, 3), np.float32)
    row, col = 20, 37
    image[row, col] = 1000.0
    texel_solid_angle = (2 * math.pi / (2 * height)) * (
        math.cos(math.pi * row / height) - math.cos(math.pi * (row + 1) / height))
    env = EnvironmentMap(image)
    pixels = pixels_for(torch.tensor([0.3]), 0.6, 0.0, 0.5)
    rays = make_rays("importance", 4096, 0, envmap=env)
    out = Lambert()(pixels, rays, env.lookup(rays.directions))
    # the exact integral of the bilinear-filtered texel, by dense uniform quadrature of the same map
    dense = make_rays("stratified", 1 << 20, 1)
    reference = Lambert()(pixels, dense, env.lookup(dense.directions))
    torch.testing.assert_close(out, reference, rtol=0.02, atol=0)
    # and the closed form for a point light of the texel's power at its centre
    theta = math.pi * (row + 0.5) / height
    closed = 0.6 / math.pi * 1000.0 * texel_solid_angle * math.cos(theta)
    assert abs(out[0, 0].item() - closed) / closed < 0.05


def test_error_shrinks_as_rays_grow():
    job = sphere_job(24, 24, Material((0.7, 0.7, 0.7), roughness=0.4),
                     hdri=np.random.default_rng(0).random((32, 64, 3)).astype(np.float32) ** 3 * 5)
    renderer = Renderer("cpu")
    reference = renderer.render(_with(job, rays=4096, seed=99)).shaded
    errors = [np.abs(renderer.render(_with(job, rays=n, seed=1)).shaded - reference).mean() for n in (16, 128, 1024)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 4


def _with(job, **options):
    job.options = Options.from_dict({"model": "ggx", "sampling": "uniform", **options})
    return job


def test_all_samplings_agree_on_lambert():
    """Every ray set is an unbiased estimator of the same integral."""
    job = sphere_job(16, 16, Material((0.9, 0.5, 0.2)), hdri=constant_hdri((0.5, 1.0, 2.0)))
    renderer = Renderer("cpu")
    images = {s: renderer.render(_with(job, model="lambert", sampling=s, rays=2048)).shaded
              for s in ("uniform", "stratified", "importance", "cosine", "mis")}
    fg = job.gbuffer.foreground
    expected = np.array([0.9 * 0.5, 0.5 * 1.0, 0.2 * 2.0])  # albedo x constant radiance
    for sampling, image in images.items():
        np.testing.assert_allclose(image[fg].mean(0), expected, rtol=0.03, err_msg=sampling)


def test_mis_is_unbiased_and_beats_light_sampling_on_glossy():
    """A glossy GGX sphere under a textured HDRI: mis converges to what the other ray sets give, and at
    equal rays it is much closer to that than light sampling alone (which rarely hits a narrow lobe)."""
    hdri = np.random.default_rng(3).random((32, 64, 3)).astype(np.float32) ** 4 * 8
    job = sphere_job(24, 24, Material((0.9, 0.8, 0.5), metallic=1.0, roughness=0.15), hdri=hdri)
    renderer = Renderer("cpu")
    fg = job.gbuffer.foreground
    def converged(samplings):
        return np.mean([renderer.render(_with(job, sampling=s, rays=4096, seed=seed)).shaded
                        for s in samplings for seed in (11, 12, 13, 14)], axis=0)

    reference = converged(["mis"])
    others = converged(["importance", "stratified", "cosine"])  # noisier: ~1.5% on this mean
    np.testing.assert_allclose(reference[fg].mean(0), others[fg].mean(0), rtol=0.05)
    error = {s: np.abs(renderer.render(_with(job, sampling=s, rays=64, seed=1)).shaded - reference)[fg].mean()
             for s in ("importance", "mis")}
    assert error["mis"] < 0.7 * error["importance"], error
