"""Light-ray sets for the Monte Carlo estimate L = mean_k f(wi_k) Li(wi_k) / pdf(wi_k).

All sets are seeded and drawn on the CPU, so the same seed gives the same rays on every device.
Sphere sets (uniform, stratified, importance) are shared by every pixel of a frame, as the paper
does, which keeps animations flicker-free and lets a relight reuse everything but Li; the cosine
set is one hemisphere per pixel, rotated to its normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .envmap import EnvironmentMap

UNIFORM_SPHERE_PDF = 1 / (4 * math.pi)


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


def make_rays(kind: str, n: int, seed: int, *, envmap: EnvironmentMap | None = None,
              normals: torch.Tensor | None = None, device: torch.device | str = "cpu") -> RaySet:
    """Draw n rays of a kind: uniform, stratified, importance (needs envmap), cosine (needs normals)."""
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
    if kind == "cosine":
        if normals is None:
            raise ValueError("cosine sampling needs the per-pixel normals")
        u = _uniforms(n, 2, seed, True).to(device)
        r = torch.sqrt(u[:, 0])
        phi = 2 * math.pi * u[:, 1]
        local = torch.stack([r * torch.cos(phi), r * torch.sin(phi), torch.sqrt((1 - u[:, 0]).clamp(min=0))], -1)
        tangent, bitangent = tangent_frame(normals)
        directions = (local[None, :, 0:1] * tangent[:, None] + local[None, :, 1:2] * bitangent[:, None]
                      + local[None, :, 2:3] * normals[:, None])
        return RaySet(directions, (local[:, 2] / math.pi).clamp(min=1e-8)[None].expand(len(normals), n))
    raise ValueError(f"unknown sampling {kind!r}")
