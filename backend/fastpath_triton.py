"""A fused Triton kernel for the default shader over a shared ray set (CUDA; Triton's interpreter on a CPU).

One program shades BLOCK_P pixels: for each tile of BLOCK_N rays it forms the BLOCK_P x BLOCK_N
(pixel, ray) pairs, computes their cosines from the vectors, runs the MLP (first layer as 4 multiply-adds
on the per-pixel part, the hidden and output layers as tl.dot), the GGX and diffuse terms and the
product with Li / pdf, and sums over the rays, all in registers: no (P, N, H) activation ever reaches
memory. That memory traffic is what separates eager PyTorch from the GPU's compute limit (docs/design.md
section 6). The per-pixel colours (the diffuse colour, and the specular's multiple-scattering scale) come
in from fastpath.pixel_colours. Reference twins: backend/fastpath.py (same arrangement in PyTorch) and shaders.py;
tests/backend/test_fastpath.py runs this kernel under TRITON_INTERPRET=1 and holds it to them.

Scope: LinearNeuralShader with layers == 2 (the default config) or GGX (no MLP), shared ray sets
(uniform, stratified, importance); everything else stays on the PyTorch fast path. Not yet measured on
a GPU (docs/performance.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .brdf import EPS
from .fastpath import pixel_colours
from .shaders import GGX, LinearNeuralShader, PixelInputs

OUT_COLUMNS = 16  # the 6 gain logits padded to tl.dot's minimum width


def supports(shader, directions: torch.Tensor) -> bool:
    shared = directions.shape[0] == 1
    if type(shader) is GGX:
        return shared
    return shared and type(shader) is LinearNeuralShader and shader.layers == 2 and shader.hidden % 16 == 0


@triton.jit
def _column(block, columns, index):
    """block[:, index] of a (M, C) block."""
    return tl.sum(tl.where(columns[None, :] == index, block, 0.0), axis=1)


@triton.jit
def _smith_lambda(alpha2, cos):
    cos2 = tl.maximum(cos, 1e-6) * tl.maximum(cos, 1e-6)
    return (tl.sqrt(1 + alpha2 * (tl.maximum(1 - cos2, 0.0) / cos2)) - 1) / 2


@triton.jit
def _shade_kernel(normal_ptr, wo_ptr, diffuse_ptr, f0_ptr, scale_ptr, alpha2_ptr, pixel_part_ptr, dir_ptr,
                  weight_ptr, w_ray_ptr, w_hid_ptr, b_hid_ptr, w_out_ptr, b_out_ptr, out_ptr, P, N, max_log_gain,
                  HIDDEN: tl.constexpr, USE_MLP: tl.constexpr, LOW_PRECISION: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    M: tl.constexpr = BLOCK_P * BLOCK_N
    rows = tl.arange(0, M)
    pixel = tl.program_id(0) * BLOCK_P + rows // BLOCK_N  # pixel of each (pixel, ray) row
    pixel_ok = pixel < P
    nx = tl.load(normal_ptr + pixel * 3 + 0, mask=pixel_ok, other=0.0)
    ny = tl.load(normal_ptr + pixel * 3 + 1, mask=pixel_ok, other=0.0)
    nz = tl.load(normal_ptr + pixel * 3 + 2, mask=pixel_ok, other=1.0)
    ox = tl.load(wo_ptr + pixel * 3 + 0, mask=pixel_ok, other=0.0)
    oy = tl.load(wo_ptr + pixel * 3 + 1, mask=pixel_ok, other=0.0)
    oz = tl.load(wo_ptr + pixel * 3 + 2, mask=pixel_ok, other=1.0)
    alpha2 = tl.load(alpha2_ptr + pixel, mask=pixel_ok, other=1.0)
    n_dot_o_raw = nx * ox + ny * oy + nz * oz
    n_dot_o = tl.maximum(n_dot_o_raw, 1e-6)
    lambda_o = _smith_lambda(alpha2, n_dot_o)
    hidden_columns = tl.arange(0, HIDDEN)
    out_columns = tl.arange(0, 16)
    if USE_MLP:
        pixel_part = tl.load(pixel_part_ptr + pixel[:, None] * HIDDEN + hidden_columns[None, :],
                             mask=pixel_ok[:, None], other=0.0)
        w_ray0 = tl.load(w_ray_ptr + hidden_columns * 4 + 0)
        w_ray1 = tl.load(w_ray_ptr + hidden_columns * 4 + 1)
        w_ray2 = tl.load(w_ray_ptr + hidden_columns * 4 + 2)
        w_ray3 = tl.load(w_ray_ptr + hidden_columns * 4 + 3)
        w_hid = tl.load(w_hid_ptr + hidden_columns[:, None] * HIDDEN + hidden_columns[None, :])  # (in, out)
        b_hid = tl.load(b_hid_ptr + hidden_columns)
        w_out = tl.load(w_out_ptr + hidden_columns[:, None] * 16 + out_columns[None, :])  # (in, 16)
        b_out = tl.load(b_out_ptr + out_columns)
    acc_r = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        ray = start + rows % BLOCK_N
        ray_ok = (ray < N) & pixel_ok
        dx = tl.load(dir_ptr + ray * 3 + 0, mask=ray_ok, other=0.0)
        dy = tl.load(dir_ptr + ray * 3 + 1, mask=ray_ok, other=0.0)
        dz = tl.load(dir_ptr + ray * 3 + 2, mask=ray_ok, other=-1.0)
        n_dot_i = nx * dx + ny * dy + nz * dz
        i_dot_o = dx * ox + dy * oy + dz * oz
        hx, hy, hz = dx + ox, dy + oy, dz + oz
        inv_length = 1.0 / tl.maximum(tl.sqrt(hx * hx + hy * hy + hz * hz), 1e-6)
        n_dot_h = tl.minimum(tl.maximum((nx * hx + ny * hy + nz * hz) * inv_length, 0.0), 1.0)
        h_dot_o = tl.minimum(tl.maximum((hx * ox + hy * oy + hz * oz) * inv_length, 0.0), 1.0)
        cos_i = tl.maximum(n_dot_i, 0.0)
        x = n_dot_h * n_dot_h * (alpha2 - 1) + 1
        lobe = alpha2 / (3.141592653589793 * x * x)
        lobe = lobe / ((1 + lambda_o + _smith_lambda(alpha2, cos_i)) * 4 * n_dot_o)
        lobe = tl.where((n_dot_i > 0) & ray_ok, lobe, 0.0)
        one_minus = tl.minimum(tl.maximum(1 - h_dot_o, 0.0), 1.0)
        schlick = one_minus * one_minus * one_minus * one_minus * one_minus
        cos_i = tl.where(ray_ok, cos_i, 0.0)
        if USE_MLP:
            hidden = (pixel_part + n_dot_i[:, None] * w_ray0[None, :] + n_dot_h[:, None] * w_ray1[None, :]
                      + h_dot_o[:, None] * w_ray2[None, :] + i_dot_o[:, None] * w_ray3[None, :])
            hidden = tl.maximum(hidden, 0.0)
            if LOW_PRECISION:
                hidden = tl.dot(hidden.to(tl.bfloat16), w_hid.to(tl.bfloat16), out_dtype=tl.float32)
            else:
                hidden = tl.dot(hidden, w_hid, input_precision="ieee")
            hidden = tl.maximum(hidden + b_hid[None, :], 0.0)
            if LOW_PRECISION:
                logits = tl.dot(hidden.to(tl.bfloat16), w_out.to(tl.bfloat16), out_dtype=tl.float32)
            else:
                logits = tl.dot(hidden, w_out, input_precision="ieee")
            gains = tl.exp(tl.minimum(logits + b_out[None, :], max_log_gain))
        for channel in tl.static_range(3):
            diffuse = tl.load(diffuse_ptr + pixel * 3 + channel, mask=pixel_ok, other=0.0)
            f0 = tl.load(f0_ptr + pixel * 3 + channel, mask=pixel_ok, other=0.0)
            scale = tl.load(scale_ptr + pixel * 3 + channel, mask=pixel_ok, other=0.0)
            weight = tl.load(weight_ptr + ray * 3 + channel, mask=ray_ok, other=0.0)
            diffuse_term = diffuse * cos_i
            specular_term = lobe * scale * (f0 * (1 - schlick) + schlick)
            if USE_MLP:
                diffuse_term = diffuse_term * _column(gains, out_columns, channel)
                specular_term = specular_term * _column(gains, out_columns, 3 + channel)
            per_pixel = tl.sum(tl.reshape((diffuse_term + specular_term) * weight, [BLOCK_P, BLOCK_N]), axis=1)
            if channel == 0:
                acc_r += per_pixel
            elif channel == 1:
                acc_g += per_pixel
            else:
                acc_b += per_pixel
    out_pixel = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    out_ok = out_pixel < P
    tl.store(out_ptr + out_pixel * 3 + 0, acc_r / N, mask=out_ok)
    tl.store(out_ptr + out_pixel * 3 + 1, acc_g / N, mask=out_ok)
    tl.store(out_ptr + out_pixel * 3 + 2, acc_b / N, mask=out_ok)


def shade(shader, pixels: PixelInputs, directions: torch.Tensor, radiance_over_pdf: torch.Tensor,
          low_precision: bool = False, block_p: int = 16, block_n: int = 16) -> torch.Tensor:
    """mean over a shared ray set of f cos Li / pdf, (P, 3): the fused kernel. directions, radiance_over_pdf
    are (1, N, 3)."""
    if not supports(shader, directions):
        raise ValueError("the Triton kernel takes the default shader (layers 2) or GGX over a shared ray set")
    device = pixels.normal.device
    count, rays = len(pixels), directions.shape[1]
    f0 = pixels.specular.contiguous()
    n_dot_o = (pixels.normal * pixels.wo).sum(-1, keepdim=True).clamp(min=EPS)
    diffuse, scale = pixel_colours(pixels, n_dot_o)  # per pixel, (P, 3) each: as the PyTorch fast path
    diffuse, scale = diffuse.contiguous(), scale.contiguous()
    alpha2 = ((pixels.roughness * pixels.roughness).clamp(min=1e-3) ** 2)[:, 0].contiguous()
    use_mlp = isinstance(shader, LinearNeuralShader)
    hidden = shader.hidden if use_mlp else 16
    dummy = torch.zeros(1, device=device)
    if use_mlp:
        features = torch.cat([pixels.albedo, pixels.specular, pixels.roughness, n_dot_o], -1)
        pixel_part = shader.pixel_in(features).contiguous()
        w_ray = shader.ray_in.weight.contiguous()  # (H, 4)
        body = shader.body[1]
        w_hid, b_hid = body.weight.T.contiguous(), body.bias.contiguous()  # (in, out)
        w_out = torch.zeros(hidden, OUT_COLUMNS, device=device)
        w_out[:, :6] = shader.out.weight.T
        b_out = torch.zeros(OUT_COLUMNS, device=device)
        b_out[:6] = shader.out.bias
        max_log_gain = shader.MAX_LOG_GAIN
    else:
        pixel_part = w_ray = w_hid = b_hid = w_out = b_out = dummy
        max_log_gain = 0.0
    out = torch.empty(count, 3, device=device)
    grid = (triton.cdiv(count, block_p),)
    _shade_kernel[grid](pixels.normal.contiguous(), pixels.wo.contiguous(), diffuse, f0, scale, alpha2,
                        pixel_part, directions[0].contiguous(), radiance_over_pdf[0].contiguous(), w_ray, w_hid,
                        b_hid, w_out, b_out, out, count, rays, max_log_gain, HIDDEN=hidden, USE_MLP=use_mlp,
                        LOW_PRECISION=low_precision, BLOCK_P=block_p, BLOCK_N=block_n)
    return out
