import math

import numpy as np
import torch

from backend.envmap import EnvironmentMap, direction_to_uv, uv_to_direction
from backend.sampling import make_rays


def test_uv_direction_round_trip():
    d = torch.nn.functional.normalize(torch.randn(1000, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    u, v = direction_to_uv(d)
    torch.testing.assert_close(uv_to_direction(u, v), d, atol=1e-5, rtol=0)


def test_blender_orientation():
    """docs/design.md section 3: image centre faces +X, u = 0.25 faces +Y, the top row is the zenith."""
    u, v = direction_to_uv(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]]))
    torch.testing.assert_close(u[:3], torch.tensor([0.5, 0.25, u[2].item()]))
    torch.testing.assert_close(v, torch.tensor([0.5, 0.5, 0.0, 0.5]))
    assert abs(u[3].item() - 1.0) < 1e-6 or abs(u[3].item()) < 1e-6


def test_bilinear_lookup_exact_at_texel_centres_and_between():
    image = torch.rand(8, 16, 3, generator=torch.Generator().manual_seed(0))
    env = EnvironmentMap(image)
    rows, cols = torch.meshgrid(torch.arange(1, 7), torch.arange(16), indexing="ij")
    d = uv_to_direction((cols + 0.5) / 16, (rows + 0.5) / 8)
    torch.testing.assert_close(env.lookup(d), image[1:7], atol=1e-5, rtol=0)
    # halfway between columns 15 and 0 (the seam) is their mean
    d = uv_to_direction(torch.tensor([0.0]), torch.tensor([(3 + 0.5) / 8]))
    torch.testing.assert_close(env.lookup(d)[0], (image[3, 15] + image[3, 0]) / 2, atol=1e-5, rtol=0)


def test_rotation_matches_rotated_lookup():
    image = torch.rand(16, 32, 3, generator=torch.Generator().manual_seed(2))
    env = EnvironmentMap(image)
    angle = 2 * math.pi * 5 / 32  # a whole number of texels: exact
    d = torch.nn.functional.normalize(torch.randn(100, 3, generator=torch.Generator().manual_seed(3)), dim=-1)
    c, s = math.cos(-angle), math.sin(-angle)
    rotated_back = torch.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], -1)
    torch.testing.assert_close(env.rotated(angle).lookup(d), env.lookup(rotated_back), atol=1e-5, rtol=0)


def test_importance_pdf_is_a_density_and_matches_samples():
    image = torch.rand(16, 32, 3, generator=torch.Generator().manual_seed(4)) ** 4 * 50
    env = EnvironmentMap(image)
    # integral of pdf over the sphere = 1 (uniform-sphere Monte Carlo with many stratified points)
    uniform = make_rays("stratified", 1 << 16, 0)
    integral = (env.pdf(uniform.directions[0]) / uniform.pdf[0]).mean()
    assert abs(integral.item() - 1) < 0.02
    rays = make_rays("importance", 4096, 1, envmap=env)
    torch.testing.assert_close(rays.pdf[0], env.pdf(rays.directions[0]), rtol=5e-3, atol=1e-6)
    # an unbiased estimate of the map's total power with importance sampling equals the uniform one
    power_is = (env.lookup(rays.directions[0]) / rays.pdf[0, :, None]).mean(0)
    power_uniform = (env.lookup(uniform.directions[0]) / uniform.pdf[0, :, None]).mean(0)
    torch.testing.assert_close(power_is, power_uniform, rtol=0.03, atol=0)


def test_ray_sets_are_seeded():
    env = EnvironmentMap(np.random.default_rng(0).random((8, 16, 3)).astype(np.float32))
    for kind in ("uniform", "stratified", "importance"):
        a, b, c = (make_rays(kind, 64, seed, envmap=env) for seed in (7, 7, 8))
        assert torch.equal(a.directions, b.directions) and not torch.equal(a.directions, c.directions)
        torch.testing.assert_close(a.directions.norm(dim=-1), torch.ones(1, 64))
    normals = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    cosine = make_rays("cosine", 64, 0, normals=normals)
    assert ((cosine.directions * normals[:, None]).sum(-1) >= -1e-6).all()
