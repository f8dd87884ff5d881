"""Screen-space light transport: cast shadows, one-bounce diffuse light and reflections from the G-buffer.

The shader lights every pixel by the whole HDRI, as if nothing stood in the way. What the depth buffer
shows of the scene corrects that physically, before any network (the shadow net only refines these terms):

- visibility (1, 1, H, W): the share of the HDRI's cosine-weighted direct light that reaches the pixel,
  sum_k w_k cos_k V_k / sum_k w_k cos_k over K directions, half importance-sampled from the HDRI's luminance
  and half stratified over the sphere (w_k = luminance / the mixture's pdf); 1 where nothing blocks. The
  pixels of a tile take different sets of K, and both sums are filtered before they are divided, which pools
  the neighbours' directions. For the diffuse layer this is exactly the visible fraction of the light; the
  shaded image is unshadowed x visibility.
- bounce (1, 3, H, W): light that on-screen surfaces send into the pixel's diffuse layer,
  albedo (1 - the specular layer's albedo) mean_k L(hit_k) over cosine-distributed rays, where L is the
  direct-lit image at the pixel a ray hits (a ray that escapes sees the HDRI, which the shading holds).
  A ray that meets the side of an object the camera does not see (the surface at its hit pixel faces away
  from it: the inside of a torus's near tube seen from the hole, a ball's far side seen from the floor
  behind it) takes that side as diffuse, of the visible side's albedo, facing the ray: L = albedo E(-d) / pi
  with E the HDRI's irradiance. Without it the visibility takes the HDRI light such a ray blocks away and
  nothing gives any back: concave objects come out too dark.
- reflection (1, 3, H, W): the same through every pixel's GGX lobe: G + (1 - B - V) S, objects seen in a
  glossy floor, the sunlit ground in a rough metal's side, in place of the sky the shading put there. G = mean_k
  (f cos / pdf)_k L(hit_k) is the light of the surfaces the rays meet. L(hit) is not the image at the hit
  pixel, which is what the surface shows the camera: a metal shows the pixel what it reflects the other
  way. It is the hit's diffuse light (seen alike from everywhere) plus one GGX ray onwards from it, about
  the way back, into the HDRI, weighted as the GGX half of an MIS estimate whose light-sampled half is
  left out (a rough lobe that happens to meet a lamp would be a firefly; a mirror keeps what it meets).
  B is the share of the lobe's sky that the surfaces hide, S the shading's (unshadowed) specular part. The
  image multiplies the whole shading by the visibility V, which is the diffuse layer's (cosine-weighted);
  the specular layer's own is its lobe's, 1 - B, so the term swaps V S for (1 - B) S. Dimming S by both
  would shadow it twice for the same occluders: a rough lobe, close to the cosine one, by about V^2, and a
  glossy floor in a sun's shadow would lose the sky it mirrors. (The term is negative where a dark object
  hides a bright sky.)
  B = hidden / total, both estimated from the GGX rays and the visibility's light directions together
  (MIS, balance heuristic: the GGX rays find a narrow lobe's sky, the light directions a sun in a wide
  one) and filtered over neighbours before they are divided: a mirror-like metal's S is as detailed as the
  HDRI, and a filtered difference would smear that detail into dark and bright blotches, while a few
  rays' own ratio takes a lobe whose sampled rays all hit the floor for hidden whole. Rough lobes too: a
  metal has no diffuse layer for the bounce to light, so without them its faces towards a lit floor stay
  dark; rays that escape the screen keep the HDRI.

A ray is marched through the depth buffer in STEPS steps up to REACH x the median foreground depth (so
nothing depends on the scene's units). A step is blocked where the ray passes through an object at its pixel:
- it went through the visible surface: the step before was in front of its pixel's surface and this one is
  behind its own, and the surface's depth under the two steps differs by at most CONTINUITY x the ray's step
  (one continuous surface, not the edge between two objects). However thin the surface, the ray passed
  through it: the wall of a cup, which a step would rarely land inside. (Not the other way round: a ray that
  passes behind an object's rim and comes out over the floor it stands on would count.)
- or the last SEGMENT of its way from the previous step overlaps the object at its pixel, from the visible
  surface (plus a tolerance) to the object's back. How deep that is, is guessed, THICKNESS x n.wo (objects
  assumed that solid behind their visible surface, thinner towards their silhouettes), unless the G-buffer's
  back_depth and next_depth layers (the second and third surfaces along the pixel's ray) show the object
  ending sooner with empty space behind it to at least the guessed depth: then back_depth is the object's
  back. So a ball in the air does not shadow like a long column, while a cup whose far wall lies close behind
  its near one stays solid: the camera cannot see what closes the space between them (a tilted cup's bottom),
  and a ray from below would pass through it.
- or the step has left the image, the ray rises (world +Z), and the job's surround map (a depth panorama at
  the camera, docs/job-format.md) shows a surface in front of the step's point, by at most the guessed
  thickness: the walls and ceiling behind and above the camera that hide a room's sky. A ray heading down
  that leaves the image keeps the HDRI: the ground it would meet off screen faces up and is lit by the sky,
  about as the HDRI's own lower half is, and nothing on screen says more (blocking it took 0.3-0.4 dB from
  scenes on a ground: the ground's light is then missing, not the sky's).
Testing part of the way, not only the step's point, keeps a thin object between two steps from being
skipped; the whole way would take a ray that passes just behind an object's rim for blocked. Step positions
are jittered per pixel and ray: fixed positions find a thin occluder at the same distances from every pixel
and draw repeated "ghost" copies of its shadow in stripes; jittered ones turn that into noise, which an
edge-aware (tangent plane and normal) filter removes. A hit below the start's tangent plane is not one (the
ray passed behind its own object). What the camera does not see (hidden occluders, the backs of objects, and
off screen all but what the surround map shows rising rays) cannot block or bounce: the network corrects
what it can.

Cost: pixels x rays x steps depth lookups. Above MARCH_BUDGET foreground pixels, one pixel per block
marches and its block shares what its rays hit (each pixel keeps its own cosine weights and radiance).
An interactive preview marches fewer directions from fewer pixels (PREVIEW_LIGHTS, PREVIEW_BUDGET).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import brdf
from .envmap import EnvironmentMap, luminance
from .jobformat import Camera
from .sampling import UNIFORM_SPHERE_PDF, cosine_local, ggx_directions, ggx_pdf_of, make_rays, to_world
from .shaders import PixelInputs, layered_diffuse
from .shadowmaps import Depths, ShadowMap

LIGHTS = 32  # HDRI directions per pixel for the visibility
LIGHT_SETS = 16  # ... drawn afresh for each pixel of a 4 x 4 tile, pooled by the filter (ScreenSpace.visibility)
BOUNCE_RAYS = 8  # cosine rays per pixel for the bounce light
REFLECTION_RAYS = 4  # GGX rays per pixel for the reflections
STEPS = 16  # march steps per ray
REACH = 1.0  # march length, x median foreground depth
THICKNESS = 0.25  # the guess: a surface blocks points up to this far behind it, x median depth x n.wo
CONTINUITY = 1.5  # the visible surface's depth under two steps differs by at most this x the step: one surface
SEGMENT = 0.1  # a step tests this share of its way from the previous step against the object it lands on
NO_SURFACE = 1e9  # back_depth, next_depth at or beyond this: no such surface along the ray (Cycles writes 1e10)
MIN_FACING = 0.2  # ... with n.wo at least this
TOLERANCE = 0.003  # ... and further behind than this, x the step's depth (depth-buffer precision)
OFFSET = 0.005  # rays start this far off the surface along its normal, x the pixel's depth
MARCH_BUDGET = 1 << 16  # foreground pixels that march; above it, one per block
CHUNK_RAYS = 8192  # rays marched at a time (small chunks stay in cache: 2-3x faster than 32k)
PREVIEW_LIGHTS = 8  # an interactive preview (option "preview") marches this many HDRI directions
PREVIEW_BUDGET = 1 << 12  # ... from this many pixels: ~40x less marching; blocky shadows, filtered soft
FILTER_LEVELS = 2  # a-trous passes of the edge-aware filter (half width 3 pixels): the visibility's
INDIRECT_FILTER_LEVELS = 3  # ... the bounce's and reflections' (half width 7: fewer rays, smoother light)
TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]  # a 3 x 3 kernel's taps, in steps from the top left
Environment = Callable[[torch.Tensor], torch.Tensor]  # world directions (..., 3) -> the HDRI's radiance (..., 3)
Irradiance = Callable[[torch.Tensor], torch.Tensor]  # unit normals (..., 3) -> the HDRI's irradiance E(n) (..., 3)


class Sky(NamedTuple):
    """The HDRI as the transport sees it, functions of world directions (..., 3): its radiance (..., 3), its
    irradiance by normal (..., 3) and the density (...,) with which light_directions drew the light directions."""

    radiance: Environment
    irradiance: Irradiance
    light_pdf: Callable[[torch.Tensor], torch.Tensor]


class Paths(NamedTuple):
    """The marchers' cosine rays, marched once: directions (M, K, 3), the pixel each hits (M, K), its weight
    (M, K, 1), 0 where no surface facing the ray is seen, and whether it hit the unseen side of one (M, K)."""

    directions: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    hidden: torch.Tensor


class Reflections(NamedTuple):
    """The marchers' GGX rays, marched once: directions (M, K, 3), weights f cos / (pdf K) (M, K, 3), pdfs (M, K),
    the pixel each hits (M, K) and whether a surface facing it is seen there (M, K, 1); and at that surface one
    GGX ray onwards, sampled about the way back to the marcher: its direction (M, K, 3), weight f cos / pdf
    (M, K, 3) and pdf (M, K)."""

    directions: torch.Tensor
    weight: torch.Tensor
    pdf: torch.Tensor
    index: torch.Tensor
    seen: torch.Tensor
    onward: torch.Tensor
    onward_weight: torch.Tensor
    onward_pdf: torch.Tensor


@dataclass
class Transport:
    """The physical screen-space terms of one image, (1, C, H, W) each."""

    visibility: torch.Tensor
    bounce: torch.Tensor
    reflection: torch.Tensor

    @property
    def indirect(self) -> torch.Tensor:
        return self.bounce + self.reflection


def light_directions(envmap: EnvironmentMap, count: int = LIGHTS, seed: int = 0,
                     sets: int = LIGHT_SETS) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (S, K, 3), weights (S, K)): `sets` independent sets of K = `count` directions, each half
    importance samples of the HDRI's luminance, half stratified over the sphere, weighted luminance / the
    mixture's pdf (balance heuristic). Luminance alone crowds every sample onto small bright sources; under a
    night sky whose lamps sit on the horizon (40% of the radiance in 1% of the texels, little of the light a
    floor receives) the few samples left for the wide sky overhead then mis-weigh the floor's shadows by whole
    stripes. Half of K still finds a sun. Neighbouring pixels take different sets (ScreenSpace.visibility)."""
    lit = count // 2
    directions = torch.stack([torch.cat([
        make_rays("importance", lit, seed * sets + k, envmap=envmap, device=envmap.device).directions.reshape(-1, 3),
        make_rays("stratified", count - lit, seed * sets + k, device=envmap.device).directions.reshape(-1, 3)])
        for k in range(sets)])
    return directions, luminance(envmap.lookup(directions)) / light_pdf(envmap, directions, count).clamp(min=1e-12)


def light_pdf(envmap: EnvironmentMap, directions: torch.Tensor, count: int = LIGHTS) -> torch.Tensor:
    """The density (...,) with which light_directions draws directions (..., 3) of the HDRI's own frame."""
    lit = count // 2
    return (lit * envmap.pdf(directions) + (count - lit) * UNIFORM_SPHERE_PDF) / count


def specular_lobe(normals: torch.Tensor, wo: torch.Tensor, f0: torch.Tensor, roughness: torch.Tensor,
                  wi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compensated GGX lobe's f cos (P, N, 3) towards directions wi (P, N, 3), and the density (P, N) with
    which ggx_directions draws them."""
    g = brdf.geometry(normals, wo, wi)
    return brdf.ggx_specular(f0, roughness, g), ggx_pdf_of(g, brdf.ggx_alpha(roughness))


class ScreenSpace:
    """The depth buffer and materials of one image, ready for marching: built once per G-buffer and kept for
    relights. The bounce and reflection rays do not depend on the lighting, so what they hit is marched once
    (on first use) and a relight only gathers the new radiance there; the visibility is marched per HDRI."""

    def __init__(self, position: torch.Tensor, normal: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor,
                 pixels: PixelInputs, camera: Camera, *, seed: int = 0, budget: int = MARCH_BUDGET,
                 back_depth: torch.Tensor | None = None, next_depth: torch.Tensor | None = None,
                 surround: ShadowMap | None = None):
        """position, normal (1, 3, H, W) world space; depth, mask, back_depth, next_depth (1, 1, H, W), depth along
        the view axis of the visible surface and of the second and third surfaces along the pixel's ray; pixels:
        the foreground pixels' materials and view directions, in the mask's row-major order."""
        device = position.device
        self.height, self.width = height, width = depth.shape[-2:]
        self.depth, self.mask, self.materials, self.seed = depth, mask, pixels, seed
        self.surround = None if surround is None else Depths(surround, device)
        foreground = mask[0, 0] > 0
        self.pixels = foreground.flatten().nonzero()[:, 0]  # (P,) flat indices of the foreground
        self.foreground_index = torch.zeros(height * width, dtype=torch.long, device=device)
        self.foreground_index[self.pixels] = torch.arange(len(self.pixels), device=device)  # its inverse
        self.scale = depth[0, 0][foreground].median() if foreground.any() else depth.new_tensor(1.0)
        self.normal_map = normal[0].flatten(1).T  # (H W, 3), to check which side of a surface a ray hits
        self.normals = self.normal_map[self.pixels]  # (P, 3)
        # One marching pixel per block x block block; `follows[i]`: the marcher whose hits pixel i shares.
        self.block = block = max(1, math.ceil(math.sqrt(len(self.pixels) / budget)))
        rows, cols = self.pixels // width, self.pixels % width
        block_of = (rows // block) * -(-width // block) + cols // block
        blocks, self.follows = torch.unique(block_of, return_inverse=True)
        self.marchers = torch.full((len(blocks),), len(rows), device=device).scatter_reduce_(
            0, self.follows, torch.arange(len(rows), device=device), "amin")  # indices into the foreground
        marching = self.pixels[self.marchers]
        # each marcher's light set: all LIGHT_SETS differ within a tile of marching blocks
        tile = math.isqrt(LIGHT_SETS)
        block_row, block_col = marching // width // block % tile, marching % width // block % tile
        self.light_set = block_row * tile + block_col
        self.position_map = position[0].flatten(1).T  # (H W, 3)
        self.start_normals = self.normal_map[marching]
        self.starts = (self.position_map[marching]
                       + self.start_normals * (OFFSET * depth[0, 0].flatten()[marching])[:, None])
        # Background and a one-pixel border beyond the image are infinitely far: a step that leaves the
        # image (or goes behind the camera: its coordinates clamp onto the border) is never blocked.
        self.depth_map = F.pad(torch.where(foreground, depth[0, 0], torch.inf), (1, 1, 1, 1),
                               value=torch.inf).flatten()
        # How far behind its visible surface an object is solid, the guess: the chord of a convex object shrinks
        # towards its silhouette like n.wo does (for a sphere exactly: 2 r n.wo), so a ray that passes just
        # behind an object's rim is not taken for blocked. Measured where empty space follows the object's back
        # to at least the guessed depth (module docstring).
        facing = torch.zeros(height * width, device=device)
        facing[self.pixels] = (self.normals * pixels.wo).sum(-1).clamp(MIN_FACING, 1)
        thickness = (THICKNESS * self.scale * facing).view(height, width)
        if back_depth is not None and next_depth is not None:
            measured = back_depth[0, 0] - depth[0, 0]
            gap = next_depth[0, 0] - back_depth[0, 0]  # NaN (compares False) where both are +Inf
            known = (foreground & (measured > TOLERANCE * depth[0, 0]) & (back_depth[0, 0] < NO_SURFACE)
                     & (gap > thickness))
            thickness = torch.where(known, measured, thickness)
        self.thickness_map = F.pad(thickness, (1, 1, 1, 1)).flatten()
        # Homogeneous transforms are linear: clip(start + t d) = clip(start) + t clip(d, w=0); the same for
        # the view-axis depth (the camera looks down its -Z). Rows: clip x, clip y, clip w, view depth.
        world_to_camera = torch.as_tensor(camera.world_to_camera, dtype=torch.float32, device=device)
        projection = torch.as_tensor(camera.projection, dtype=torch.float32, device=device)
        self.to_screen = torch.stack([*(projection @ world_to_camera)[[0, 1, 3]], -world_to_camera[2]])  # (4, 4)
        self._paths: dict[str, Paths] = {}
        self._weights: dict[int, list[torch.Tensor]] = {}  # a-trous level -> its taps' weights

    def _uniforms(self, shape: tuple[int, ...], stream: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 7919 + stream)
        return torch.rand(shape, generator=generator).to(self.depth.device)

    def march(self, directions: torch.Tensor, jitter: torch.Tensor, surround: bool = False) -> torch.Tensor:
        """What the marchers' rays hit: (M, K) flat pixel indices, -1 where a ray escapes.

        directions (1 or M, K, 3) world space; jitter (M, K) in [0, 1), each ray's offset of its steps.
        surround: steps off the image are tested against the surround map where there is one (then a ray
        blocked there gets the index of the border pixel it left by: for whether it is blocked only)."""
        width, height = self.width, self.height
        steps = torch.arange(STEPS, device=directions.device)
        hits = torch.empty(jitter.shape, dtype=torch.long, device=directions.device)
        chunk = max(1, CHUNK_RAYS // jitter.shape[1])
        for lo in range(0, len(self.starts), chunk):
            hi = min(lo + chunk, len(self.starts))
            dirs = directions if directions.shape[0] == 1 else directions[lo:hi]
            # denser near the surface, where contact shadows are; jittered so no two neighbours step alike
            distance = REACH * self.scale * ((steps + jitter[lo:hi, :, None]) / STEPS) ** 2  # (m, K, S)
            along = torch.einsum("rc,mkc->rmk", self.to_screen[:, :3], dirs)[..., None]  # (4, m or 1, K, 1)
            base = (self.to_screen[:, :3] @ self.starts[lo:hi].T + self.to_screen[:, 3:])[:, :, None, None]
            x, y, w, view_depth = base + along * distance
            w = w.clamp(min=1e-8)
            col = (x / w + 1).mul_(width / 2).floor_().clamp_(-1, width).add_(1)  # in the padded map
            row = (1 - y / w).mul_(height / 2).floor_().clamp_(-1, height).add_(1)
            index = (row * (width + 2) + col).long()
            # blocked (module docstring): the last SEGMENT of the way from the previous step overlaps the object at
            # this step's pixel, from its visible surface to its back...
            front = self.depth_map[index]
            previous = torch.cat([base[3].expand(*view_depth.shape[:-1], 1), view_depth[..., :-1]], -1)
            start = view_depth + SEGMENT * (previous - view_depth)
            near, far = torch.minimum(start, view_depth), torch.maximum(start, view_depth)
            tolerance = TOLERANCE * view_depth
            blocked = (far - front > tolerance) & (near - front < self.thickness_map[index])
            # ... or it went through the visible surface since the previous step: in front of it there, behind it
            # here, and the surface's depth under the two steps differs by at most CONTINUITY x the step (one
            # surface, not the edge between two objects), however thin the surface (a cup's wall)
            front_before = torch.cat([base[3].expand(*front.shape[:-1], 1), front[..., :-1]], -1)
            ahead_before = F.pad(view_depth[..., :-1] <= front[..., :-1], (1, 0), value=True)
            step = torch.diff(distance, dim=-1, prepend=torch.zeros_like(distance[..., :1]))
            continuous = (front - front_before).abs() <= CONTINUITY * step
            blocked |= (view_depth - front > tolerance) & ahead_before & continuous
            # ... or, off the image, a ray that rises is behind a surface of the surround map (as thick as the
            # guess): the sky that walls and ceilings the camera does not see hide (module docstring)
            outside = (col < 1) | (col > width) | (row < 1) | (row > height)
            if surround and self.surround is not None:
                tested = outside & (dirs[..., 2] > 0)[:, :, None]
                points = self.starts[lo:hi, None, None] + dirs[:, :, None] * distance[..., None]
                along, seen = self.surround(points[tested])
                blocked[tested] |= (along - seen > TOLERANCE * along) & (along - seen < THICKNESS * self.scale)
            first = blocked.to(torch.uint8).argmax(-1, keepdim=True)  # the first blocked step
            hit_row = row.gather(-1, first)[..., 0].long() - 1
            hit_col = col.gather(-1, first)[..., 0].long() - 1
            hit = (hit_row * width + hit_col).clamp_(0, width * height - 1)
            # A surface below the start's tangent plane cannot be in the way of a ray that leaves it (the
            # ray passed behind the start's own object, e.g. near a sphere's silhouette): it escapes. (Off
            # the image the ray leaves upwards: lights below the plane carry no weight.)
            above = ((self.position_map[hit] - self.starts[lo:hi, None]) * self.start_normals[lo:hi, None]).sum(-1)
            above = torch.where(outside.gather(-1, first)[..., 0], 1.0, above)
            hits[lo:hi] = torch.where(blocked.any(-1) & (above > 0), hit, -1)
        return hits

    def to_image(self, values: torch.Tensor) -> torch.Tensor:
        """Foreground values (P, C) as a (1, C, H, W) image, 0 on the background."""
        out = values.new_zeros(self.height * self.width, values.shape[-1])
        out[self.pixels] = values
        return out.T.reshape(1, -1, self.height, self.width)

    def per_marcher(self, values: torch.Tensor) -> torch.Tensor:
        """Each marcher's light set of values (S, K, ...) drawn per set (light_directions): (M, K, ...)."""
        return values[self.light_set % len(values)]

    def lights_free(self, directions: torch.Tensor) -> torch.Tensor:
        """Whether each marcher sees the HDRI along the directions (S, K, 3) of its light set, (M, K)."""
        jitter = self._uniforms((len(self.starts), directions.shape[1]), 0)
        return self.march(self.per_marcher(directions), jitter, surround=True) < 0

    def visibility(self, directions: torch.Tensor, weights: torch.Tensor, free: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """The visible share of the direct light from light sets of directions (S, K, 3) and weights (S, K),
        (1, 1, H, W); free: lights_free(directions) where the caller has it.

        The share is a ratio of sums over the edge-aware filter's neighbourhood, whose pixels hold different
        sets: it pools their directions. A fixed set of K for every pixel is a coherent error instead: under a
        night sky with lamps on the horizon, the few directions that land on the lamps decide every pixel's
        shadow, and a torus's inner rim kept 0.4 of its light where ray casting 8192 directions keeps 0.94."""
        free = self.lights_free(directions) if free is None else free
        sets = (self.light_set % len(directions))[self.follows]
        light = self.normals.new_zeros(len(self.normals), directions.shape[1])  # (P, K)
        for k in range(len(directions)):  # per set, not a (P, K, 3) gather: a 512 x 512 image would need 100 MB
            at = sets == k
            light[at] = (self.normals[at] @ directions[k].T).clamp(min=0) * weights[k]
        parts = torch.stack([(light * free[self.follows]).sum(-1), light.sum(-1)], -1)
        lit, total = self.smooth(self.to_image(parts)).split(1, 1)
        share = torch.where(total > 0, lit / total.clamp(min=1e-12), 1.0)
        return torch.where(self.mask > 0, share, 1.0).clamp(0, 1)

    def _trace(self, directions: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hit pixel, seen, hidden), (M, K) each: where the marchers' rays land, whether on an on-screen
        surface facing them, or on the unseen side of one (the surface at the hit pixel faces away)."""
        hits = self.march(directions, self._uniforms(directions.shape[:2], stream))
        index = hits.clamp(min=0)
        facing = (self.normal_map[index] * directions).sum(-1) < 0
        return index, (hits >= 0) & facing, (hits >= 0) & ~facing

    def _bounce_paths(self) -> Paths:
        """Cosine rays, of weight 1 / K where a surface is seen."""
        local = cosine_local(self._uniforms((len(self.starts), BOUNCE_RAYS, 2), 1))
        directions = to_world(local, self.normals[self.marchers])
        index, seen, hidden = self._trace(directions, 1)
        return Paths(directions, index, (seen / BOUNCE_RAYS)[..., None], hidden)

    def _reflection_paths(self) -> Reflections:
        """GGX rays from the marchers, and one on from where each lands (the onward ray of a ray that escapes or
        meets an unseen side is never used)."""
        m, materials = self.marchers, self.materials
        normals, wo, roughness = self.normals[m], materials.wo[m], materials.roughness[m]
        directions = ggx_directions(self._uniforms((len(m), REFLECTION_RAYS, 2), 2), normals, wo,
                                    brdf.ggx_alpha(roughness))
        index, seen, _ = self._trace(directions, 2)
        lobe, pdf = specular_lobe(normals, wo, materials.specular[m], roughness, directions)
        pdf = pdf.clamp(min=1e-6)
        weight = lobe / (pdf[..., None] * REFLECTION_RAYS)
        at = self.foreground_index[index.flatten()]  # the hit surfaces' materials
        back = -directions.reshape(-1, 3)
        onward = ggx_directions(self._uniforms((len(at), 1, 2), 3), self.normals[at], back,
                                brdf.ggx_alpha(materials.roughness[at]))
        onward_lobe, onward_pdf = specular_lobe(self.normals[at], back, materials.specular[at],
                                                materials.roughness[at], onward)
        onward_pdf = onward_pdf.clamp(min=1e-6)
        return Reflections(directions, weight, pdf, index, seen[..., None], onward.view_as(directions),
                           (onward_lobe / onward_pdf[..., None]).view_as(directions), onward_pdf.view(pdf.shape))

    def _paths_of(self, term: str) -> Paths | Reflections:
        if term not in self._paths:
            self._paths[term] = self._bounce_paths() if term == "bounce" else self._reflection_paths()
        return self._paths[term]

    def _gather(self, index: torch.Tensor, weight: torch.Tensor, radiance: torch.Tensor) -> torch.Tensor:
        """sum_k weight_k radiance(hit_k) per marcher (M, 3) from an image (1, 3, H, W)."""
        return (radiance[0].flatten(1).T[index] * weight).sum(1)

    def bounce(self, radiance: torch.Tensor, irradiance: Irradiance) -> torch.Tensor:
        """One-bounce diffuse light per foreground pixel (P, 3) from the direct-lit image `radiance` (1, 3, H, W):
        albedo (1 - the specular's albedo) x the mean radiance that cosine rays find on screen, or on the unseen
        sides of objects (module docstring; from the HDRI's `irradiance`). (The HDRI light that those surfaces
        block is what the visibility takes away.)"""
        paths = self._paths_of("bounce")
        marcher, directions, albedo = self._unseen
        unseen = albedo.new_zeros(len(self.starts), 3).index_add_(0, marcher, albedo * irradiance(-directions))
        light = self._gather(paths.index, paths.weight, radiance) + unseen / BOUNCE_RAYS
        return self._diffuse_colour * light[self.follows]

    @functools.cached_property
    def _unseen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bounce rays that meet the unseen side of a surface, a few of them, fixed for relights: their
        marcher (U,), direction (U, 3) and the hit pixel's diffuse colour / pi (U, 3)."""
        paths = self._paths_of("bounce")
        marcher, ray = paths.hidden.nonzero(as_tuple=True)
        albedo = self.to_image(self._diffuse_colour)[0].flatten(1).T[paths.index[marcher, ray]] / math.pi
        return marcher, paths.directions[marcher, ray], albedo

    @functools.cached_property
    def _diffuse_colour(self) -> torch.Tensor:
        """albedo (1 - the specular layer's albedo) per foreground pixel (P, 3): it does not change on a relight."""
        return layered_diffuse(self.materials)

    def reflection(self, surfaces: torch.Tensor, specular: torch.Tensor, sky: Sky, visibility: torch.Tensor,
                   lights: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """What pixels reflect of on-screen surfaces through their GGX lobe, in place of the HDRI the shading
        reflected along those rays, (1, 3, H, W), filtered: G + (1 - B - V) S (module docstring). surfaces: the light
        on-screen surfaces send whichever way they are seen (diffuse x visibility + lamps), specular: the
        shading's unshadowed specular part S, (1, 3, H, W) each; visibility V (1, 1, H, W); lights: the
        visibility's light sets (S, K, 3), free: whether each marcher sees its set's (M, K)."""
        directions, weight, pdf, index, seen, onward, onward_weight, onward_pdf = self._paths_of("reflection")
        # The onward ray is the GGX half of an MIS estimate whose light-sampled half is left out: a lamp that a
        # rough surface's wide lobe happens to meet would be a firefly (a thousand times the sky, in one ray),
        # a mirror's narrow lobe keeps what it meets.
        glint = (visibility.flatten()[index][..., None] * onward_weight * sky.radiance(onward)
                 * (onward_pdf / (onward_pdf + sky.light_pdf(onward)))[..., None])
        on_surfaces = weight * seen
        light = self._gather(index, on_surfaces, surfaces) + (on_surfaces * glint).sum(1)
        # The lobe's sky, and what of it is hidden, from the GGX rays and the light directions together (MIS,
        # balance heuristic): the GGX rays find a narrow lobe's sky, the light directions a sun in a wide one.
        m, materials, count = self.marchers, self.materials, lights.shape[1]
        mixture = REFLECTION_RAYS * pdf + count * sky.light_pdf(directions)
        along_rays = sky.radiance(directions) * weight * (REFLECTION_RAYS * pdf / mixture.clamp(min=1e-12))[..., None]
        lobe, lobe_pdf = specular_lobe(self.normals[m], materials.wo[m], materials.specular[m],
                                       materials.roughness[m], self.per_marcher(lights))
        mixture = REFLECTION_RAYS * lobe_pdf + count * self.per_marcher(sky.light_pdf(lights))
        along_lights = lobe * self.per_marcher(sky.radiance(lights)) / mixture.clamp(min=1e-12)[..., None]
        hidden = (along_rays * seen).sum(1) + (along_lights * ~free[..., None]).sum(1)
        parts = torch.cat([light, hidden, along_rays.sum(1) + along_lights.sum(1)], -1)[self.follows]
        light, hidden, total = self.smooth(self.to_image(parts), INDIRECT_FILTER_LEVELS).split(3, 1)
        return light + (1 - hidden / total.clamp(min=1e-12) - visibility) * specular * self.mask

    def transport(self, directions: torch.Tensor, weights: torch.Tensor, sky: Sky, unshadowed: torch.Tensor,
                  lights: torch.Tensor) -> Transport:
        """All three terms for the HDRI light sets of directions (S, K, 3) and weights (S, K) from the `sky`, its
        unshadowed shading and the lamps' shadowed light (1, 3, H, W): the bounce carries the direct-lit image,
        unshadowed x visibility + lights; the reflections split the shading into its diffuse part, seen alike from
        everywhere, and its specular part."""
        free = self.lights_free(directions)
        visibility = self.visibility(directions, weights, free)
        bounce = self.bounce(unshadowed * visibility + lights, sky.irradiance)
        diffuse = self.to_image(self._diffuse_colour * sky.irradiance(self.normals) / math.pi)
        reflection = self.reflection(diffuse * visibility + lights, (unshadowed - diffuse).clamp(min=0), sky,
                                     visibility, directions, free)
        return Transport(visibility, self.smooth(self.to_image(bounce), INDIRECT_FILTER_LEVELS), reflection)

    def smooth(self, image: torch.Tensor, levels: int = FILTER_LEVELS) -> torch.Tensor:
        """An edge-aware filter of image (1, C, H, W) over the foreground: `levels` a-trous passes of a 3 x 3
        kernel with taps 1, 2, 4, ... pixels apart (half width 2^levels - 1), and at least as wide as a marching
        block. Neighbours count by how close they lie to the pixel's tangent plane and how alike their normals
        are, so shadow edges along geometry stay sharp and a receding floor is smoothed as much as a wall
        facing the camera. The weights depend only on the G-buffer: computed once, kept for relights."""
        height, width = self.height, self.width
        for level in range(max(levels, self.block.bit_length())):
            step = 2**level
            padded = F.pad(image, (step, step, step, step), mode="replicate")
            total = torch.zeros_like(image)
            for (dy, dx), weight in zip(TAPS, self._filter_weights(level), strict=True):
                total.addcmul_(weight, padded[..., dy * step:dy * step + height, dx * step:dx * step + width])
            image = torch.where(self.mask > 0, total, image)
        return image

    def _filter_weights(self, level: int) -> list[torch.Tensor]:
        """The normalised weights (1, 1, H, W) of the 9 TAPS of a-trous pass `level`."""
        if level not in self._weights:
            height, width, step = self.height, self.width, 2**level
            normal = self.normal_map.T.reshape(1, 3, height, width)
            position = self.position_map.T.reshape(1, 3, height, width)
            tolerance = 0.02 * self.depth.clamp(min=1e-6)

            def padded(x: torch.Tensor) -> torch.Tensor:
                return F.pad(x, (step, step, step, step), mode="replicate")

            position_p, normal_p, mask_p = padded(position), padded(normal), padded(self.mask)
            weights = []
            for dy, dx in TAPS:
                window = (..., slice(dy * step, dy * step + height), slice(dx * step, dx * step + width))
                off_plane = ((position_p[window] - position) * normal).sum(1, keepdim=True)
                close = torch.exp(-((off_plane / tolerance) ** 2))
                aligned = (normal_p[window] * normal).sum(1, keepdim=True).clamp(min=0) ** 8
                spatial = (1 if dy == 1 else 0.5) * (1 if dx == 1 else 0.5)  # the B1 spline's 1/2/1
                weights.append(close * aligned * mask_p[window] * spatial)
            total = torch.stack(weights).sum(0).clamp(min=1e-8)
            self._weights[level] = [weight / total for weight in weights]
        return self._weights[level]
