"""The fast path (backend/fastpath.py) against its reference twin, the shaders' own forward (shaders.py).

Tolerances. The fast path regroups the same float32 arithmetic (n.h and h.o from scalars, Fresnel
split), so it differs from the reference by rounding only; both are compared with a float64 run of the
reference. Pixel by pixel, |fast - float64| <= 2 |reference - float64| + 1e-3 |float64| + 1e-6 on
front-facing pixels with roughness >= 0.15. Below that roughness float32 cannot resolve the GGX peak
(D depends on 1 - (n.h)^2 at the 1e-7 level when alpha^2 ~ 1e-6: one ulp of n.h moves it by ~10%), and
on back-facing pixels n.o is clamped to 1e-6, which amplifies rounding by 1e6, in both paths alike: there
the whole batch is held to 1% in L1 (the reference's own float32 error is ~0.05% there). bf16 (hidden
layers' products only) is held to 2% per pixel and 0.2% on average.
"""

import dataclasses

import numpy as np
import pytest
import torch

from backend import fastpath
from backend.jobformat import Options
from backend.renderer import Renderer
from backend.sampling import RaySet, make_rays
from backend.shaders import GGX, BlinnPhong, LinearNeuralShader, PaperShader, PixelInputs
from backend.synthetic import demo_scene_job


def random_pixels(count=300, seed=0, device="cpu") -> PixelInputs:
    g = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(count, 3, generator=g), dim=-1)
    wo = torch.nn.functional.normalize(normal + 0.7 * torch.randn(count, 3, generator=g), dim=-1)
    return PixelInputs(*(t.to(device) for t in (torch.rand(count, 3, generator=g), torch.rand(count, 3, generator=g),
                                                  torch.rand(count, 1, generator=g), normal, wo)))


def trained_like_shader(seed=0) -> LinearNeuralShader:
    """A default shader whose gains are not all 1 (the untrained one is exactly GGX)."""
    torch.manual_seed(seed)
    shader = LinearNeuralShader()
    with torch.no_grad():
        shader.out.weight.normal_(0, 0.3)
        shader.out.bias.normal_(0, 0.3)
    return shader.eval()


def double(pixels: PixelInputs) -> PixelInputs:
    return PixelInputs(*(getattr(pixels, f.name).double() for f in dataclasses.fields(PixelInputs)))


def rays_and_radiance(kind, pixels, n=64):
    rays = make_rays(kind, n, 3, normals=pixels.normal, wo=pixels.wo, roughness=pixels.roughness,
                     device=pixels.normal.device)
    g = torch.Generator().manual_seed(1)
    radiance = (torch.rand(rays.directions.shape[0], n, 3, generator=g) * 4).to(pixels.normal.device)
    return rays, radiance


def assert_as_accurate_as_the_reference(fast, ref32, ref64, pixels, rtol=1e-3):
    """The bounds of the module docstring."""
    error = (fast.double() - ref64).abs()
    bound = 2 * (ref32 - ref64).abs() + rtol * ref64.abs() + 1e-6
    conditioned = (pixels.roughness[:, 0] >= 0.15) & ((pixels.normal * pixels.wo).sum(-1) > 0)
    excess = (error - bound)[conditioned].max().item()
    assert excess <= 0, f"fast path off by {excess:.3g} beyond the reference's own float32 error"
    assert error.sum() <= 1e-2 * ref64.abs().sum(), (error.sum() / ref64.abs().sum()).item()


@pytest.mark.parametrize("kind", ["stratified", "cosine", "mis"])
@pytest.mark.parametrize("make", [trained_like_shader, GGX], ids=["default", "ggx"])
def test_fast_shading_matches_the_reference(kind, make, device):
    shader = make().to(device)
    pixels = random_pixels(device=device)
    rays, radiance = rays_and_radiance(kind, pixels)
    with torch.inference_mode():
        ref32 = shader(pixels, rays, radiance)
        ref64 = shader.double()(double(pixels), RaySet(rays.directions.double(), rays.pdf.double()), radiance.double())
        shader.float()
        fast = fastpath.FastShader(shader, pairs_per_chunk=1000)(pixels, rays, radiance)
    assert fast.shape == ref32.shape and fast.dtype == torch.float32
    assert_as_accurate_as_the_reference(fast, ref32, ref64, pixels)


def test_fast_brdf_cos_matches_the_reference_per_ray(device):
    shader = trained_like_shader().to(device)
    pixels = random_pixels(device=device)
    pixels.roughness = 0.15 + 0.85 * pixels.roughness  # single near-mirror rays: see the module docstring
    rays, _ = rays_and_radiance("mis", pixels)
    with torch.inference_mode():
        ref32 = shader.brdf_cos(pixels, rays.directions)
        ref64 = shader.double().brdf_cos(double(pixels), rays.directions.double())
        shader.float()
        fast = fastpath.FastShader(shader, pairs_per_chunk=1000).brdf_cos(pixels, rays.directions)
    assert fast.shape == ref32.shape == (len(pixels), 64, 3)
    # single rays are not averaged, so grazing pairs (n.h ~ 1 - 1e-4) need 5e-3 rather than 1e-3
    assert_as_accurate_as_the_reference(fast, ref32, ref64, pixels, rtol=5e-3)


def test_bf16_stays_within_two_percent():
    shader = trained_like_shader()
    pixels = random_pixels(count=500)
    rays, radiance = rays_and_radiance("stratified", pixels)
    with torch.inference_mode():
        ref = shader(pixels, rays, radiance)
        low = fastpath.FastShader(shader, precision="bf16")(pixels, rays, radiance)
    relative = (low - ref).abs() / ref.abs().clamp(min=1e-2)
    assert relative.max() < 2e-2 and relative.mean() < 2e-3, (relative.max(), relative.mean())


def test_chunk_size_does_not_change_the_result():
    shader = trained_like_shader()
    pixels = random_pixels()
    rays, radiance = rays_and_radiance("mis", pixels)
    with torch.inference_mode():
        small = fastpath.FastShader(shader, pairs_per_chunk=640)(pixels, rays, radiance)
        whole = fastpath.FastShader(shader, pairs_per_chunk=1 << 20)(pixels, rays, radiance)
    torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-6)


def test_supports_only_the_shaders_whose_math_it_copies():
    assert fastpath.supports(LinearNeuralShader()) and fastpath.supports(GGX())
    assert not fastpath.supports(BlinnPhong()) and not fastpath.supports(PaperShader())
    with pytest.raises(ValueError, match="no fast path"):
        fastpath.FastShader(BlinnPhong())
    with pytest.raises(ValueError, match="precision"):
        fastpath.FastShader(GGX(), precision="fp8")


def test_a_failed_compile_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    shader = trained_like_shader()
    pixels = random_pixels(count=50)
    rays, radiance = rays_and_radiance("stratified", pixels, n=16)
    fast = fastpath.FastShader(shader, compile=True)
    with torch.inference_mode():
        out = fast(pixels, rays, radiance)
        expected = fastpath.FastShader(shader)(pixels, rays, radiance)
    assert not fast.compiled
    torch.testing.assert_close(out, expected)


@pytest.mark.slow
def test_compiled_fast_path_matches_eager():
    """torch.compile (inductor: C++ on a CPU, Triton on CUDA) of the chunk function; eager if it cannot."""
    shader = trained_like_shader()
    pixels = random_pixels(count=64)
    rays, radiance = rays_and_radiance("stratified", pixels, n=16)
    with torch.inference_mode():
        compiled = fastpath.FastShader(shader, compile=True)(pixels, rays, radiance)
        eager = fastpath.FastShader(shader)(pixels, rays, radiance)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_renderer_fast_and_reference_paths_agree():
    job = demo_scene_job(40, 32, options=Options(model="ggx", rays=32, sampling="mis"))
    fast = Renderer("cpu").render(job)
    reference = Renderer("cpu", fast=False).render(job)
    np.testing.assert_allclose(fast.unshadowed, reference.unshadowed, rtol=1e-2, atol=1e-5)
    assert np.abs(fast.unshadowed - reference.unshadowed).mean() < 1e-4 * np.abs(reference.unshadowed).mean() + 1e-7


TRITON_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_fastpath import random_pixels, trained_like_shader
from backend import fastpath
from backend.sampling import make_rays
from backend.shaders import GGX
pixels = random_pixels(count=40)
rays = make_rays("stratified", 24, 0)
radiance = torch.rand(1, 24, 3, generator=torch.Generator().manual_seed(0)) * 3
worst = 0.0
with torch.inference_mode():
    for shader in (trained_like_shader(), GGX()):
        fused = fastpath.FastShader(shader, triton=True)(pixels, rays, radiance)
        torch_path = fastpath.FastShader(shader)(pixels, rays, radiance)
        worst = max(worst, ((fused - torch_path).abs() / torch_path.abs().clamp(min=1e-2)).max().item())
print("WORST", worst)
"""


@pytest.mark.slow
def test_triton_kernel_matches_the_torch_fast_path_in_the_interpreter():
    """backend/fastpath_triton.py under TRITON_INTERPRET=1 (numpy on the CPU), fp32. Its bf16 path cannot be
    checked here: the interpreter has no bfloat16 matrix product; a GPU session must."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = TRITON_CHECK.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    worst = float(run.stdout.split("WORST")[1])
    # the kernel takes |i + o| from the vectors (no cancellation) and sums in another order
    assert worst < 1e-3, worst
