"""Fast evaluation of the linear-in-Li shaders: the default LinearNeuralShader, and GGX (its gains = 1 case).

Same parameters, same math as backend/shaders.py, arranged for speed. The reference twin is the
shader's own forward (brdf_cos then monte_carlo); tests/backend/test_fastpath.py holds this module to
it. What is arranged differently (docs/performance.md has the measurements):

- Geometry from scalars. n.i and o.i per (pixel, ray) come from one matrix product ((P, 3) x (3, N)
  for a shared ray set); n.h and h.o follow from them and |i + o|^2 = |i|^2 + |o|^2 + 2 i.o. No (P, N, 3)
  half vector or broadcast copy of the pixel's vectors is made (except for the rare pairs with i ~ -o).
- The MLP on flat (P N, H) activations: the per-pixel part of the first layer once per pixel (as the
  reference does), the per-ray part one (P N, 4) x (4, H) product, added and rectified in place; the
  other layers as oneDNN linears with fused bias and ReLU (addmm off the CPU), optionally in bfloat16
  (precision="bf16").
- GGX split into per-(pixel, ray) scalars and per-pixel colours: D G / (4 n.o) and s = (1 - h.o)^5
  are scalars, Fresnel is f0 (1 - s) + s; the diffuse colour albedo / pi (1 - F(n.o)) and the multiple-
  scattering compensation of the specular (brdf.ggx_energy_compensation, a table lookup) are per pixel.
- Chunks of about PAIRS_PER_CHUNK (pixel, ray) pairs, so that the activations stay in cache on a CPU.
- Optionally the chunk function through torch.compile (compile=True), falling back to eager on failure
  (inductor: C++/OpenMP on a CPU, generated Triton on CUDA).
- Optionally (triton=True, CUDA, shared ray sets) the fused Triton kernel of backend/fastpath_triton.py,
  which keeps the (pixel, ray) activations in registers; not yet the default, as it has not run on a GPU.

`FastShader(shader)` has the shader's call signature, (pixels, rays, radiance) -> (P, 3), and
`brdf_cos(pixels, directions)` -> (P, N, 3) (what the relight cache stores, divided by the pdf).
Inference only (the renderer runs it under torch.inference_mode; oneDNN's fused op has no gradient).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from . import brdf
from .brdf import EPS
from .sampling import RaySet
from .shaders import GGX, LinearNeuralShader, PixelInputs, Shader

PAIRS_PER_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
NEAR_OPPOSITE = 0.5  # |i + o|^2 below this (i.o < -0.75) is recomputed from the vectors
log = logging.getLogger(__name__)
# oneDNN's linear with a fused post-op (a private op; absent in builds without oneDNN: then addmm)
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None
# its bfloat16 kernels need a CPU with native bf16 (AVX-512 BF16 / AMX); elsewhere bf16 products use addmm
_ONEDNN_BF16 = _ONEDNN_LINEAR is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def supports(shader: Shader) -> bool:
    """Whether this module has a fast path for the shader (exact class: subclasses may change the math)."""
    return type(shader) in (LinearNeuralShader, GGX)


def cosines(normal: torch.Tensor, wo: torch.Tensor, directions: torch.Tensor):
    """n.i, o.i, n.h, h.o (each (P, N)) and the raw and clamped n.o ((P, 1)), as brdf.geometry computes them.

    |i + o|^2 = |i|^2 + |o|^2 + 2 i.o from the scalars, except where i is nearly -o (light from right
    behind the view direction; it contributes only on back-facing pixels): there the sum cancels, so those
    few pairs take |i + o|^2 from the vectors, as the reference does. n.h and h.o are clamped to [0, 1].
    """
    if directions.shape[0] == 1:
        shared = directions[0].T
        n_dot_i, i_dot_o = normal @ shared, wo @ shared
        i_length2 = shared.square().sum(0)
    else:
        n_dot_i = torch.bmm(directions, normal[:, :, None])[..., 0]
        i_dot_o = torch.bmm(directions, wo[:, :, None])[..., 0]
        i_length2 = directions.square().sum(-1)
    n_dot_o_raw = (normal * wo).sum(-1, keepdim=True)
    half_length2 = (i_length2 + wo.square().sum(-1, keepdim=True)).add_(i_dot_o, alpha=2)
    near = half_length2 < NEAR_OPPOSITE
    if near.any():  # i nearly -o: |i + o|^2 from the vectors, as the reference computes it (no cancellation)
        p, k = near.nonzero(as_tuple=True)
        half_length2[p, k] = (directions[p if directions.shape[0] > 1 else 0, k] + wo[p]).square().sum(-1)
    inv_length = torch.rsqrt(half_length2.clamp_(min=EPS * EPS))  # 1 / |i + o|
    n_dot_h = ((n_dot_i + n_dot_o_raw) * inv_length).clamp_(0, 1)
    h_dot_o = ((i_dot_o + 1) * inv_length).clamp_(0, 1)
    return n_dot_i, i_dot_o, n_dot_h, h_dot_o, n_dot_o_raw, n_dot_o_raw.clamp(min=EPS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """x W^T + b (then ReLU). On a CPU with oneDNN this is the fused oneDNN linear that inductor also
    uses: 2-8x faster than addmm for these tall, thin products (K = 4 or 32, N = 6 or 32)."""
    if x.device.type == "cpu" and _ONEDNN_LINEAR is not None and (x.dtype == torch.float32 or _ONEDNN_BF16):
        return _ONEDNN_LINEAR(x, weight, bias, "relu" if relu else "none", [], "")
    out = torch.addmm(bias, x, weight.T) if bias is not None else torch.mm(x, weight.T)
    return out.relu_() if relu else out


def gains(shader: LinearNeuralShader, pixels: PixelInputs, n_dot_o: torch.Tensor, features: list[torch.Tensor],
          dtype: torch.dtype) -> torch.Tensor:
    """exp(clamped MLP output) per (pixel, ray): (P, N, 6), diffuse gains then specular gains."""
    count, rays = features[0].shape
    pixel_part = shader.pixel_in(torch.cat([pixels.albedo, pixels.specular, pixels.roughness, n_dot_o], -1))
    ray_features = torch.stack(features, -1).view(count * rays, shader.RAY_FEATURES)
    hidden = linear(ray_features, shader.ray_in.weight, None).view(count, rays, -1)
    hidden = hidden.add_(pixel_part[:, None]).relu_().view(count * rays, -1).to(dtype)
    for layer in shader.body:
        if isinstance(layer, nn.Linear):
            hidden = linear(hidden, layer.weight.to(dtype), layer.bias.to(dtype), relu=True)
    logits = linear(hidden, shader.out.weight.to(dtype), shader.out.bias.to(dtype)).float()
    return logits.clamp_(max=shader.MAX_LOG_GAIN).exp_().view(count, rays, 6)


def _smith_lambda(alpha2: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    cos2 = cos.clamp(min=EPS).square()
    return (torch.sqrt(1 + alpha2 * ((1 - cos2).clamp_(min=0) / cos2)) - 1) / 2


def pixel_colours(pixels: PixelInputs, n_dot_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pixel colours of the GGX model, (P, 3) each, for the clamped n.o (P, 1): the diffuse colour
    albedo / pi x brdf.diffuse_weight (1 - the compensated lobe's albedo), and the specular's scale,
    brdf.ggx_energy_compensation (multiple scattering; it does not depend on the ray)."""
    f0 = pixels.specular
    diffuse = pixels.albedo / math.pi * brdf.diffuse_weight_at(f0, n_dot_o, pixels.roughness)
    return diffuse, brdf.ggx_energy_compensation(f0, pixels.roughness, n_dot_o)


def brdf_cos(shader: Shader, pixels: PixelInputs, directions: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shader's f cos per (pixel, ray) and colour channel, (P, N, 3): shader.brdf_cos, fast."""
    n_dot_i, i_dot_o, n_dot_h, h_dot_o, n_dot_o_raw, n_dot_o = cosines(pixels.normal, pixels.wo, directions)
    f0 = pixels.specular
    cos_i = n_dot_i.clamp(min=0)
    diffuse, scale = pixel_colours(pixels, n_dot_o)
    # GGX (brdf.ggx_specular) as scalars: D G / (4 n.o) [n.i > 0], Fresnel f0 (1 - s) + s, times the colour scale
    alpha = (pixels.roughness * pixels.roughness).clamp(min=1e-3)
    alpha2 = alpha * alpha
    x = n_dot_h * n_dot_h * (alpha2 - 1) + 1
    lobe = alpha2 / (math.pi * x * x)
    lobe = lobe.div_((1 + _smith_lambda(alpha2, n_dot_o) + _smith_lambda(alpha2, cos_i)).mul_(4 * n_dot_o))
    lobe = lobe.mul_(n_dot_i > 0)
    schlick = (1 - h_dot_o).clamp_(0, 1).pow_(5)
    specular = torch.addcmul((f0 * scale)[:, None], schlick[..., None], ((1 - f0) * scale)[:, None])
    specular = specular.mul_(lobe[..., None])  # (P, N, 3)
    if isinstance(shader, LinearNeuralShader):
        g = gains(shader, pixels, n_dot_o, [n_dot_i, n_dot_h, h_dot_o, i_dot_o], dtype)
        specular = specular.mul_(g[..., 3:])
        return specular.addcmul_(g[..., :3], cos_i[..., None] * diffuse[:, None])
    return specular.add_(cos_i[..., None] * diffuse[:, None])


def shade_chunk(shader: Shader, pixels: PixelInputs, directions: torch.Tensor, radiance_over_pdf: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mean over rays of f cos Li / pdf: (P, 3). radiance_over_pdf is (1 or P, N, 3)."""
    weighted = brdf_cos(shader, pixels, directions, dtype).mul_(radiance_over_pdf)
    return weighted.sum(1).div_(directions.shape[1])


class FastShader:
    """A shader's forward through this module's fast path, chunked for the cache; same call as the shader."""

    def __init__(self, shader: Shader, *, precision: str = "fp32", compile: bool = False, triton: bool = False,
                 pairs_per_chunk: int | None = None):
        if not supports(shader):
            raise ValueError(f"no fast path for shader {shader.name!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.shader, self.precision, self.dtype = shader, precision, PRECISIONS[precision]
        self.pairs_per_chunk = pairs_per_chunk
        self.compiled = False
        self._chunk = shade_chunk
        self._triton = None
        if triton:
            from . import fastpath_triton  # imports triton: only when asked for

            self._triton = fastpath_triton
        if compile:
            self._chunk = torch.compile(shade_chunk, dynamic=True)
            self.compiled = True

    @property
    def name(self) -> str:
        return self.shader.name

    def _pixels_per_chunk(self, device: torch.device, rays: int) -> int:
        pairs = self.pairs_per_chunk or PAIRS_PER_CHUNK.get(device.type, PAIRS_PER_CHUNK["cpu"])
        return max(16, pairs // max(rays, 1))

    def _run(self, *args) -> torch.Tensor:
        if not self.compiled:
            return shade_chunk(*args, self.dtype)
        try:
            return self._chunk(*args, self.dtype)
        except Exception as error:  # inductor needs a C++ compiler (CPU) or Triton (CUDA): fall back to eager
            log.warning("torch.compile of the fast shading path failed, using eager: %s", str(error)[:300])
            self.compiled, self._chunk = False, shade_chunk
            return shade_chunk(*args, self.dtype)

    def _over_chunks(self, pixels: PixelInputs, per_ray: list[torch.Tensor], out: torch.Tensor,
                     function) -> torch.Tensor:
        """out[chunk] = function(pixels of the chunk, *per-ray tensors of the chunk) in cache-sized chunks."""
        count, rays = len(pixels), per_ray[0].shape[1]
        step = self._pixels_per_chunk(pixels.normal.device, rays)
        for start in range(0, count, step):
            stop = min(start + step, count)
            parts = [t if t.shape[0] == 1 else t[start:stop] for t in per_ray]  # shared ray sets have 1 row
            out[start:stop] = function(pixels.slice(start, stop), *parts)
        return out

    def __call__(self, pixels: PixelInputs, rays: RaySet, radiance: torch.Tensor) -> torch.Tensor:
        device = pixels.normal.device
        runnable = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if self._triton is not None and runnable and self._triton.supports(self.shader, rays.directions):
            return self._triton.shade(self.shader, pixels, rays.directions, radiance / rays.pdf[..., None],
                                      low_precision=self.precision == "bf16")
        out = torch.empty(len(pixels), 3, device=pixels.normal.device)
        return self._over_chunks(pixels, [rays.directions, radiance / rays.pdf[..., None]], out,
                                 lambda p, d, w: self._run(self.shader, p, d, w))

    def brdf_cos(self, pixels: PixelInputs, directions: torch.Tensor) -> torch.Tensor:
        """shader.brdf_cos(pixels, directions), (P, N, 3), through the fast path."""
        out = torch.empty(len(pixels), directions.shape[1], 3, device=pixels.normal.device)
        return self._over_chunks(pixels, [directions], out, lambda p, d: brdf_cos(self.shader, p, d, self.dtype))
