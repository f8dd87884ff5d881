"""Job -> result: gathers the foreground pixels, draws the rays, shades in memory-sized chunks,
applies the shadow estimator, and scatters the result back into images.

The work that does not depend on the lighting (pixel inputs, view directions, images for the
shadow net) lives in a PreparedGBuffer, built once per G-buffer and reused by relighting. For ray
sets that do not depend on the HDRI (uniform, stratified, cosine), a RelightCache goes further: it
holds the per-pixel, per-ray weights f cos / pdf of a linear-in-Li shader, so that a relight under a
new or rotated HDRI is a radiance lookup at fixed directions and one contraction, plus the shadow net.

Control variate: every shader with a Lambertian lobe (Shader.lambertian: the classical ones and the
default, whose learned gains start at 1) gets that lobe's exact integral over the HDRI
(EnvironmentMap.irradiance) in place of its Monte Carlo estimate with the same rays: colour + rho / pi
(E(n) - E_rays(n)). The expectation is unchanged for any gains; with gains of 1 the diffuse light has
no ray noise left, only the specular lobe has.

Shaders with a fast path (backend/fastpath.py: the default shader and GGX) are evaluated through it
unless the renderer is built with fast=False, which runs the plain reference path of shaders.py.

The job's analytic lights (backend/lights.py) are shaded exactly per pixel beside the HDRI and added after
the shadow estimator, which sees the HDRI's part only; a light's shadow is its per-pixel visibility
(Renderer.light_visibility). They are cheap, so a relight evaluates them again; the cache is HDRI-only.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import fastpath
from .camera import view_directions, world_positions
from .edges import antialiased
from .envmap import EnvironmentMap
from .jobformat import PEELED_DEPTHS, TRANSPORT_LAYERS, Camera, GBuffer, Job, Options, Result
from .lights import DEFAULT_SAMPLES, Light, shade_lights
from .models import ShadingModel, load_model
from .sampling import PER_PIXEL, RaySet, make_rays
from .screenspace import (
    LIGHTS,
    MARCH_BUDGET,
    PREVIEW_BUDGET,
    PREVIEW_LIGHTS,
    ScreenSpace,
    Sky,
    Transport,
    light_directions,
    light_pdf,
)
from .shaders import PixelInputs
from .shadow import composite
from .shadowmaps import ShadowMap, light_size
from .shadowmaps import visibility as shadow_visibility

Progress = Callable[[float], None]
CancelCheck = Callable[[], bool]

CPU_BUDGET_BYTES = 1 << 30
CUDA_BUDGET_FRACTION = 0.25
BYTES_PER_PIXEL_RAY = {"default": 1024, "pbnds-paper": 16384}  # peak activations, measured loosely
HDRI_INDEPENDENT = ("uniform", "stratified", "cosine")  # ray sets a relight cache can keep


class Cancelled(RuntimeError):
    """The caller's cancel check asked to stop."""


def pick_device(name: str | None = None) -> torch.device:
    """'cuda' when present unless told otherwise; asking for CUDA without one is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but PyTorch sees no CUDA device")
    return device


@dataclass
class PreparedGBuffer:
    """A G-buffer on the shading device: everything the lighting does not change."""

    height: int
    width: int
    index: torch.Tensor  # (P,) flat indices of foreground pixels
    pixels: PixelInputs
    positions: torch.Tensor  # (P, 3) world positions of the foreground pixels
    images: dict[str, torch.Tensor]  # (1, C, H, W) inputs of the shadow net, and world positions
    mask: np.ndarray
    camera: Camera
    coverage: np.ndarray | None = None  # the G-buffer's coverage layer (backend/edges.py)
    surround: ShadowMap | None = None  # the job's surround map: occluders the G-buffer does not show
    # The lights' (shadowed, unshadowed) term by (model, seed, light samples), with the light list it was
    # shaded for: it does not depend on the HDRI, so relights of the same job reuse it.
    lit: dict = field(default_factory=dict)

    @classmethod
    def build(cls, gbuffer: GBuffer, camera: Camera, device: torch.device,
              surround: ShadowMap | None = None) -> PreparedGBuffer:
        height, width = gbuffer.size
        wo = view_directions(camera, width, height)
        position = gbuffer.position if gbuffer.position is not None else world_positions(camera, gbuffer.depth)
        index = np.flatnonzero(gbuffer.foreground)

        def pick(array: np.ndarray) -> torch.Tensor:
            flat = array.reshape(height * width, -1)[index]
            return torch.from_numpy(np.ascontiguousarray(flat)).to(device)

        pixels = PixelInputs(albedo=pick(gbuffer.albedo), specular=pick(gbuffer.specular),
                             roughness=pick(gbuffer.roughness), normal=pick(gbuffer.normal), wo=pick(wo))

        def image(array: np.ndarray) -> torch.Tensor:
            array = array if array.ndim == 3 else array[..., None]
            array = np.where(gbuffer.foreground[..., None], array, 0).astype(np.float32)
            return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)

        images = {name: image(getattr(gbuffer, name)) for name in ("albedo", "normal", "ao", "depth", "mask")}
        images["position"] = image(position)
        for name in PEELED_DEPTHS:
            if getattr(gbuffer, name) is not None:
                images[name] = image(getattr(gbuffer, name))
        return cls(height, width, torch.from_numpy(index).to(device), pixels, pick(position.astype(np.float32)),
                   images, gbuffer.mask, camera, gbuffer.coverage, surround)

    @functools.cached_property
    def screen_space(self) -> ScreenSpace:
        return self._screen_space(MARCH_BUDGET)

    @functools.cached_property
    def preview_screen_space(self) -> ScreenSpace:
        return self._screen_space(PREVIEW_BUDGET)

    def _screen_space(self, budget: int) -> ScreenSpace:
        images = self.images
        return ScreenSpace(images["position"], images["normal"], images["depth"], images["mask"], self.pixels,
                           self.camera, budget=budget, back_depth=images.get("back_depth"),
                           next_depth=images.get("next_depth"), surround=self.surround)

    def transport(self, envmap: EnvironmentMap, rotation: float, unshadowed: torch.Tensor,
                  lights: torch.Tensor, preview: bool = False) -> Transport:
        """The screen-space light transport (backend/screenspace.py) under the HDRI rotated by `rotation` about
        +Z, from its unshadowed shading and the lamps' shadowed light, (1, 3, H, W) each; coarser and much
        cheaper for a `preview`."""
        directions, weights = light_directions(envmap, PREVIEW_LIGHTS if preview else LIGHTS)
        if rotation:
            directions = rotate_z(directions, rotation)

        def in_map(world: torch.Tensor) -> torch.Tensor:
            return rotate_z(world, -rotation) if rotation else world

        screen_space = self.preview_screen_space if preview else self.screen_space
        count = directions.shape[1]  # per light set
        sky = Sky(lambda world: envmap.lookup(in_map(world)), lambda normals: envmap.irradiance(in_map(normals)),
                  lambda world: light_pdf(envmap, in_map(world), count))
        return screen_space.transport(directions, weights, sky, unshadowed, lights)


def chunk_pixels(model: ShadingModel, rays: int, device: torch.device) -> int:
    """Pixels per chunk so that one chunk's activations fit the device's budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * CUDA_BUDGET_FRACTION)
    else:
        budget = CPU_BUDGET_BYTES
    per_pixel = rays * BYTES_PER_PIXEL_RAY.get(model.shader.name, 256)
    return max(64, budget // per_pixel)


@dataclass
class RelightCache:
    """What a relight needs besides the HDRI, for one prepared G-buffer and one set of options.

    colour[p, c] = sum_k weights[c, p, k] Li_c(directions[p or 0, k]) + diffuse[p, c] E_c(n_p), with
    weights = f cos / (pdf N) - diffuse cos / (pdf N) and E the HDRI's irradiance: the shader's Monte Carlo
    estimate with its Lambertian control variate (Renderer.shade), exactly, for a shader linear in Li and
    a ray set that does not depend on the HDRI.
    """

    prepared: PreparedGBuffer
    options: Options
    directions: torch.Tensor  # (1 or P, N, 3) world space
    weights: torch.Tensor  # (3, P, N)
    diffuse: torch.Tensor  # (P, 3) the Lambertian lobe's rho / pi (0 for a shader without one)

    @property
    def nbytes(self) -> int:
        return self.weights.numel() * self.weights.element_size() + self.directions.numel() * 4

    def matches(self, prepared: PreparedGBuffer, options: Options) -> bool:
        keys = ("model", "rays", "sampling", "seed")
        return prepared is self.prepared and all(getattr(options, k) == getattr(self.options, k) for k in keys)


def cosine_weights(normals: torch.Tensor, rays: RaySet) -> torch.Tensor:
    """max(n.w, 0) / (pdf N) per pixel and ray, (P, N): with Li summed over the rays, the Monte Carlo
    estimate of the irradiance E(n) that a Lambertian lobe's own estimate is proportional to."""
    cosine = (normals[:, None] * rays.directions).sum(-1).clamp(min=0)
    return cosine / (rays.pdf * rays.directions.shape[1])


def irradiance_estimate(normals: torch.Tensor, rays: RaySet, radiance: torch.Tensor) -> torch.Tensor:
    """The rays' Monte Carlo estimate of E(n), (P, 3), from their radiance (1 or P, N, 3): one matrix
    product (a batched one for per-pixel rays), no (P, N, 3) temporary."""
    weights = cosine_weights(normals, rays)
    if radiance.shape[0] == 1:
        return weights @ radiance[0]
    return torch.bmm(weights[:, None], radiance)[:, 0]


def rotate_z(directions: torch.Tensor, angle: float) -> torch.Tensor:
    """Directions rotated by `angle` radians about +Z."""
    cos, sin = math.cos(angle), math.sin(angle)
    x, y, z = directions.unbind(-1)
    return torch.stack([cos * x - sin * y, sin * x + cos * y, z], dim=-1)


class Renderer:
    """Shades jobs on one device; models are loaded once and cached by name.

    fast: evaluate the shaders that have one through backend/fastpath.py (False: the plain reference);
    precision: "fp32" or "bf16" (the fast path's hidden-layer products, the shadow net under autocast);
    compile: torch.compile the
    fast path's chunk function (falls back to eager where inductor cannot compile); triton: the fused
    Triton kernel for shared ray sets (CUDA; backend/fastpath_triton.py); light_samples: samples per
    area light, soft sun and sphere light.
    """

    def __init__(self, device: str | None = None, defaults: Options | None = None, *, fast: bool = True,
                 precision: str = "fp32", compile: bool = False, triton: bool = False,
                 light_samples: int = DEFAULT_SAMPLES):
        if precision not in fastpath.PRECISIONS:
            raise ValueError(f"precision must be one of {list(fastpath.PRECISIONS)}, got {precision!r}")
        self.device = pick_device(device)
        self.defaults = defaults or Options()
        self.fast, self.precision, self.compile, self.triton = fast, precision, compile, triton
        self.light_samples = light_samples
        self._models: dict[str, ShadingModel] = {}
        self._fast_shaders: dict[str, fastpath.FastShader] = {}

    def model(self, spec: str) -> ShadingModel:
        if spec not in self._models:
            model = load_model(spec).to(self.device)
            if self.device.type == "cpu" and model.shadow is not None:
                # oneDNN's convolutions are ~1.5x faster in NHWC on a CPU; the values are the same
                model.shadow.to(memory_format=torch.channels_last)
            self._models[spec] = model
        return self._models[spec]

    def shader_for(self, spec: str):
        """The callable that shades with model `spec`: its fast path where there is one, else the shader."""
        shader = self.model(spec).shader
        if not (self.fast and fastpath.supports(shader)):
            return shader
        if spec not in self._fast_shaders:
            self._fast_shaders[spec] = fastpath.FastShader(shader, precision=self.precision, compile=self.compile,
                                                           triton=self.triton)
        return self._fast_shaders[spec]

    def prepare(self, job: Job) -> PreparedGBuffer:
        return PreparedGBuffer.build(job.gbuffer, job.camera, self.device, job.surround)

    def render(self, job: Job, *, progress: Progress | None = None, cancel: CancelCheck | None = None) -> Result:
        started = time.perf_counter()
        prepared = self.prepare(job)
        return self.shade(prepared, job.hdri, job.options, lights=job.lights, progress=progress, cancel=cancel,
                          timings={"prepare_ms": (time.perf_counter() - started) * 1e3})

    def _chunks(self, model: ShadingModel, count: int, rays: int, cancel: CancelCheck | None,
                progress: Progress | None, work: Callable[[int, int], None]) -> None:
        """Run work(start, stop) over the pixels in memory-sized chunks, halving them on out-of-memory."""
        step = chunk_pixels(model, rays, self.device)
        start = 0
        while start < count:
            if cancel is not None and cancel():
                raise Cancelled("the render was cancelled")
            stop = min(start + step, count)
            try:
                work(start, stop)
            except torch.OutOfMemoryError:
                if step <= 64:
                    raise
                step //= 2  # retry this chunk smaller
                torch.cuda.empty_cache()
                continue
            start = stop
            if progress is not None:
                progress(0.9 * start / max(count, 1))

    @torch.inference_mode()
    def shade(self, prepared: PreparedGBuffer, hdri: np.ndarray, options: Options, *, lights: list[Light] = (),
              progress: Progress | None = None, cancel: CancelCheck | None = None,
              timings: dict | None = None) -> Result:
        """Shade a prepared G-buffer under an HDRI and lights: the whole render after prepare(), and a relight."""
        timings = dict(timings or {})
        started = time.perf_counter()
        model = self.model(options.model)
        shader = self.shader_for(options.model)
        envmap = EnvironmentMap(hdri, self.device)
        colour = torch.zeros(len(prepared.pixels), 3, device=self.device)
        shared_rays = shared_radiance = None
        if options.sampling not in PER_PIXEL:
            shared_rays = make_rays(options.sampling, options.rays, options.seed, envmap=envmap, device=self.device)
            shared_radiance = envmap.lookup(shared_rays.directions)

        def work(start: int, stop: int) -> None:
            pixels = prepared.pixels.slice(start, stop)
            rays, radiance = shared_rays, shared_radiance
            if rays is None:
                rays = make_rays(options.sampling, options.rays, options.seed, envmap=envmap, normals=pixels.normal,
                                 wo=pixels.wo, roughness=pixels.roughness, device=self.device)
                radiance = envmap.lookup(rays.directions)
            colour[start:stop] = shader(pixels, rays, radiance)
            lambertian = model.shader.lambertian(pixels)
            if lambertian is not None:  # the control variate: the Lambertian lobe's exact integral for its estimate
                estimate = irradiance_estimate(pixels.normal, rays, radiance)
                colour[start:stop] += lambertian / math.pi * (envmap.irradiance(pixels.normal) - estimate)

        self._chunks(model, len(prepared.pixels), options.rays, cancel, progress, work)
        timings["shade_ms"] = (time.perf_counter() - started) * 1e3
        lit = self._shade_lights(prepared, lights, options, cancel, timings)
        return self._finish(prepared, colour, lit, model, options, envmap, 0.0, timings, progress)

    # -- relighting -----------------------------------------------------------------------------------

    def can_cache(self, options: Options) -> bool:
        """Whether relight_cache() can serve these options: an HDRI-independent ray set, a linear shader."""
        return options.sampling in HDRI_INDEPENDENT and self.model(options.model).shader.unbiased

    @torch.inference_mode()
    def relight_cache(self, prepared: PreparedGBuffer, options: Options, *, progress: Progress | None = None,
                      cancel: CancelCheck | None = None) -> RelightCache:
        """Everything of a render that the HDRI does not change: the rays and f cos / (pdf N) per pixel and ray.

        Costs about one render with options.rays rays and keeps 12 bytes per pixel and ray.
        """
        if options.sampling not in HDRI_INDEPENDENT:
            raise ValueError(f"a relight cache needs a ray set that does not depend on the HDRI "
                             f"({', '.join(HDRI_INDEPENDENT)}), not {options.sampling!r}")
        model = self.model(options.model)
        if not model.shader.unbiased:
            raise ValueError(f"model {options.model!r} is not linear in the radiance; it cannot be relit from "
                             "a cache")
        shader = self.shader_for(options.model)
        brdf_cos = shader.brdf_cos
        count, n = len(prepared.pixels), options.rays
        weights = torch.empty(3, count, n, device=self.device)
        diffuse = torch.zeros(count, 3, device=self.device)
        shared = None if options.sampling in PER_PIXEL else make_rays(options.sampling, n, options.seed,
                                                                     device=self.device)
        directions = shared.directions if shared is not None else torch.empty(count, n, 3, device=self.device)

        def work(start: int, stop: int) -> None:
            pixels = prepared.pixels.slice(start, stop)
            rays = shared
            if rays is None:
                rays = make_rays(options.sampling, n, options.seed, normals=pixels.normal, device=self.device)
                directions[start:stop] = rays.directions
            value = brdf_cos(pixels, rays.directions) / (rays.pdf[..., None] * n)
            lambertian = model.shader.lambertian(pixels)
            if lambertian is not None:  # the control variate, as in shade()
                diffuse[start:stop] = lambertian / math.pi
                value = value - diffuse[start:stop, None] * cosine_weights(pixels.normal, rays)[..., None]
            weights[:, start:stop] = value.permute(2, 0, 1)

        self._chunks(model, count, n, cancel, progress, work)
        return RelightCache(prepared, options, directions, weights, diffuse)

    @torch.inference_mode()
    def relight(self, cache: RelightCache, hdri: np.ndarray, rotation: float = 0.0, *, options: Options | None = None,
                lights: list[Light] = (), progress: Progress | None = None, timings: dict | None = None) -> Result:
        """Shade the cached G-buffer under an HDRI rotated by `rotation` radians about +Z (as
        EnvironmentMap.rotated): a radiance lookup at the cached directions, one contraction, the shadow net;
        the lights (not rotated: they are scene objects) are shaded afresh.
        `options` (default: the cache's) may differ from the cache's only outside model, rays, sampling, seed."""
        options = options or cache.options
        if not cache.matches(cache.prepared, options):
            raise ValueError("the relight cache was built for other model, rays, sampling or seed options")
        timings = dict(timings or {})
        started = time.perf_counter()
        envmap = EnvironmentMap(hdri, self.device)
        directions = cache.directions if rotation == 0 else rotate_z(cache.directions, -rotation)
        radiance = envmap.lookup(directions).permute(2, 0, 1)  # (3, 1 or P, N)
        if radiance.shape[1] == 1:  # a shared ray set: one matrix-vector product per colour channel
            colour = torch.bmm(cache.weights, radiance.transpose(1, 2))[..., 0].T
        else:
            colour = (cache.weights * radiance).sum(-1).T
        turned = envmap.rotated(rotation) if rotation else envmap
        colour = colour + cache.diffuse * turned.irradiance(cache.prepared.pixels.normal)
        timings["shade_ms"] = (time.perf_counter() - started) * 1e3
        lit = self._shade_lights(cache.prepared, lights, options, None, timings)
        model = self.model(options.model)
        return self._finish(cache.prepared, colour.contiguous(), lit, model, options, envmap, rotation, timings,
                            progress)

    # -- analytic lights -------------------------------------------------------------------------------

    def light_visibility(self, prepared: PreparedGBuffer, lights: list[Light]) -> list[torch.Tensor | None]:
        """Per light, the foreground pixels' visibility of it, (P,) or (P, S) for its samples, or None
        (fully visible): from its shadow map (backend/shadowmaps.py); a light without one is fully visible."""
        return [shadow_visibility(light.shadow, prepared.positions, prepared.pixels.normal, light_size(light))
                if isinstance(light.shadow, ShadowMap) else None for light in lights]

    def _shade_lights(self, prepared: PreparedGBuffer, lights: list[Light], options: Options,
                      cancel: CancelCheck | None, timings: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The lights' (shadowed, unshadowed) radiance per foreground pixel, (P, 3) each, in chunks; kept on
        `prepared` for later relights with the same lights (the same objects, as the service passes them)."""
        started = time.perf_counter()
        count = len(prepared.pixels)
        shadowed, unshadowed = (torch.zeros(count, 3, device=self.device) for _ in range(2))
        if not lights:
            return shadowed, unshadowed
        key = (options.model, options.seed, self.light_samples)
        kept_lights, kept = prepared.lit.get(key, ((), None))
        if len(kept_lights) == len(lights) and all(a is b for a, b in zip(kept_lights, lights, strict=True)):
            timings["lights_ms"] = 0.0
            return kept
        shader = self.shader_for(options.model)
        visibility = self.light_visibility(prepared, lights)

        def work(start: int, stop: int) -> None:
            seen = [None if v is None else v[start:stop] for v in visibility]
            shadowed[start:stop], unshadowed[start:stop] = shade_lights(
                shader, prepared.pixels.slice(start, stop), prepared.positions[start:stop], lights, seen,
                samples=self.light_samples, seed=options.seed)

        self._chunks(self.model(options.model), count, self.light_samples * len(lights), cancel, None, work)
        timings["lights_ms"] = (time.perf_counter() - started) * 1e3
        prepared.lit[key] = (list(lights), (shadowed, unshadowed))
        return shadowed, unshadowed

    # -- the image-space part -------------------------------------------------------------------------

    def _finish(self, prepared: PreparedGBuffer, colour: torch.Tensor, lit: tuple[torch.Tensor, torch.Tensor],
                model: ShadingModel, options: Options, envmap: EnvironmentMap, rotation: float, timings: dict,
                progress: Progress | None) -> Result:
        """Scatter the shaded pixels into images, apply the shadow estimator to the HDRI's part, add the
        lights' (shadowed, unshadowed) part `lit`, and build the result."""
        started = time.perf_counter()
        height, width = prepared.height, prepared.width

        def image(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(height * width, 3, device=self.device)
            out[prepared.index] = values
            return out.view(height, width, 3)

        unshadowed = image(colour)
        lights, lights_unshadowed = image(lit[0]), image(lit[1])
        shaded, shadow, layers = unshadowed, torch.ones(height, width, device=self.device), {}
        if options.shadows and model.shadow is not None:
            images = prepared.images

            def planar(array: torch.Tensor) -> torch.Tensor:  # (H, W, 3) -> (1, 3, H, W)
                return array.permute(2, 0, 1)[None]

            physical = []
            if model.shadow.transport:
                marched = time.perf_counter()
                transport = prepared.transport(envmap, rotation, planar(unshadowed), planar(lights), options.preview)
                timings["transport_ms"] = (time.perf_counter() - marched) * 1e3
                physical = [transport.visibility, transport.indirect]
                layers = {name: getattr(transport, name)[0].permute(1, 2, 0).squeeze(-1).cpu().numpy()
                          for name in TRANSPORT_LAYERS}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                shadow_image, indirect = model.shadow(planar(unshadowed), images["albedo"], images["normal"],
                                                      images["ao"], images["depth"], images["mask"], *physical)
            shadow_image, indirect = shadow_image.float(), indirect.float()
            mask = images["mask"][0, 0] > 0
            shadow = torch.where(mask, shadow_image[0, 0], 1.0)
            shaded = composite(planar(unshadowed), shadow_image, indirect, images["mask"])[0].permute(1, 2, 0)
        timings["shadow_ms"] = (time.perf_counter() - started) * 1e3
        if progress is not None:
            progress(1.0)
        images, alpha = [shaded + lights, unshadowed + lights_unshadowed], prepared.mask.copy()
        if prepared.coverage is not None:
            images, alpha = antialiased(images, prepared.images["mask"][0, 0] > 0,
                                        torch.from_numpy(prepared.coverage).to(self.device))
            alpha = alpha.cpu().numpy()
        meta = {**asdict(options), "device": str(self.device), "model_info": model.info,
                "timings": {k: round(v, 3) for k, v in timings.items()}}
        return Result(shaded=images[0].cpu().numpy(), unshadowed=images[1].cpu().numpy(),
                      lights=lights.cpu().numpy(), shadow=shadow.cpu().numpy(), mask=alpha, meta=meta,
                      transport=layers)
