"""Equirectangular environment maps in Blender's world convention (docs/job-format.md).

u = 0.5 - atan2(d.y, d.x) / 2pi is the column fraction from the left, v = acos(d.z) / pi the row
fraction from the top of the file: the image centre faces +X, u = 0.25 faces +Y, row 0 is the zenith.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IRRADIANCE_ROWS = 32  # rows of the irradiance table (2:1)
IRRADIANCE_BLOCK_ROWS = 16  # rows of the blocks it sums the radiance into (2:1)


def direction_to_uv(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.remainder(0.5 - torch.atan2(d[..., 1], d[..., 0]) / (2 * math.pi), 1.0)
    v = torch.acos(d[..., 2].clamp(-1.0, 1.0)) / math.pi
    return u, v


def uv_to_direction(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    phi = 2 * math.pi * (0.5 - u)
    theta = math.pi * v
    return torch.stack([torch.sin(theta) * torch.cos(phi), torch.sin(theta) * torch.sin(phi),
                        torch.cos(theta)], dim=-1)


def _texel_centres(rows: int, device) -> torch.Tensor:
    """Directions (rows, 2 rows, 3) through the texel centres of a 2:1 map."""
    v = (torch.arange(rows, device=device) + 0.5) / rows
    u = (torch.arange(2 * rows, device=device) + 0.5) / (2 * rows)
    return uv_to_direction(u[None, :].expand(rows, -1), v[:, None].expand(-1, 2 * rows))


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 709 luminance of linear RGB, the weights Blender uses."""
    return rgb[..., 0] * 0.2126 + rgb[..., 1] * 0.7152 + rgb[..., 2] * 0.0722


class EnvironmentMap:
    """An HDRI on a device with bilinear lookup and luminance importance sampling (exact pdf)."""

    def __init__(self, image, device: torch.device | str = "cpu"):
        self.image = torch.as_tensor(image, dtype=torch.float32, device=device)  # (h, 2h, 3)
        self.height, self.width = self.image.shape[:2]
        self._distribution: tuple[torch.Tensor, torch.Tensor] | None = None
        self._irradiance: EnvironmentMap | None = None

    @property
    def device(self) -> torch.device:
        return self.image.device

    def rotated(self, angle_z: float) -> EnvironmentMap:
        """The world turned by angle_z radians about +Z (counter-clockwise seen from above): radiance that
        came from d now comes from Rz(angle_z) d. A Mapping node (Point) rotates the lookup vector instead,
        so its Z rotation r matches angle_z = -r."""
        shift = angle_z / (2 * math.pi) * self.width
        whole = math.floor(shift)
        frac = shift - whole
        rolled = torch.roll(self.image, shifts=-whole, dims=1)
        image = (1 - frac) * rolled + frac * torch.roll(rolled, shifts=-1, dims=1)
        return EnvironmentMap(image, self.device)

    def lookup(self, d: torch.Tensor) -> torch.Tensor:
        """Bilinear radiance for unit directions d (..., 3): wraps in u, clamps at the poles."""
        u, v = direction_to_uv(d)
        x = u * self.width - 0.5
        y = (v * self.height - 0.5).clamp(0, self.height - 1)
        x0 = torch.floor(x)
        y0 = torch.floor(y).clamp(max=self.height - 2) if self.height > 1 else torch.zeros_like(y)
        fx = (x - x0)[..., None]
        fy = (y - y0)[..., None]
        x0 = x0.long() % self.width
        x1 = (x0 + 1) % self.width
        y0 = y0.long()
        y1 = (y0 + 1).clamp(max=self.height - 1)
        img = self.image
        top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
        bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
        return top * (1 - fy) + bottom * fy

    def irradiance(self, normals: torch.Tensor) -> torch.Tensor:
        """E(n), the integral of L(w) max(n.w, 0) over the sphere, at unit normals (..., 3): (..., 3).

        What a Lambertian surface receives, without ray noise. The map's texels are summed, with their exact
        solid angles, into IRRADIANCE_BLOCK_ROWS x 2 IRRADIANCE_BLOCK_ROWS blocks as vectors V = sum L dw w per colour
        channel: n.V is then exact for every block wholly above the surface, wherever the light lies in it
        (a sun is not moved to the block's centre); only blocks cut by the horizon are approximated.
        E is tabulated over IRRADIANCE_ROWS x 2 IRRADIANCE_ROWS normals and looked up bilinearly (it is smooth:
        a cosine lobe wide). ~10 ms on 2 CPU cores: a relight computes it for every new HDRI.
        """
        if self._irradiance is None:
            rows = IRRADIANCE_BLOCK_ROWS
            edges = torch.linspace(0, math.pi, self.height + 1, device=self.device)
            solid_angle = 2 * math.pi / self.width * (torch.cos(edges[:-1]) - torch.cos(edges[1:]))
            power = self.image * solid_angle[:, None, None]  # (H, W, 3)
            vectors = power[..., :, None] * _texel_centres(self.height, self.device)[..., None, :]  # (H, W, 3, 3)
            scale = self.height * self.width / (rows * 2 * rows)  # block mean -> block sum
            vectors = F.adaptive_avg_pool2d(vectors.reshape(self.height, self.width, 9).permute(2, 0, 1)[None],
                                            (rows, 2 * rows))[0].reshape(3, 3, -1) * scale  # (channel, xyz, S)
            table = _texel_centres(IRRADIANCE_ROWS, self.device).reshape(-1, 3)
            irradiance = torch.stack([(table @ vectors[c]).clamp(min=0).sum(-1) for c in range(3)], dim=-1)
            self._irradiance = EnvironmentMap(irradiance.reshape(IRRADIANCE_ROWS, 2 * IRRADIANCE_ROWS, 3),
                                              self.device)
        return self._irradiance.lookup(normals)

    def _texel_distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cdf over texels, probability per texel) proportional to dilated luminance x sin(theta)."""
        if self._distribution is None:
            theta = (torch.arange(self.height, device=self.device) + 0.5) / self.height * math.pi
            # Dilate by one texel: the bilinear lookup spreads a texel's radiance into its neighbours,
            # and every direction with radiance must have a non-zero pdf for the estimate to be unbiased.
            lum = luminance(self.image)[None, None]
            lum = torch.nn.functional.pad(lum, (1, 1, 0, 0), mode="circular")
            lum = torch.nn.functional.max_pool2d(lum, 3, stride=1, padding=(1, 0))[0, 0]
            weight = lum * torch.sin(theta)[:, None]
            weight = weight.flatten().double()
            if weight.sum() <= 0:  # a black map: fall back to uniform over the sphere
                weight = torch.sin(theta)[:, None].expand(self.height, self.width).flatten().double()
            prob = weight / weight.sum()
            self._distribution = (torch.cumsum(prob, 0), prob)
        return self._distribution

    def sample(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance-sample directions from uniform numbers u (N, 3) in [0, 1): (directions, pdf).

        u[:, 0] picks a texel through the luminance CDF; u[:, 1:] place the point inside it.
        The pdf is with respect to solid angle and exact for this piecewise-constant density.
        """
        cdf, prob = self._texel_distribution()
        index = torch.searchsorted(cdf, u[:, 0].double().to(self.device), right=True).clamp(max=cdf.numel() - 1)
        row = torch.div(index, self.width, rounding_mode="floor")
        col = index % self.width
        uu = (col.float() + u[:, 1].to(self.device)) / self.width
        vv = (row.float() + u[:, 2].to(self.device)) / self.height
        sin_theta = torch.sin(vv * math.pi).clamp(min=1e-6)
        pdf = prob[index].float() * (self.width * self.height) / (2 * math.pi**2 * sin_theta)
        return uv_to_direction(uu, vv), pdf

    def pdf(self, d: torch.Tensor) -> torch.Tensor:
        """Solid-angle density of sample() at directions d (..., 3)."""
        _, prob = self._texel_distribution()
        u, v = direction_to_uv(d)
        col = (u * self.width).long().clamp(0, self.width - 1)
        row = (v * self.height).long().clamp(0, self.height - 1)
        p_texel = prob[row * self.width + col].float()
        sin_theta = torch.sin(v * math.pi).clamp(min=1e-6)
        return p_texel * (self.width * self.height) / (2 * math.pi**2 * sin_theta)
