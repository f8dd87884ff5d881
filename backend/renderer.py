"""Job -> result: gathers the foreground pixels, draws the rays, shades in memory-sized chunks,
applies the shadow estimator, and scatters the result back into images.

The work that does not depend on the lighting (pixel inputs, view directions, images for the
shadow net) lives in a PreparedGBuffer, built once per G-buffer and reused by relighting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .camera import view_directions
from .envmap import EnvironmentMap
from .jobformat import GBuffer, Job, Options, Result
from .models import ShadingModel, load_model
from .sampling import PER_PIXEL, make_rays
from .shaders import PixelInputs

Progress = Callable[[float], None]
CancelCheck = Callable[[], bool]

CPU_BUDGET_BYTES = 1 << 30
CUDA_BUDGET_FRACTION = 0.25
BYTES_PER_PIXEL_RAY = {"default": 1024, "pbnds-paper": 16384}  # peak activations, measured loosely


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
    images: dict[str, torch.Tensor]  # (1, C, H, W) inputs of the shadow net
    mask: np.ndarray

    @classmethod
    def build(cls, gbuffer: GBuffer, wo: np.ndarray, device: torch.device) -> PreparedGBuffer:
        height, width = gbuffer.size
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
        return cls(height, width, torch.from_numpy(index).to(device), pixels, images, gbuffer.mask)


def chunk_pixels(model: ShadingModel, rays: int, device: torch.device) -> int:
    """Pixels per chunk so that one chunk's activations fit the device's budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * CUDA_BUDGET_FRACTION)
    else:
        budget = CPU_BUDGET_BYTES
    per_pixel = rays * BYTES_PER_PIXEL_RAY.get(model.shader.name, 256)
    return max(64, budget // per_pixel)


class Renderer:
    """Shades jobs on one device; models are loaded once and cached by name."""

    def __init__(self, device: str | None = None, defaults: Options | None = None):
        self.device = pick_device(device)
        self.defaults = defaults or Options()
        self._models: dict[str, ShadingModel] = {}

    def model(self, spec: str) -> ShadingModel:
        if spec not in self._models:
            self._models[spec] = load_model(spec).to(self.device)
        return self._models[spec]

    def prepare(self, job: Job) -> PreparedGBuffer:
        wo = view_directions(job.camera, job.width, job.height)
        return PreparedGBuffer.build(job.gbuffer, wo, self.device)

    def render(self, job: Job, *, progress: Progress | None = None, cancel: CancelCheck | None = None) -> Result:
        started = time.perf_counter()
        prepared = self.prepare(job)
        return self.shade(prepared, job.hdri, job.options, progress=progress, cancel=cancel,
                          timings={"prepare_ms": (time.perf_counter() - started) * 1e3})

    @torch.inference_mode()
    def shade(self, prepared: PreparedGBuffer, hdri: np.ndarray, options: Options, *,
              progress: Progress | None = None, cancel: CancelCheck | None = None,
              timings: dict | None = None) -> Result:
        """Shade a prepared G-buffer under an HDRI: the whole render after prepare(), and a relight."""
        timings = dict(timings or {})
        started = time.perf_counter()
        model = self.model(options.model)
        envmap = EnvironmentMap(hdri, self.device)
        count = len(prepared.pixels)
        colour = torch.zeros(count, 3, device=self.device)
        shared_rays = None
        if options.sampling not in PER_PIXEL:
            shared_rays = make_rays(options.sampling, options.rays, options.seed, envmap=envmap, device=self.device)
            shared_radiance = envmap.lookup(shared_rays.directions)
        step = chunk_pixels(model, options.rays, self.device)
        start = 0
        while start < count:
            if cancel is not None and cancel():
                raise Cancelled("the render was cancelled")
            stop = min(start + step, count)
            pixels = prepared.pixels.slice(start, stop)
            try:
                if shared_rays is None:
                    rays = make_rays(options.sampling, options.rays, options.seed, envmap=envmap, normals=pixels.normal,
                                     wo=pixels.wo, roughness=pixels.roughness, device=self.device)
                    radiance = envmap.lookup(rays.directions)
                else:
                    rays, radiance = shared_rays, shared_radiance
                colour[start:stop] = model.shader(pixels, rays, radiance)
            except torch.OutOfMemoryError:
                if step <= 64:
                    raise
                step //= 2  # retry this chunk smaller
                torch.cuda.empty_cache()
                continue
            start = stop
            if progress is not None:
                progress(0.9 * start / max(count, 1))
        timings["shade_ms"] = (time.perf_counter() - started) * 1e3

        started = time.perf_counter()
        height, width = prepared.height, prepared.width
        unshadowed = torch.zeros(height * width, 3, device=self.device)
        unshadowed[prepared.index] = colour
        unshadowed = unshadowed.view(height, width, 3)
        shaded, shadow = unshadowed, torch.ones(height, width, device=self.device)
        if options.shadows and model.shadow is not None:
            images = prepared.images
            shadow_image, indirect = model.shadow(unshadowed.permute(2, 0, 1)[None], images["albedo"],
                                                  images["normal"], images["ao"], images["depth"], images["mask"])
            mask = images["mask"][0, 0] > 0
            shadow = torch.where(mask, shadow_image[0, 0], 1.0)
            shaded = (unshadowed * shadow[..., None] + indirect[0].permute(1, 2, 0)) * mask[..., None]
        timings["shadow_ms"] = (time.perf_counter() - started) * 1e3
        if progress is not None:
            progress(1.0)
        meta = {**asdict(options), "device": str(self.device), "model_info": model.info,
                "timings": {k: round(v, 3) for k, v in timings.items()}}
        return Result(shaded=shaded.cpu().numpy(), unshadowed=unshadowed.cpu().numpy(),
                      shadow=shadow.cpu().numpy(), mask=prepared.mask.copy(), meta=meta)
