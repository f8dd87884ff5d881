"""Analytic BRDF terms, each returning BRDF x cos(theta_i) for (pixel, ray) pairs.

Shapes: pixel quantities (P, C) broadcast against ray quantities (1 or P, N, C). Vectors are unit,
world space; wo points towards the camera, wi towards the light. Correct and energy-normalised:
the tests hold them to a white furnace (tests/backend/test_brdf.py).

GGX is Cycles' "Multiscatter GGX" as the Principled BSDF uses it: the single-scattering lobe times the
energy compensation of Turquin 2019 with Kulla and Conty's multi-bounce Fresnel, which Cycles applies
(microfacet_ggx_preserve_energy): f = f_ss (1 + F_ms (1 - E) / E), E(mu_o, roughness) the directional
albedo of f_ss with F = 1. E comes from a 32 x 32 table (backend/data/ggx_albedo.safetensors, written
by `python -m backend.brdf`), bilinear in (roughness, n.o) like Cycles' own table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

EPS = 1e-6
ALBEDO_TABLE = Path(__file__).parent / "data" / "ggx_albedo.safetensors"
ALBEDO_TABLE_SIZE = 32  # nodes over roughness and over n.o, both at i / 31 (Cycles: 32 x 32 too)
ALBEDO_TABLE_SAMPLES = 128  # the stored table: 128 x 128 VNDF quadrature points per node
ALBEDO_RADIAL_GRADE = 4  # quadrature points crowd towards the rim of the VNDF disk (see ggx_albedo_quadrature)
ALBEDO_MIN_MU = 1e-4  # the n.o = 0 column is evaluated here, as Cycles' table is (no limit at n.o = 0)
SCHLICK_AVERAGE = 1 / 21  # 2 int_0^1 (1 - mu)^5 mu dmu: the hemispherical average of Schlick's term


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


def ggx_single_scatter(f0: torch.Tensor, roughness: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Microfacet GGX with height-correlated Smith G and Schlick Fresnel: D G F / (4 n.o), times cos.

    Light that scatters more than once between the microfacets is lost: a white metal (F0 = 1) in a
    white furnace reflects E(n.o, roughness), down to 0.31 at roughness 1 and normal view."""
    alpha = ggx_alpha(roughness)
    d = ggx_distribution(alpha, g.n_dot_h)
    masking = 1 / (1 + smith_lambda(alpha, g.n_dot_o) + smith_lambda(alpha, g.cos_i))
    f = schlick_fresnel(f0[:, None], g.h_dot_o)
    visible = (g.n_dot_i > 0).to(d.dtype)
    return d * masking * f / (4 * g.n_dot_o) * visible


def ggx_specular(f0: torch.Tensor, roughness: torch.Tensor, g: Geometry) -> torch.Tensor:
    """GGX with multiple-scattering energy compensation, as Cycles' Multiscatter GGX: f_ss (1 + F_ms (1 - E) / E)."""
    compensation = ggx_energy_compensation(f0, roughness, g.n_dot_o[:, 0])
    return ggx_single_scatter(f0, roughness, g) * compensation[:, None]


# ----------------------------------------------------------------------------------------------
# Directional albedo of single-scatter GGX and the energy compensation


def ggx_albedo_quadrature(roughness: torch.Tensor, mu: torch.Tensor, samples: int = ALBEDO_TABLE_SAMPLES
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Directional albedo of ggx_single_scatter at view cosine mu: (E, E5), each (R, M) for roughness (R,), mu (M,).

    E is the albedo with F = 1, E5 the albedo with F = (1 - h.o)^5, so that Schlick's Fresnel gives
    F0 E + (1 - F0) E5. Deterministic, in float64: a samples x samples product rule on the unit square
    mapped to visible normals (Heitz 2018), each point weighing G2 / G1 = (1 + L_o) / (1 + L_o + L_i).
    The radial coordinate is graded, u = 1 - (1 - v)^4 at the midpoints v, because at low roughness all
    the energy that is lost comes from the disk's rim (facets steep enough to reflect below the horizon
    are a fraction ~alpha^2 of the visible ones): midpoints in u alone misplace E by up to 3e-3 there.
    Matches Cycles' own table (ggx_E, Monte Carlo) to about 1e-4.
    """
    if roughness.numel() > 1:  # one roughness at a time keeps the (M, S) temporaries small
        rows = [ggx_albedo_quadrature(r.reshape(1), mu, samples) for r in roughness]
        return tuple(torch.cat(parts) for parts in zip(*rows, strict=True))
    dtype = torch.float64
    v = (torch.arange(samples, dtype=dtype) + 0.5) / samples
    grade = ALBEDO_RADIAL_GRADE
    radial, radial_weight = 1 - (1 - v) ** grade, grade * (1 - v) ** (grade - 1)  # du = radial_weight dv
    u1, u2 = (t.reshape(-1) for t in torch.meshgrid(radial, v, indexing="ij"))
    point_weight = radial_weight.repeat_interleave(samples)  # (S,), u1's weight, matching u1's order
    alpha = ggx_alpha(roughness.to(dtype))[:, None, None]  # (1, 1, 1)
    mu = mu.to(dtype).clamp(ALBEDO_MIN_MU, 1)[None, :, None]  # (1, M, 1)
    view_x = torch.sqrt(1 - mu * mu)
    # the view in the stretched configuration, and its frame T1 = y, T2 = (-z, 0, x)
    length = torch.sqrt((alpha * view_x) ** 2 + mu * mu)
    sx, sz = alpha * view_x / length, mu / length
    radius, phi = torch.sqrt(u1), 2 * math.pi * u2
    t1, t2 = radius * torch.cos(phi), radius * torch.sin(phi)
    blend = (1 + sz) / 2
    t2 = (1 - blend) * torch.sqrt((1 - t1 * t1).clamp(min=0)) + blend * t2
    t3 = torch.sqrt((1 - t1 * t1 - t2 * t2).clamp(min=0))
    hx, hy, hz = alpha * (t3 * sx - t2 * sz), alpha * t1, (t2 * sx + t3 * sz).clamp(min=0)
    inv = torch.rsqrt(hx * hx + hy * hy + hz * hz)
    hx, hz = hx * inv, hz * inv
    h_dot_o = hx * view_x + hz * mu
    n_dot_i = 2 * h_dot_o * hz - mu

    def lam(cos):  # smith_lambda, broadcast over (1, M, S)
        cos = cos.clamp(min=EPS)
        return (torch.sqrt(1 + alpha * alpha * (1 - cos * cos).clamp(min=0) / (cos * cos)) - 1) / 2

    lambda_o = lam(mu)
    weight = torch.where(n_dot_i > 0, (1 + lambda_o) / (1 + lambda_o + lam(n_dot_i)), 0.0) * point_weight
    schlick = (1 - h_dot_o).clamp(0, 1) ** 5
    return weight.mean(-1), (weight * schlick).mean(-1)


def ggx_average_albedo(roughness: torch.Tensor, samples: int = ALBEDO_TABLE_SAMPLES, nodes: int = 32) -> torch.Tensor:
    """E_avg = 2 int_0^1 E(mu) mu dmu per roughness (R,), by Gauss-Legendre over mu."""
    x, w = _gauss_legendre(nodes)
    mu = (x + 1) / 2
    albedo, _ = ggx_albedo_quadrature(roughness, mu, samples)
    return (albedo * (mu * w)[None]).sum(-1)  # 2 x (1/2 dx) x mu


def _gauss_legendre(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [-1, 1] (Golub-Welsch), float64."""
    k = torch.arange(1, nodes, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    values, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return values, 2 * vectors[0] ** 2


def write_albedo_table(path: Path = ALBEDO_TABLE, size: int = ALBEDO_TABLE_SIZE,
                       samples: int = ALBEDO_TABLE_SAMPLES) -> None:
    """Compute and store the table ggx_energy_compensation reads (a few seconds; deterministic)."""
    from safetensors.torch import save_file

    nodes = torch.arange(size, dtype=torch.float64) / (size - 1)
    albedo, schlick = ggx_albedo_quadrature(nodes, nodes, samples)
    tensors = {"E": albedo, "E5": schlick, "E_avg": ggx_average_albedo(nodes, samples)}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"rows": "roughness i/(n-1)", "columns": "n.o j/(n-1), the first at n.o = 1e-4",
                        "samples": f"{samples} x {samples}, radial grade {ALBEDO_RADIAL_GRADE}",
                        "by": "backend.brdf.write_albedo_table"})


@functools.cache
def _load_albedo_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """((R, M, 2) table of E and E5, (R,) E_avg) on the device in the dtype, loaded once per pair."""
    from safetensors.torch import load_file

    with torch.inference_mode(False):  # first loaded under the renderer's inference mode, then kept for training
        tensors = load_file(str(ALBEDO_TABLE))
        table = torch.stack([tensors["E"], tensors["E5"]], -1)
        return table.to(device=device, dtype=dtype), tensors["E_avg"].to(device=device, dtype=dtype)


@torch.compiler.disable  # under torch.compile: a graph break, and the cache as in eager mode
def _albedo_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_albedo_tables(device, dtype)


def _lerp_index(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower node of x in [0, 1] over `size` nodes at i / (size - 1), and the fraction past it."""
    position = x.clamp(0, 1) * (size - 1)
    lower = position.floor().clamp(max=size - 2)
    return lower.long(), position - lower


def ggx_albedo(roughness: torch.Tensor, n_dot_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, E5, E_avg) of single-scatter GGX for roughness (P, 1) and n.o (P, 1): each (P, 1), from the table."""
    table, average = _albedo_tables(roughness.device, roughness.dtype)
    rows, columns = table.shape[:2]
    i, fi = _lerp_index(roughness, rows)
    j, fj = _lerp_index(n_dot_o.to(roughness.dtype), columns)
    i, j = i[:, 0], j[:, 0]
    top = torch.lerp(table[i, j], table[i, j + 1], fj)  # (P, 2)
    bottom = torch.lerp(table[i + 1, j], table[i + 1, j + 1], fj)
    both = torch.lerp(top, bottom, fi)
    avg = torch.lerp(average[i], average[i + 1], fi[:, 0])[:, None]
    return both[:, :1], both[:, 1:], avg


def ggx_energy_compensation(f0: torch.Tensor, roughness: torch.Tensor, n_dot_o: torch.Tensor) -> torch.Tensor:
    """1 + F_ms (1 - E) / E per pixel and channel, (P, 3): what ggx_specular multiplies f_ss by.

    Cycles' microfacet_ggx_preserve_energy: F_ms = F_ss E_avg / (1 - F_ss (1 - E_avg)), the share of the
    multiply scattered energy that survives its Fresnel bounces (Kulla and Conty 2017), with F_ss the
    hemispherical average of Schlick's Fresnel, F0 + (1 - F0) / 21. F0 = 1 makes the lobe's albedo 1.
    """
    albedo, _, average = ggx_albedo(roughness, n_dot_o)
    return _compensation(f0, albedo, average)


def _compensation(f0: torch.Tensor, albedo: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    f_ss = f0 + (1 - f0) * SCHLICK_AVERAGE
    f_ms = f_ss * average / (1 - f_ss * (1 - average))
    return 1 + f_ms * (1 - albedo) / albedo


def ggx_specular_albedo(f0: torch.Tensor, roughness: torch.Tensor, n_dot_o: torch.Tensor) -> torch.Tensor:
    """Directional albedo of ggx_specular at view cosine n.o (P, 1): (F0 E + (1 - F0) E5) x compensation, (P, 3)."""
    albedo, schlick, average = ggx_albedo(roughness, n_dot_o)
    return (f0 * albedo + (1 - f0) * schlick) * _compensation(f0, albedo, average)


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


def diffuse_weight(f0: torch.Tensor, g: Geometry, roughness: torch.Tensor | None = None) -> torch.Tensor:
    """Energy left to the diffuse layer under the specular one, (P, 1, 3): per pixel, not per ray, so
    diffuse + specular stays within the white furnace (tests/backend/test_brdf.py).

    With the GGX layer's roughness (P, 1): 1 - ggx_specular_albedo, what the compensated lobe does not
    reflect. Cycles' Principled BSDF layers its dielectric specular over the diffuse base the same way: it
    weights the base by 1 - the lobe's albedo estimate, E (1 + F_ms (1 - E) / E) (F0 + (1 - F0) s), which
    is ggx_specular_albedo when s is E5 / E (Cycles' s, the mean Fresnel factor over the visible normals,
    is up to 0.01 larger at grazing views). Without roughness: 1 - F(n.o), the smooth-surface limit of the
    same, which darkens rough dielectrics' rims (a white base colour at roughness 0.7 and n.o = 0.05:
    diffuse + specular 0.34, Cycles 0.99).
    """
    return diffuse_weight_at(f0, g.n_dot_o[:, 0], roughness)[:, None]


def diffuse_weight_at(f0: torch.Tensor, n_dot_o: torch.Tensor, roughness: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """diffuse_weight from the view cosine n.o (P, 1) alone, (P, 3) (the fast paths' per-pixel colour)."""
    if roughness is None:
        return 1 - schlick_fresnel(f0, n_dot_o)
    return 1 - ggx_specular_albedo(f0, roughness, n_dot_o)


if __name__ == "__main__":
    write_albedo_table()
    print(f"wrote {ALBEDO_TABLE}")
