"""Physics checks of the classical shaders: white furnace, an analytic case, convergence."""

import math

import numpy as np
import pytest
import torch

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
