"""Analytic BRDF terms, each returning BRDF x cos(theta_i) for (pixel, ray) pairs.

Shapes: pixel quantities (P, C) broadcast against ray quantities (1 or P, N, C). Vectors are unit,
world space; wo points towards the camera, wi towards the light. Correct and energy-normalised:
the tests hold them to a white furnace (tests/test_brdf.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-6


@dataclass
class Geometry:
    """Cosines between the pixel's vectors and a batch of light directions."""

    n_dot_i: torch.Tensor  # (P, N, 1), not clamped
    n_dot_o: torch.Tensor  # (P, 1, 1), clamped to EPS (grazing and back-facing views)
    n_dot_h: torch.Tensor  # (P, N, 1)
    h_dot_o: torch.Tensor  # (P, N, 1)

    @property
    def cos_i(self) -> torch.Tensor:
        return self.n_dot_i.clamp(min=0)


def geometry(normal: torch.Tensor, wo: torch.Tensor, wi: torch.Tensor) -> Geometry:
    n = normal[:, None]
    o = wo[:, None]
    h = wi + o
    h = h / h.norm(dim=-1, keepdim=True).clamp(min=EPS)
    return Geometry(n_dot_i=(n * wi).sum(-1, keepdim=True),
                    n_dot_o=(n * o).sum(-1, keepdim=True).clamp(min=EPS),
                    n_dot_h=(n * h).sum(-1, keepdim=True).clamp(min=0),
                    h_dot_o=(h * o).sum(-1, keepdim=True).clamp(min=0))


def schlick_fresnel(f0: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return f0 + (1 - f0) * (1 - cos).clamp(0, 1) ** 5


def lambert(albedo: torch.Tensor, g: Geometry) -> torch.Tensor:
    return albedo[:, None] / math.pi * g.cos_i


def ggx_alpha(roughness: torch.Tensor) -> torch.Tensor:
    """Blender's mapping: alpha = roughness^2, kept above a tiny floor for mirror-like surfaces."""
    return (roughness * roughness).clamp(min=1e-3)


def ggx_distribution(alpha: torch.Tensor, n_dot_h: torch.Tensor) -> torch.Tensor:
    a2 = (alpha * alpha)[:, None]
    return a2 / (math.pi * (n_dot_h * n_dot_h * (a2 - 1) + 1) ** 2)


def smith_lambda(alpha: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    cos = cos.clamp(min=EPS)
    tan2 = (1 - cos * cos).clamp(min=0) / (cos * cos)
    return (torch.sqrt(1 + (alpha * alpha)[:, None] * tan2) - 1) / 2


def ggx_specular(f0: torch.Tensor, roughness: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Microfacet GGX with height-correlated Smith G and Schlick Fresnel: D G F / (4 n.o), times cos."""
    alpha = ggx_alpha(roughness)
    d = ggx_distribution(alpha, g.n_dot_h)
    masking = 1 / (1 + smith_lambda(alpha, g.n_dot_o) + smith_lambda(alpha, g.cos_i))
    f = schlick_fresnel(f0[:, None], g.h_dot_o)
    visible = (g.n_dot_i > 0).to(d.dtype)
    return d * masking * f / (4 * g.n_dot_o) * visible


def blinn_phong_exponent(roughness: torch.Tensor) -> torch.Tensor:
    """The Phong exponent whose lobe matches GGX alpha = roughness^2 near the peak (Walter 2007)."""
    alpha = ggx_alpha(roughness)
    return (2 / (alpha * alpha) - 2).clamp(min=0)


def blinn_phong_specular(f0: torch.Tensor, roughness: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Normalised Blinn-Phong with Schlick Fresnel, times cos.

    The normalisation (s + 2)(s + 4) / (8 pi (2^(-s/2) + s)) makes the lobe reflect exactly F at
    normal view (Akenine-Moller et al., Real-Time Rendering); the common (s + 8) / (8 pi) overshoots.
    """
    s = blinn_phong_exponent(roughness)[:, None]
    norm = (s + 2) * (s + 4) / (8 * math.pi * (torch.exp2(-s / 2) + s))
    f = schlick_fresnel(f0[:, None], g.h_dot_o)
    return norm * g.n_dot_h**s * f * g.cos_i


def diffuse_weight(f0: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Energy left to the diffuse layer, 1 - F(n.o): what the specular layer did not reflect towards
    the viewer. Not per ray, so diffuse + specular stays within the white furnace (tests/test_brdf.py)."""
    return 1 - schlick_fresnel(f0[:, None], g.n_dot_o)
