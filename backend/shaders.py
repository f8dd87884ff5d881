"""Shaders: per pixel, a Monte Carlo estimate over light rays of the reflected radiance.

Every shader is a torch Module with the same call: shader(pixels, rays, radiance) -> (P, 3), where
radiance (1 or P, N, 3) is Li along rays.directions. The classical shaders and the default neural
shader are unbiased estimators (mean of f cos Li / pdf); the paper-faithful shader is the paper's
learned mean over rays and ignores the pdf, as the paper does (uniform rays only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import brdf
from .sampling import RaySet


@dataclass
class PixelInputs:
    """Foreground pixels' G-buffer values, (P, C) tensors on the shading device."""

    albedo: torch.Tensor  # (P, 3)
    specular: torch.Tensor  # (P, 3) F0 colour
    roughness: torch.Tensor  # (P, 1)
    normal: torch.Tensor  # (P, 3)
    wo: torch.Tensor  # (P, 3)

    def __len__(self) -> int:
        return self.albedo.shape[0]

    def slice(self, start: int, stop: int) -> PixelInputs:
        return PixelInputs(*(t[start:stop] for t in (self.albedo, self.specular, self.roughness,
                                                     self.normal, self.wo)))


def view_cosine(pixels: PixelInputs) -> torch.Tensor:
    """n.o per pixel (P, 1), clamped to EPS as brdf.geometry clamps it."""
    return (pixels.normal * pixels.wo).sum(-1, keepdim=True).clamp(min=brdf.EPS)


def layered_diffuse(pixels: PixelInputs) -> torch.Tensor:
    """albedo x (1 - the compensated GGX layer's albedo at n.o), (P, 3): the reflectance of the Lambertian
    base under Cycles' Principled specular layer (brdf.diffuse_weight)."""
    return pixels.albedo * brdf.diffuse_weight_at(pixels.specular, view_cosine(pixels), pixels.roughness)


def monte_carlo(brdf_cos: torch.Tensor, radiance: torch.Tensor, pdf: torch.Tensor) -> torch.Tensor:
    """mean_k f_k cos_k Li_k / pdf_k over the ray axis."""
    return (brdf_cos * radiance / pdf[..., None]).mean(dim=1)


class Shader(nn.Module):
    """Base class; `name` is what users call the shader by (job option `model`)."""

    name = "shader"
    unbiased = True  # estimates mean f cos Li / pdf, so any ray set is valid

    def brdf_cos(self, pixels: PixelInputs, wi: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lambertian(self, pixels: PixelInputs) -> torch.Tensor | None:
        """(P, 3) reflectance rho of a Lambertian lobe rho / pi cos that brdf_cos holds (with a learned gain
        of 1 at initialisation), or None. The renderer integrates that lobe exactly as a control variate."""
        return None

    def forward(self, pixels: PixelInputs, rays: RaySet, radiance: torch.Tensor) -> torch.Tensor:
        return monte_carlo(self.brdf_cos(pixels, rays.directions), radiance, rays.pdf)


class Lambert(Shader):
    name = "lambert"

    def brdf_cos(self, pixels, wi):
        return brdf.lambert(pixels.albedo, brdf.geometry(pixels.normal, pixels.wo, wi))

    def lambertian(self, pixels):
        return pixels.albedo


class _DiffuseSpecular(Shader):
    """Lambert diffuse under a specular lobe, the diffuse weighted by what the lobe does not reflect."""

    def specular_lobe(self, pixels, g):
        raise NotImplementedError

    def diffuse_weight(self, pixels, n_dot_o):
        """(P, 3) from the view cosine (P, 1): per pixel, not per ray."""
        return brdf.diffuse_weight_at(pixels.specular, n_dot_o)

    def brdf_cos(self, pixels, wi):
        g = brdf.geometry(pixels.normal, pixels.wo, wi)
        diffuse = brdf.lambert(pixels.albedo, g) * self.diffuse_weight(pixels, g.n_dot_o[:, 0])[:, None]
        return diffuse + self.specular_lobe(pixels, g)

    def lambertian(self, pixels):
        return pixels.albedo * self.diffuse_weight(pixels, view_cosine(pixels))


class BlinnPhong(_DiffuseSpecular):
    name = "blinn-phong"

    def specular_lobe(self, pixels, g):
        return brdf.blinn_phong_specular(pixels.specular, pixels.roughness, g)


class GGX(_DiffuseSpecular):
    name = "ggx"

    def specular_lobe(self, pixels, g):
        return brdf.ggx_specular(pixels.specular, pixels.roughness, g)

    def diffuse_weight(self, pixels, n_dot_o):
        """1 - the compensated lobe's albedo, as Cycles' Principled BSDF layers its specular over the base."""
        return brdf.diffuse_weight_at(pixels.specular, n_dot_o, pixels.roughness)


class LinearNeuralShader(Shader):
    """The default shader: the GGX model with learned, non-negative per-ray gains.

    f cos = cos (albedo / pi (1 - E_spec) exp(a) + f_ggx exp(b)), where (a, b) (3 + 3 channels) come from
    a small MLP over per-pixel features (albedo, F0, roughness, n.o) and per-ray features
    (n.i, n.h, h.o, i.o). Linear in Li and non-negative per ray, so it is an unbiased estimator under
    any ray set (importance sampling included) and exact in exposure. The first layer is split into a
    per-pixel part, computed once per pixel, and a per-ray part. The last layer starts at zero, so
    the untrained network is exactly the GGX baseline and training learns what Cycles adds to it.
    """

    name = "default"
    PIXEL_FEATURES = 8
    RAY_FEATURES = 4
    MAX_LOG_GAIN = 4.0

    def __init__(self, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.pixel_in = nn.Linear(self.PIXEL_FEATURES, hidden)
        self.ray_in = nn.Linear(self.RAY_FEATURES, hidden, bias=False)
        self.body = nn.Sequential(*[m for _ in range(layers - 1) for m in (nn.ReLU(), nn.Linear(hidden, hidden))],
                                  nn.ReLU())
        self.out = nn.Linear(hidden, 6)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {"arch": "linear-gain", "hidden": self.hidden, "layers": self.layers}

    def brdf_cos(self, pixels, wi):
        g = brdf.geometry(pixels.normal, pixels.wo, wi)
        n_dot_o = g.n_dot_o[:, 0]
        pixel_features = torch.cat([pixels.albedo, pixels.specular, pixels.roughness, n_dot_o], dim=-1)
        ray_features = torch.cat([g.n_dot_i, g.n_dot_h, g.h_dot_o, (wi * pixels.wo[:, None]).sum(-1, keepdim=True)
                                  ], dim=-1)
        hidden = self.pixel_in(pixel_features)[:, None] + self.ray_in(ray_features)
        gains = torch.exp(self.out(self.body(hidden)).clamp(max=self.MAX_LOG_GAIN))
        diffuse = brdf.lambert(pixels.albedo, g) * brdf.diffuse_weight(pixels.specular, g, pixels.roughness)
        specular = brdf.ggx_specular(pixels.specular, pixels.roughness, g)
        return diffuse * gains[..., :3] + specular * gains[..., 3:]

    def lambertian(self, pixels):
        return layered_diffuse(pixels)


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[x, sin(2^k pi x), cos(2^k pi x)] for k < frequencies, as NeRF."""
    scales = (2.0 ** torch.arange(frequencies, device=x.device, dtype=x.dtype)) * math.pi
    angles = (x[..., None] * scales).flatten(-2)
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=-1)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PaperShader(Shader):
    """The PBNDS paper's shader as its public code builds it (docs/design.md section 5).

    Per (pixel, ray): 11 values (Li max(n.i, 0), albedo, roughness, scalar specular, normal) through
    an 8-frequency positional encoding (187) into 256 x 4, then [feature, n.i, n.o, h.n, h.o, wo]
    (263) into 128 x 3 -> 3, averaged over rays. Li enters the network, so it is not linear in Li.
    """

    name = "pbnds-paper"
    unbiased = False
    FREQUENCIES = 8

    def __init__(self):
        super().__init__()
        inputs = 11 * (1 + 2 * self.FREQUENCIES)
        self.encoder = mlp([inputs, 256, 256, 256, 256])
        self.decoder = mlp([256 + 7, 128, 128, 128, 3])

    def config(self) -> dict:
        return {"arch": "pbnds-paper"}

    def forward(self, pixels, rays, radiance):
        g = brdf.geometry(pixels.normal, pixels.wo, rays.directions)
        count = g.n_dot_i.shape[1]
        specular = (pixels.specular * torch.tensor([0.2126, 0.7152, 0.0722], device=pixels.specular.device)
                    ).sum(-1, keepdim=True)
        per_pixel = torch.cat([pixels.albedo, pixels.roughness, specular, pixels.normal], dim=-1)
        values = torch.cat([radiance * g.cos_i, per_pixel[:, None].expand(-1, count, -1)], dim=-1)
        feature = self.encoder(positional_encoding(values, self.FREQUENCIES))
        angles = torch.cat([g.n_dot_i, g.n_dot_o.expand_as(g.n_dot_i), g.n_dot_h, g.h_dot_o,
                            pixels.wo[:, None].expand(-1, count, -1)], dim=-1)
        return self.decoder(torch.cat([feature, angles], dim=-1)).mean(dim=1)


CLASSICAL = {cls.name: cls for cls in (Lambert, BlinnPhong, GGX)}
