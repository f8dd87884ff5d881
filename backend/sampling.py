"""Light-ray sets for the Monte Carlo estimate L = mean_k f(wi_k) Li(wi_k) / pdf(wi_k).

All sets are seeded and drawn on the CPU, so the same seed gives the same rays on every device.
Sphere sets (uniform, stratified, importance) are shared by every pixel of a frame, as the paper
does, which keeps animations flicker-free and lets a relight reuse everything but Li. Per-pixel sets
(PER_PIXEL) follow each pixel's normal: cosine is one hemisphere per pixel; mis mixes the shared
light-importance rays with cosine and GGX-lobe rays of the pixel (multi-sample MIS, balance heuristic:
every ray's pdf is the mixture's, so a glossy lobe that light sampling rarely hits is still covered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import brdf
from .envmap import EnvironmentMap

UNIFORM_SPHERE_PDF = 1 / (4 * math.pi)
PER_PIXEL = ("cosine", "mis")


@dataclass
class RaySet:
    directions: torch.Tensor  # (1 or P, N, 3) world space, unit
    pdf: torch.Tensor  # (1 or P, N) solid-angle density

    @property
    def shared(self) -> bool:
        return self.directions.shape[0] == 1


def _uniforms(n: int, dims: int, seed: int, low_discrepancy: bool) -> torch.Tensor:
    if low_discrepancy:
        return torch.quasirandom.SobolEngine(dims, scramble=True, seed=seed).draw(n).float()
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, dims, generator=generator)


def _sphere(u: torch.Tensor) -> torch.Tensor:
    z = 1 - 2 * u[:, 0]
    r = torch.sqrt((1 - z * z).clamp(min=0))
    phi = 2 * math.pi * u[:, 1]
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)


def tangent_frame(normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit tangents orthogonal to unit normals (..., 3) (Duff et al. 2017, branchless)."""
    x, y, z = normal.unbind(-1)
    sign = torch.where(z >= 0, 1.0, -1.0)
    a = -1 / (sign + z)
    b = x * y * a
    tangent = torch.stack([1 + sign * x * x * a, sign * b, -sign * x], dim=-1)
    bitangent = torch.stack([b, sign + y * y * a, -y], dim=-1)
    return tangent, bitangent


def to_world(local: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Local (N or P, N, 3) vectors (z along the normal) into world space around normals (P, 3)."""
    tangent, bitangent = tangent_frame(normals)
    if local.dim() == 2:
        local = local[None]
    return (local[..., 0:1] * tangent[:, None] + local[..., 1:2] * bitangent[:, None]
            + local[..., 2:3] * normals[:, None])


def cosine_local(u: torch.Tensor) -> torch.Tensor:
    r = torch.sqrt(u[..., 0])
    phi = 2 * math.pi * u[..., 1]
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), torch.sqrt((1 - u[..., 0]).clamp(min=0))], -1)


def ggx_directions(u: torch.Tensor, normals: torch.Tensor, wo: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Light directions wo reflected about half vectors drawn from D(h) (n.h) of GGX (P, N, 3); u is (N, 2),
    shared by the pixels, or (P, N, 2)."""
    cos2 = (1 - u[..., 0]) / (1 + (alpha * alpha - 1) * u[..., 0])  # (P, N)
    sin = torch.sqrt((1 - cos2).clamp(min=0))
    phi = 2 * math.pi * u[..., 1]
    h = to_world(torch.stack([sin * torch.cos(phi), sin * torch.sin(phi), torch.sqrt(cos2)], -1), normals)
    o = wo[:, None]
    return 2 * (o * h).sum(-1, keepdim=True) * h - o


def ggx_pdf(wi: torch.Tensor, normals: torch.Tensor, wo: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Solid-angle density of ggx_directions: D(h) (n.h) / (4 |o.h|)."""
    return ggx_pdf_of(brdf.geometry(normals, wo, wi), alpha)


def ggx_pdf_of(g: brdf.Geometry, alpha: torch.Tensor) -> torch.Tensor:
    """ggx_pdf from the directions' cosines (P, N)."""
    h_dot_o = g.h_dot_o.clamp(min=brdf.EPS)
    return (brdf.ggx_distribution(alpha, g.n_dot_h) * g.n_dot_h / (4 * h_dot_o))[..., 0]


def _mis(n: int, seed: int, envmap: EnvironmentMap | None, normals: torch.Tensor, wo: torch.Tensor,
         roughness: torch.Tensor) -> RaySet:
    """Half the rays from the HDRI's luminance (when there is one), a quarter each from the cosine
    and GGX lobes; every ray weighted by the mixture pdf, so the estimate is unbiased (balance heuristic)."""
    n_light = n // 2 if envmap is not None else 0
    n_ggx = (n - n_light) // 2
    n_cos = n - n_light - n_ggx
    device = normals.device
    alpha = brdf.ggx_alpha(roughness)  # (P, 1)
    parts = []
    if n_light:
        light, _ = envmap.sample(_uniforms(n_light, 3, seed, True).to(envmap.device))
        parts.append(light.to(device)[None].expand(len(normals), -1, -1))
    parts.append(to_world(cosine_local(_uniforms(n_cos, 2, seed + 1, True).to(device)), normals))
    if n_ggx:
        parts.append(ggx_directions(_uniforms(n_ggx, 2, seed + 2, True).to(device), normals, wo, alpha))
    directions = torch.cat(parts, dim=1)
    cosine_pdf = (normals[:, None] * directions).sum(-1).clamp(min=0) / math.pi
    pdf = n_cos * cosine_pdf + n_ggx * ggx_pdf(directions, normals, wo, alpha)
    if n_light:
        pdf = pdf + n_light * envmap.pdf(directions.to(envmap.device)).to(device)
    return RaySet(directions, (pdf / n).clamp(min=1e-8))


def make_rays(kind: str, n: int, seed: int, *, envmap: EnvironmentMap | None = None,
              normals: torch.Tensor | None = None, wo: torch.Tensor | None = None,
              roughness: torch.Tensor | None = None, device: torch.device | str = "cpu") -> RaySet:
    """Draw n rays of a kind: uniform, stratified, importance (needs envmap), and the PER_PIXEL kinds
    cosine (needs normals) and mis (needs normals, wo, roughness (P, 1); uses envmap if given)."""
    if kind == "uniform":
        directions = _sphere(_uniforms(n, 2, seed, False))
        return RaySet(directions[None].to(device), torch.full((1, n), UNIFORM_SPHERE_PDF, device=device))
    if kind == "stratified":
        directions = _sphere(_uniforms(n, 2, seed, True))
        return RaySet(directions[None].to(device), torch.full((1, n), UNIFORM_SPHERE_PDF, device=device))
    if kind == "importance":
        if envmap is None:
            raise ValueError("importance sampling needs the environment map")
        directions, pdf = envmap.sample(_uniforms(n, 3, seed, True).to(envmap.device))
        return RaySet(directions[None].to(device), pdf[None].to(device))
    if kind in PER_PIXEL and normals is None:
        raise ValueError(f"{kind} sampling needs the per-pixel normals")
    if kind == "cosine":
        local = cosine_local(_uniforms(n, 2, seed, True).to(device))
        return RaySet(to_world(local, normals), (local[:, 2] / math.pi).clamp(min=1e-8)[None].expand(len(normals), n))
    if kind == "mis":
        if wo is None or roughness is None:
            raise ValueError("mis sampling needs the per-pixel view directions and roughness")
        return _mis(n, seed, envmap, normals, wo, roughness)
    raise ValueError(f"unknown sampling {kind!r}")
