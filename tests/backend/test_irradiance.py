"""The HDRI's irradiance table (EnvironmentMap.irradiance) and the renderer's Lambertian control variate."""

import math

import numpy as np
import pytest
import torch

from backend.envmap import EnvironmentMap
from backend.jobformat import Options
from backend.renderer import Renderer
from backend.sampling import make_rays
from backend.synthetic import Material, constant_hdri, load_bundled_hdri, sphere_job


def normals(count=2000):
    return torch.nn.functional.normalize(torch.randn(count, 3, generator=torch.Generator().manual_seed(0)), dim=-1)


def brute_force_irradiance(image, n):
    """Every texel with its exact solid angle: sum L dw max(n.w, 0)."""
    height, width = image.shape[:2]
    theta = torch.linspace(0, math.pi, height + 1)
    solid_angle = 2 * math.pi / width * (torch.cos(theta[:-1]) - torch.cos(theta[1:]))
    v = (torch.arange(height) + 0.5) / height
    u = (torch.arange(width) + 0.5) / width
    phi, theta_c = 2 * math.pi * (0.5 - u), math.pi * v
    sin, cos = torch.sin(theta_c)[:, None], torch.cos(theta_c)[:, None]
    d = torch.stack([sin * torch.cos(phi)[None], sin * torch.sin(phi)[None], cos.expand(height, width)], dim=-1)
    power = torch.as_tensor(image) * solid_angle[:, None, None]
    return (n @ d.reshape(-1, 3).T).clamp(min=0) @ power.reshape(-1, 3)


def test_white_furnace_irradiance_is_pi():
    irradiance = EnvironmentMap(constant_hdri(height=100)).irradiance(normals())
    assert torch.allclose(irradiance, torch.full_like(irradiance, math.pi), rtol=0.01)


def test_irradiance_matches_the_sum_over_texels():
    image = load_bundled_hdri()
    n = normals()
    table, exact = EnvironmentMap(image).irradiance(n), brute_force_irradiance(image, n)
    assert ((table - exact).abs().mean() / exact.mean()).item() < 0.004
    assert ((table - exact).abs().max() / exact.mean()).item() < 0.02


def test_a_sun_keeps_its_direction():
    """One bright texel inside a table block: n.V of the block's vector sum puts it where it is, not at the
    block's centre."""
    image = np.zeros((64, 128, 3), np.float32)
    image[21, 37] = 1000.0
    n = normals()
    table, exact = EnvironmentMap(image).irradiance(n)[:, 0], brute_force_irradiance(image, n)[:, 0]
    assert ((table - exact).abs().mean() / exact.max()).item() < 0.002
    assert ((table - exact).abs().max() / exact.max()).item() < 0.03  # the table's bilinear step at the horizon


def test_a_lambertian_render_has_no_ray_noise():
    """With the control variate the diffuse light is the HDRI's exact integral: two ray seeds of 8 rays give
    the same image, within the irradiance table's accuracy of the 65536-ray estimate."""
    job = sphere_job(24, 24, Material((0.6, 0.5, 0.4), roughness=1.0), hdri=load_bundled_hdri())
    renderer = Renderer("cpu")
    images = [renderer.render(_with(job, Options(model="lambert", rays=8, seed=seed, shadows=False))).shaded
              for seed in (1, 2)]
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)
    many = renderer.render(_with(job, Options(model="lambert", rays=65536, sampling="stratified", shadows=False)))
    foreground = job.gbuffer.mask > 0
    assert np.abs(images[0] - many.shaded)[foreground].mean() < 0.01 * many.shaded[foreground].mean()


def test_the_control_variate_is_unbiased_for_any_gains():
    """A default shader with random (non-zero) learned gains: the renderer's estimate with the control
    variate averages to the shader's own Monte Carlo estimate."""
    job = sphere_job(16, 16, Material((0.7, 0.7, 0.7), roughness=0.6), hdri=load_bundled_hdri())
    renderer = Renderer("cpu")
    model = renderer.model("default")
    saved = {k: v.clone() for k, v in model.shader.state_dict().items()}
    try:
        torch.manual_seed(3)
        torch.nn.init.normal_(model.shader.out.weight, std=0.3)
        torch.nn.init.normal_(model.shader.out.bias, std=0.3)
        prepared = renderer.prepare(job)
        with_cv = np.mean([renderer.shade(prepared, job.hdri, Options(rays=4096, seed=s, shadows=False)).shaded
                           for s in range(2)], axis=0)
        envmap = EnvironmentMap(job.hdri)
        pixels = prepared.pixels
        plain = []
        for s in range(2):
            rays = make_rays("mis", 4096, 100 + s, envmap=envmap, normals=pixels.normal, wo=pixels.wo,
                             roughness=pixels.roughness)
            with torch.inference_mode():
                plain.append(model.shader(pixels, rays, envmap.lookup(rays.directions)).mean(0).numpy())
    finally:
        model.shader.load_state_dict(saved)
    foreground = job.gbuffer.mask > 0
    assert with_cv[foreground].mean(0) == pytest.approx(np.mean(plain, axis=0), rel=0.01)  # plain's noise: ~0.4%


def _with(job, options):
    job.options = options
    return job
