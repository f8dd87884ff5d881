"""`pbnds train`: two-stage training of a shading model (docs/training.md).

Stage one trains the shader alone: each step draws foreground pixels from several training images,
shades each image's pixels with fresh light rays drawn for that image's HDRI (backend.sampling, the
renderer's ray sets), and fits the shadow-free Cycles render. Stage two freezes the shader, renders its
unshadowed images once through the renderer, and trains the shadow estimator on them against the full
Cycles render. Validation renders the val split from the saved checkpoint through backend.renderer, so
its numbers are what `pbnds shade --model CHECKPOINT` gives.

A run folder holds config.json (the settings, also inside every checkpoint), log.csv, checkpoint.* and
state.* (the latest model, and the optimizer, step and clock, for --resume), stage1.* (the shader after
stage one, which stage two starts from) and model.* (the final model). Everything is safetensors + JSON.

Randomness is a function of (seed, stage, step, rank): every batch, pixel and ray set is drawn from
generators seeded by those numbers, so the step counter is the whole random state. A resumed run
continues exactly as an uninterrupted one, and torchrun ranks draw different pixels from the same image
order. Heavy imports (torch, the renderer) happen inside the functions so that `pbnds --help` stays fast.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from backend.jobformat import SAMPLINGS

from .losses import LOSSES, PAIRED, paired_loss, reconstruction_loss

if TYPE_CHECKING:
    import torch

    from backend.jobformat import Result
    from backend.models import ShadingModel
    from backend.renderer import PreparedGBuffer

    from .data import Sample

MODELS = ("default", "pbnds-paper")
STAGES = ("1", "2", "both")
SCHEDULES = ("cosine", "constant")
COSINE_FLOOR = 0.05  # the cosine schedule ends at this fraction of the learning rate
LOG_COLUMNS = ("stage", "step", "epoch", "loss", "lr", "val_psnr_fg", "val_psnr_lin_fg", "seconds")
RESUMABLE_CHANGES = ("device",)  # options that --resume may change (and DATA); the others must match the run


@dataclass
class TrainConfig:
    """Everything a run depends on: printed at the start, saved as config.json and inside every checkpoint.

    The defaults are our preset ("default"); PRESETS["paper"] overrides them with the paper's settings.
    """

    data: str  # dataset root (training/data.py)
    out: str  # run folder
    model: str = "default"  # architecture: default | pbnds-paper
    preset: str = "default"  # the table of settings that filled the options not given
    stage: str = "both"  # 1 | 2 | both
    # stage one: the shader, on foreground pixels against the shadow-free render
    epochs: int = 150  # an epoch shows every training image once (images_per_batch at a time)
    steps: int | None = None  # stage-one steps; overrides epochs
    batch_pixels: int = 8192  # pixels per step and rank, split evenly over images_per_batch images
    images_per_batch: int = 8
    rays: int = 64  # light rays per pixel, drawn afresh every step
    sampling: str = "importance"  # ray set (backend.sampling); the paper shader needs the one it is used with
    val_rays: int = 256  # rays of the renderer (same sampling, seed 0) for validation and stage two's inputs
    loss: str = "log-l1"  # training/losses.py
    lr: float = 3e-3
    schedule: str = "cosine"
    # stage two: the shadow estimator, on whole images (or crops) against the full render
    shadow_epochs: int = 40
    shadow_steps: int | None = None
    shadow_batch: int = 4  # images (or crops) per step and rank
    shadow_crop: int = 0  # square crop size; 0: whole images (they must then share one size)
    shadow_lr: float = 1e-3
    # both stages
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N; torchrun ranks take cuda:LOCAL_RANK
    amp: bool = False  # bfloat16 autocast of the forward passes (meant for CUDA)
    limit: int | None = None  # at most this many training samples
    val_limit: int | None = None  # at most this many validation samples
    val_every: int = 10  # epochs between validations (the first and last step are always validated)
    log_every: int = 10  # steps per loss row in log.csv

    def validate(self) -> None:
        choices = {"model": MODELS, "preset": tuple(PRESETS), "stage": STAGES, "sampling": SAMPLINGS,
                   "loss": LOSSES, "schedule": SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {list(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("epochs", "batch_pixels", "images_per_batch", "rays", "val_rays", "shadow_epochs", "shadow_batch",
                     "val_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "shadow_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.batch_pixels < self.images_per_batch:
            raise ValueError("--batch-pixels must be at least --images-per-batch")


PRESETS: dict[str, dict] = {
    "default": {},
    # the paper (section 3.3) and its public code: one image's 8192 pixels per step, 128 uniform rays,
    # Adam at a constant 5e-5, L1 on linear values, 40 epochs per stage
    "paper": {"epochs": 40, "batch_pixels": 8192, "images_per_batch": 1, "rays": 128, "sampling": "uniform",
              "val_rays": 128, "loss": "l1", "lr": 5e-5, "schedule": "constant", "shadow_epochs": 40, "shadow_batch": 1,
              "shadow_crop": 0, "shadow_lr": 5e-5},
}


def make_config(data: str, out: str, preset: str | None = None, **options) -> TrainConfig:
    """The preset's settings under the options given (None means: not given)."""
    preset = preset or "default"
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {preset!r}")
    given = {key: value for key, value in options.items() if value is not None}
    config = TrainConfig(data=str(data), out=str(out), preset=preset, **{**PRESETS[preset], **given})
    config.validate()
    return config


def print_config(config: TrainConfig) -> None:
    width = max(len(f.name) for f in fields(config))
    print("pbnds train: config", file=sys.stderr)
    for f in fields(config):
        print(f"  {f.name:<{width}} {getattr(config, f.name)}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Processes (torchrun) and randomness


@dataclass
class Workers:
    """This process's place among torchrun's processes; a plain run is rank 0 of 1."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device_name: str) -> Workers:
        import torch
        import torch.distributed as dist

        from backend.renderer import pick_device

        device = pick_device(device_name)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module):
        """DistributedDataParallel around the module (gradients averaged over the ranks) when there are ranks."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def reduce(self, loss: float, stop: bool) -> tuple[float, bool]:
        """(mean loss over the ranks, whether any rank was asked to stop): one collective per step."""
        if self.world == 1:
            return loss, stop
        import torch
        import torch.distributed as dist

        values = torch.tensor([loss, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return values[0].item() / self.world, values[1].item() > 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def seed_of(*keys: int) -> int:
    """A 32-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    import numpy as np

    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def generator(*keys: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed_of(*keys))


def steps_per_epoch(images: int, per_step: int, world: int) -> int:
    return max(1, math.ceil(images / (per_step * world)))


def step_images(seed: int, stage: int, step: int, images: int, per_step: int, workers: Workers) -> list[int]:
    """The training images of one step on this rank: consecutive slices of the epoch's shuffled order."""
    import torch

    epoch, within = divmod(step, steps_per_epoch(images, per_step, workers.world))
    order = torch.randperm(images, generator=generator(seed, stage, 0, epoch)).tolist()
    first = (within * workers.world + workers.rank) * per_step
    return [order[(first + i) % images] for i in range(per_step)]


def learning_rate(config: TrainConfig, base: float, step: int, total: int) -> float:
    if config.schedule == "constant":
        return base
    return base * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * step / total)))


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after the current step; it saves a checkpoint
    and exits. A second signal stops at once."""

    def __enter__(self) -> StopRequest:
        self.requested = False
        self._previous = {}
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, number, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# ------------------------------------------------------------------------------------------------
# Validation


def psnr_scores(predictions, targets, masks) -> dict[str, float]:
    """Mean over images of the foreground PSNR in display space (sRGB, training/metrics.py) and on linear values."""
    import numpy as np

    from .metrics import masked_mean, psnr_from_mse, to_display

    display, linear = [], []
    for prediction, target, mask in zip(predictions, targets, masks, strict=True):
        foreground = mask > 0
        display.append(psnr_from_mse(masked_mean(((to_display(prediction) - to_display(target)) ** 2).mean(-1),
                                                 foreground)))
        linear.append(psnr_from_mse(masked_mean(((prediction - target) ** 2).mean(-1), foreground)))
    return {"val_psnr_fg": round(float(np.mean(display)), 4), "val_psnr_lin_fg": round(float(np.mean(linear)), 4)}


def render_unshadowed(checkpoint: Path, prepared: list[PreparedGBuffer], samples: list[Sample], rays: int,
                      sampling: str, device: torch.device, desc: str | None = None) -> list[Result]:
    """The shader's shadow-free renders of the samples from a checkpoint by backend.renderer (rays seeded 0):
    premultiplied by their alpha, the G-buffer's coverage (backend/edges.py)."""
    from tqdm import tqdm

    from backend.jobformat import Options
    from backend.renderer import Renderer

    renderer = Renderer(str(device))
    options = Options(model=str(checkpoint), rays=rays, sampling=sampling, seed=0, shadows=False)
    pairs = zip(prepared, samples, strict=True)
    if desc is not None:
        pairs = tqdm(pairs, total=len(samples), desc=desc, leave=False, file=sys.stderr)
    return [renderer.shade(p, sample.job.hdri, options) for p, sample in pairs]


def on_film(premultiplied, alpha, background):
    """backend.edges.over_background for (B, C, H, W) tensors with their alpha (B, 1, H, W): the image as the
    ground truth's opaque film shows it (and `pbnds eval` scores it), part object and part world at a
    silhouette."""
    return premultiplied + (1 - alpha) * background


COVERED = 0.999  # the coverage of a pixel that stage one fits


def covered_pixels(sample: Sample, prepared: PreparedGBuffer) -> torch.Tensor:
    """Indices into the foreground pixels that stage one fits: those the objects cover whole. Where the G-buffer
    has a coverage layer, Cycles' silhouette pixels hold part of the world too, which the shader cannot
    explain; an image with no whole pixel keeps them all."""
    import numpy as np
    import torch

    count = len(prepared.index)
    coverage = sample.job.gbuffer.coverage
    if coverage is None:
        return torch.arange(count)
    whole = torch.from_numpy(np.flatnonzero(coverage.reshape(-1)[prepared.index.cpu().numpy()] >= COVERED))
    return whole if len(whole) else torch.arange(count)


def shading_target(sample: Sample):
    """Stage one's target: the shadow-free render, or the full render where a dataset has none (as the paper)."""
    return sample.gt_unshadowed if sample.gt_unshadowed is not None else sample.gt_full


def prepare(samples: list[Sample], device: torch.device) -> list[PreparedGBuffer]:
    from backend.renderer import PreparedGBuffer

    return [PreparedGBuffer.build(s.job.gbuffer, s.job.camera, device, s.job.surround) for s in samples]


# ------------------------------------------------------------------------------------------------
# The two stages


class ShaderStage:
    """Stage one: the shader on batches of foreground pixels from several images, each with its own rays."""

    number = 1

    def __init__(self, config: TrainConfig, model: ShadingModel, train: list[Sample], val: list[Sample],
                 workers: Workers):
        import torch

        from backend.envmap import EnvironmentMap

        self.config, self.workers, self.val = config, workers, val
        self.model = model.to(workers.device)
        self.module = model.shader
        self.validating = bool(val)
        self.lr, self.epochs, self.steps = config.lr, config.epochs, config.steps
        self.images, self.per_step = len(train), config.images_per_batch
        self.prepared = prepare(train, workers.device)
        self.envmaps = [EnvironmentMap(s.job.hdri, workers.device) for s in train]
        self.targets = [torch.from_numpy(shading_target(s).reshape(-1, 3)[p.index.cpu().numpy()]).to(workers.device)
                        for s, p in zip(train, self.prepared, strict=True)]
        self.covered = [covered_pixels(s, p).to(workers.device) for s, p in zip(train, self.prepared, strict=True)]
        self.val_prepared = prepare(val, workers.device)

    def batch(self, step: int, estimates: int = 1):
        """(pixels, [(rays, radiance)] x estimates, target) of this rank's step: batch_pixels // images_per_batch
        pixels per image, drawn with replacement, and for each image `estimates` independent ray sets drawn
        from its HDRI with seeds of their own."""
        import torch

        from backend.sampling import PER_PIXEL, RaySet, make_rays
        from backend.shaders import PixelInputs

        config, device = self.config, self.workers.device
        count = config.batch_pixels // config.images_per_batch
        images = step_images(config.seed, 1, step, self.images, self.per_step, self.workers)
        draw = generator(config.seed, 1, 1, step, self.workers.rank)
        parts = []
        for image in images:
            prepared, envmap = self.prepared[image], self.envmaps[image]
            covered = self.covered[image]
            index = covered[torch.randint(len(covered), (count,), generator=draw).to(device)]
            source = prepared.pixels
            pixels = PixelInputs(*(t[index] for t in (source.albedo, source.specular, source.roughness,
                                                      source.normal, source.wo)))
            ray_sets = []
            for _ in range(estimates):
                ray_seed = int(torch.randint(2**31 - 1, (1,), generator=draw))
                if config.sampling in PER_PIXEL:
                    rays = make_rays(config.sampling, config.rays, ray_seed, envmap=envmap, normals=pixels.normal,
                                     wo=pixels.wo, roughness=pixels.roughness, device=device)
                else:
                    rays = make_rays(config.sampling, config.rays, ray_seed, envmap=envmap, device=device)
                ray_sets.append((rays.directions.expand(count, -1, -1), rays.pdf.expand(count, -1),
                                 envmap.lookup(rays.directions).expand(count, -1, -1)))
            parts.append((pixels, ray_sets, self.targets[image][index]))
        pixels = PixelInputs(*(torch.cat([getattr(p[0], f.name) for p in parts]) for f in fields(PixelInputs)))
        ray_sets = [(RaySet(*(torch.cat([p[1][k][i] for p in parts]) for i in range(2))),
                     torch.cat([p[1][k][2] for p in parts])) for k in range(estimates)]
        return pixels, ray_sets, torch.cat([p[2] for p in parts])

    def loss(self, module, step: int):
        import torch

        paired = self.config.loss in PAIRED
        pixels, ray_sets, target = self.batch(step, estimates=2 if paired else 1)
        with torch.autocast(self.workers.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
            predictions = [module(pixels, rays, radiance) for rays, radiance in ray_sets]
        if paired:
            return paired_loss(*predictions, target)
        return reconstruction_loss(self.config.loss, predictions[0], target)

    def validate(self, checkpoint: Path) -> dict[str, float]:
        from backend.edges import over_background, world_background

        results = render_unshadowed(checkpoint, self.val_prepared, self.val, self.config.val_rays,
                                    self.config.sampling, self.workers.device)
        images = [over_background(r.unshadowed, r.mask, world_background(s.job))
                  for r, s in zip(results, self.val, strict=True)]
        return psnr_scores(images, [shading_target(s) for s in self.val], [s.job.gbuffer.mask for s in self.val])


SHADOW_INPUTS = ("unshadowed", "albedo", "normal", "ao", "depth", "mask")
FILM = ("alpha", "background", "target")  # what stage two composes its film from and scores it against


class ShadowStage:
    """Stage two: the shadow estimator on whole images (or crops) of the frozen shader's output."""

    number = 2

    def __init__(self, config: TrainConfig, model: ShadingModel, stage_one: Path, train: list[Sample],
                 val: list[Sample], workers: Workers):
        """stage_one: the checkpoint of stage one; its images are rendered with the rays stage one used."""
        import numpy as np
        import torch

        from backend.edges import world_background
        from backend.envmap import EnvironmentMap
        from backend.models import load_checkpoint

        self.config, self.workers = config, workers
        self.model = model.to(workers.device)
        self.module = model.shadow
        self.validating = bool(val)
        model.shader.requires_grad_(False)
        shading = load_checkpoint(stage_one).info["training"]["config"]
        self.lr, self.epochs, self.steps = config.shadow_lr, config.shadow_epochs, config.shadow_steps
        self.images, self.per_step = len(train), config.shadow_batch

        def tensors(samples: list[Sample], desc: str) -> list[dict[str, torch.Tensor]]:
            prepared = prepare(samples, workers.device)
            results = render_unshadowed(stage_one, prepared, samples, shading["val_rays"], shading["sampling"],
                                        workers.device, desc if workers.main else None)
            out = []
            for p, result, sample in zip(prepared, results, samples, strict=True):
                # the net sees the shading as the renderer gives it to it, not yet premultiplied by the coverage
                alpha = result.mask[..., None]
                straight = np.where(alpha > 0, result.unshadowed / np.maximum(alpha, 1e-6), 0).astype(np.float32)
                images = {"unshadowed": straight, "alpha": alpha.astype(np.float32),
                          "background": world_background(sample.job), "target": sample.gt_full}
                images = {k: torch.from_numpy(v).permute(2, 0, 1)[None].to(workers.device) for k, v in images.items()}
                if model.shadow.transport:
                    envmap = EnvironmentMap(sample.job.hdri, workers.device)
                    transport = p.transport(envmap, 0.0, images["unshadowed"], torch.zeros_like(images["unshadowed"]))
                    images.update(visibility=transport.visibility, indirect=transport.indirect)
                out.append({**p.images, **images})
            return out

        self.inputs = (*SHADOW_INPUTS, "visibility", "indirect") if model.shadow.transport else SHADOW_INPUTS

        self.train = tensors(train, "stage 2: shading the training images")
        self.val = tensors(val, "stage 2: shading the validation images")
        crop = config.shadow_crop
        sizes = {tuple(t["mask"].shape[-2:]) for t in self.train}
        if crop and min(min(size) for size in sizes) < crop:
            raise ValueError(f"--shadow-crop {crop} is larger than a training image ({min(sizes)})")
        if not crop and len(sizes) > 1:
            raise ValueError(f"training images differ in size ({sorted(sizes)}); pass --shadow-crop N")

    def loss(self, module, step: int):
        import torch

        from backend.shadow import composite

        config = self.config
        images = step_images(config.seed, 2, step, self.images, self.per_step, self.workers)
        draw = generator(config.seed, 2, 1, step, self.workers.rank)
        crops = []
        for image in images:
            tensors = self.train[image]
            if config.shadow_crop:
                height, width = tensors["mask"].shape[-2:]
                top = int(torch.randint(height - config.shadow_crop + 1, (1,), generator=draw))
                left = int(torch.randint(width - config.shadow_crop + 1, (1,), generator=draw))
                window = (..., slice(top, top + config.shadow_crop), slice(left, left + config.shadow_crop))
                tensors = {k: v[window] for k, v in tensors.items()}
            crops.append(tensors)
        batch = {k: torch.cat([c[k] for c in crops]) for k in (*self.inputs, *FILM)}
        with torch.autocast(self.workers.device.type, dtype=torch.bfloat16, enabled=config.amp):
            shadow, indirect = module(*(batch[k] for k in self.inputs))
        prediction = composite(batch["unshadowed"], shadow.float(), indirect.float(), batch["mask"])
        film = on_film(prediction * batch["alpha"], batch["alpha"], batch["background"])
        return reconstruction_loss(config.loss, film, batch["target"], batch["mask"])

    def validate(self, checkpoint: Path) -> dict[str, float]:
        import torch

        from backend.shadow import composite

        predictions, targets, masks = [], [], []
        with torch.no_grad():
            for tensors in self.val:
                shadow, indirect = self.module(*(tensors[k] for k in self.inputs))
                image = composite(tensors["unshadowed"], shadow, indirect, tensors["mask"])
                image = on_film(image * tensors["alpha"], tensors["alpha"], tensors["background"])
                predictions.append(image[0].permute(1, 2, 0).cpu().numpy())
                targets.append(tensors["target"][0].permute(1, 2, 0).cpu().numpy())
                masks.append(tensors["mask"][0, 0].cpu().numpy())
        return psnr_scores(predictions, targets, masks)


# ------------------------------------------------------------------------------------------------
# Run folder: log, checkpoints, resume state


class Log:
    """log.csv: a loss row every log_every steps and a row per validation."""

    def __init__(self, path: Path, keep: tuple[int, int] | None):
        """keep (stage, step): rows up to that point of a run being resumed stay, later ones go."""
        self.path = path
        rows = []
        if keep is not None and path.is_file():
            with path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle)
                        if (int(row["stage"]), int(row["step"])) <= keep]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, LOG_COLUMNS).writerow(row)


def write_state(run: Path, model: ShadingModel, optimizer, meta: dict, summary: dict) -> None:
    """checkpoint.* (the model, loadable by load_checkpoint) and state.* (optimizer tensors and counters),
    each written beside and then renamed over the previous one."""
    from safetensors.torch import save_file

    from backend.models import save_checkpoint

    save_checkpoint(model, run / "checkpoint.partial.safetensors", training=summary)
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value.detach().cpu().contiguous()
               for index, values in state["state"].items() for key, value in values.items()}
    meta = {**meta, "param_groups": state["param_groups"]}
    save_file(tensors, str(run / "state.partial.safetensors"), metadata={"pbnds_state": json.dumps(meta)})
    (run / "state.partial.json").write_text(json.dumps(meta, indent=1))
    for name in ("checkpoint", "state"):
        for suffix in (".safetensors", ".json"):
            os.replace(run / f"{name}.partial{suffix}", run / f"{name}{suffix}")


def read_state(run: Path) -> tuple[dict, dict]:
    """(counters, optimizer state_dict) saved by write_state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = run / "state.safetensors"
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist (nothing to resume)")
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["pbnds_state"])
    optimizer: dict = {"state": {}, "param_groups": meta.pop("param_groups")}
    for name, value in load_file(str(path)).items():
        _, index, key = name.split(".", 2)
        optimizer["state"].setdefault(int(index), {})[key] = value
    return meta, optimizer


def run_stage(stage, config: TrainConfig, workers: Workers, run: Path, log: Log, summary: dict,
              resume: tuple[dict, dict] | None) -> dict | None:
    """Train one stage; its summary, or None when a signal stopped it (a checkpoint holds where)."""
    import torch
    from tqdm import tqdm

    from backend.models import save_checkpoint

    module = workers.wrap(stage.module)
    stage.module.train()
    optimizer = torch.optim.Adam(stage.module.parameters(), lr=stage.lr)
    per_epoch = steps_per_epoch(stage.images, stage.per_step, workers.world)
    total = stage.steps if stage.steps is not None else stage.epochs * per_epoch
    meta = {"stage": stage.number, "step": 0, "total_steps": total, "steps_per_epoch": per_epoch,
            "finished": False, "seconds": 0.0, "val_start": None, "val": None, "world_size": workers.world,
            "losses": []}  # losses of the steps since the last loss row of the log
    if resume is not None:
        saved, optimizer_state = resume
        if saved["total_steps"] != total:
            raise ValueError(f"--resume: the run has {saved['total_steps']} steps in stage {stage.number}, "
                             f"these settings give {total} (another number of ranks or images?)")
        meta.update({k: saved[k] for k in ("step", "seconds", "val_start", "val", "losses")})
        optimizer.load_state_dict(optimizer_state)
        if workers.main:
            print(f"pbnds train: resuming stage {stage.number} at step {meta['step']} of {total}", file=sys.stderr)
    started = time.perf_counter() - meta["seconds"]

    def stage_summary() -> dict:
        return {**summary, "stages": {**summary["stages"], str(stage.number): {
            k: meta[k] for k in ("step", "total_steps", "steps_per_epoch", "seconds", "val_start", "val")}}}

    def checkpoint(validate: bool) -> None:
        """Rank 0 saves the model and state (then validates the saved model); the others wait."""
        meta["seconds"] = round(time.perf_counter() - started, 2)
        if workers.main:
            write_state(run, stage.model, optimizer, meta, stage_summary())
            if validate and stage.validating:
                scores = stage.validate(run / "checkpoint.safetensors")
                meta["val"] = scores
                meta["val_start"] = meta["val_start"] or scores
                log.write(stage=stage.number, step=meta["step"], epoch=round(meta["step"] / per_epoch, 3),
                          lr=optimizer.param_groups[0]["lr"], seconds=meta["seconds"], **scores)
                bar.set_postfix_str(f"val {scores['val_psnr_fg']:.2f} dB")
                write_state(run, stage.model, optimizer, meta, stage_summary())
        workers.barrier()

    bar = tqdm(total=total, initial=meta["step"], desc=f"stage {stage.number}", disable=not workers.main,
               dynamic_ncols=True, file=sys.stderr)
    if meta["step"] == 0:
        meta["finished"] = total == 0  # 0 steps: the untrained model is the stage's result
        checkpoint(validate=True)  # the untrained model's scores
    with bar, StopRequest() as stop:
        for step in range(meta["step"], total):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, stage.lr, step, total)
            loss = stage.loss(module, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mean_loss, stopping = workers.reduce(loss.item(), stop.requested)
            meta["losses"].append(mean_loss)
            meta["step"] = done = step + 1
            bar.update()
            if done % config.log_every == 0 or done == total:
                interval = sum(meta["losses"]) / len(meta["losses"])
                meta["losses"] = []
                if workers.main:
                    log.write(stage=stage.number, step=done, epoch=round(done / per_epoch, 3), loss=interval,
                              lr=optimizer.param_groups[0]["lr"], seconds=round(time.perf_counter() - started, 2))
                bar.set_postfix_str(f"loss {interval:.4g}")
            meta["finished"] = done == total
            if stopping:
                checkpoint(validate=False)
                if workers.main:
                    print(f"\npbnds train: stopped at stage {stage.number} step {done}; continue with --resume",
                          file=sys.stderr)
                return None
            if done % per_epoch == 0 or done == total:
                epoch = done // per_epoch
                checkpoint(validate=done == total or epoch % config.val_every == 0)
    result = stage_summary()
    if stage.number == 1 and workers.main:
        save_checkpoint(stage.model, run / "stage1.safetensors", training=result)
    workers.barrier()
    return result


# ------------------------------------------------------------------------------------------------
# The command


def train(config: TrainConfig, resume: bool = False) -> ShadingModel | None:
    """Run the configured stages and write OUT/model.safetensors; the final model, or None when a signal
    stopped the run (its last step is in the checkpoint)."""
    import torch

    from backend.models import ShadingModel, load_checkpoint, new_model, save_checkpoint

    from .data import load_split

    run = Path(config.out)
    workers = Workers.start(config.device)
    try:
        state = read_state(run) if resume else None
        if workers.main:
            print_config(config)
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(json.dumps(asdict(config), indent=1))
        train_samples = load_split(config.data, "train", config.limit)
        val_samples = load_split(config.data, "val", config.val_limit)
        if not train_samples:
            raise ValueError(f"{config.data}: split 'train' has no samples")
        if workers.main:
            missing = sum(s.gt_unshadowed is None for s in train_samples)
            print(f"pbnds train: {len(train_samples)} training and {len(val_samples)} validation samples on "
                  f"{workers.device} x {workers.world}" + (f"; {missing} without a shadow-free render: stage one "
                                                            "fits their full render" if missing else ""),
                  file=sys.stderr)
        stages = {"1": [1], "2": [2], "both": [1, 2]}[config.stage]
        if state is not None:  # skip what the run has finished
            at = state[0]
            stages = [n for n in stages if n > at["stage"] or (n == at["stage"] and not at["finished"])]
            if not stages:
                print(f"pbnds train: the run in {run} is finished", file=sys.stderr)
                return load_checkpoint(run / "model.safetensors")
        keep = (state[0]["stage"], state[0]["step"]) if state else (stages[0] - 1, 10**12)
        log = Log(run / "log.csv", keep) if workers.main else None
        summary = {"config": asdict(config), "device": str(workers.device), "world_size": workers.world,
                   "torch": torch.__version__, "data": {"train_samples": len(train_samples),
                                                        "val_samples": len(val_samples)}, "stages": {}}
        torch.manual_seed(config.seed)
        fresh = new_model(config.model)
        model = ShadingModel(fresh.name, fresh.shader, None)  # stage one's checkpoints hold no shadow estimator
        for number in stages:
            resumed = state if state is not None and state[0]["stage"] == number else None
            if resumed is not None:
                model = load_checkpoint(run / "checkpoint.safetensors")
            if number == 1:
                stage = ShaderStage(config, model, train_samples, val_samples, workers)
            else:
                stage_one = run / "stage1.safetensors"
                if not stage_one.is_file():
                    raise ValueError(f"stage two starts from the shader of stage one, {stage_one}, which does not "
                                     "exist: run stage one into this folder first (--stage 1)")
                shader = load_checkpoint(stage_one)
                if shader.name != config.model:
                    raise ValueError(f"{stage_one} is a {shader.name!r} model, not --model {config.model}")
                summary["stages"].update(shader.info["training"]["stages"])
                if resumed is None:
                    model = ShadingModel(fresh.name, shader.shader, fresh.shadow)
                stage = ShadowStage(config, model, stage_one, train_samples, val_samples, workers)
            summary = run_stage(stage, config, workers, run, log, summary, resumed)
            if summary is None:
                return None
            model = stage.model
        if workers.main:
            final = save_checkpoint(model, run / "model.safetensors", training=summary)
            print(json.dumps({"model": str(final), "stages": summary["stages"]}))
        return model
    finally:
        workers.finish()


def cmd_train(args) -> int:
    options = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if f.name not in ("data", "out")}
    run = Path(args.out)
    if args.resume:
        path = run / "config.json"
        if not path.is_file():
            raise ValueError(f"--resume: {path} does not exist (nothing to resume)")
        saved = json.loads(path.read_text())
        changed = [f"--{key.replace('_', '-')} {value} (the run has {saved.get(key)})"
                   for key, value in options.items()
                   if value is not None and key not in RESUMABLE_CHANGES and saved.get(key) != value]
        if changed:
            raise ValueError("--resume continues a run with its own settings; these differ: " + ", ".join(changed))
        resumable = {key: options[key] for key in RESUMABLE_CHANGES if options[key] is not None}
        config = TrainConfig(**{**saved, "data": str(args.data), **resumable})
        config.validate()
    else:
        config = make_config(args.data, args.out, **options)
        if (run / "state.json").is_file() and config.stage != "2":
            raise ValueError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    return 0 if train(config, resume=args.resume) is not None else 130


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train", help="train a shading model in two stages (shader, then shadow estimator)",
        description="Stage one fits the shader to the shadow-free Cycles renders, stage two the shadow estimator "
        "(with the shader frozen) to the full renders. Options not given come from --preset. Multi-GPU/CPU: "
        "torchrun --nproc-per-node N -m backend.cli train ... (docs/training.md).")
    parser.add_argument("data", type=Path, help="dataset root (splits.json, or MaterialFusion's layout)")
    parser.add_argument("--out", type=Path, required=True, help="run folder, e.g. runs/NAME")
    parser.add_argument("--model", choices=MODELS, help="architecture (default: default)")
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="settings for the options not given: default (ours) or paper (default: default)")
    parser.add_argument("--stage", choices=STAGES,
                        help="1: the shader; 2: the shadow estimator on the shader of an earlier --stage 1 "
                        "in the same --out; both (default)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    stage_one = parser.add_argument_group("stage one (shader)")
    stage_one.add_argument("--epochs", type=int, help=f"epochs (default: {TrainConfig.epochs}; paper preset 40)")
    stage_one.add_argument("--steps", type=int, help="steps (overrides --epochs); 0 keeps the untrained shader "
                           "(for the default model: GGX)")
    stage_one.add_argument("--batch-pixels", type=int, help=f"foreground pixels per step (default: "
                           f"{TrainConfig.batch_pixels})")
    stage_one.add_argument("--images-per-batch", type=int, help="images the pixels of a step come from "
                           f"(default: {TrainConfig.images_per_batch}; paper preset 1)")
    stage_one.add_argument("--rays", type=int, help=f"light rays per pixel (default: {TrainConfig.rays}; paper 128)")
    stage_one.add_argument("--val-rays", type=int, help="rays per pixel of the validation renders and of stage "
                           f"two's inputs (default: {TrainConfig.val_rays})")
    stage_one.add_argument("--sampling", choices=SAMPLINGS, help=f"ray set (default: {TrainConfig.sampling}; "
                           "paper preset uniform)")
    stage_one.add_argument("--loss", choices=LOSSES, help=f"reconstruction loss (default: {TrainConfig.loss}; "
                           "paper preset l1)")
    stage_one.add_argument("--lr", type=float, help=f"Adam learning rate (default: {TrainConfig.lr}; paper 5e-5)")
    stage_one.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: cosine; "
                           "paper preset constant)")
    stage_two = parser.add_argument_group("stage two (shadow estimator)")
    stage_two.add_argument("--shadow-epochs", type=int, help=f"epochs (default: {TrainConfig.shadow_epochs})")
    stage_two.add_argument("--shadow-steps", type=int, help="steps (overrides --shadow-epochs)")
    stage_two.add_argument("--shadow-batch", type=int, help=f"images per step (default: {TrainConfig.shadow_batch})")
    stage_two.add_argument("--shadow-crop", type=int, help="train on square crops of this size (default: whole images)")
    stage_two.add_argument("--shadow-lr", type=float, help=f"Adam learning rate (default: {TrainConfig.shadow_lr})")
    both = parser.add_argument_group("both stages")
    both.add_argument("--seed", type=int, help="seed of the initial weights, batches and rays (default: 0)")
    both.add_argument("--device", help="auto (CUDA if present), cpu, cuda or cuda:N (default: auto)")
    both.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast (CUDA)")
    both.add_argument("--limit", type=int, help="at most this many training samples")
    both.add_argument("--val-limit", type=int, help="at most this many validation samples")
    both.add_argument("--val-every", type=int, help=f"epochs between validations (default: {TrainConfig.val_every})")
    both.add_argument("--log-every", type=int, help=f"steps per loss row of log.csv (default: {TrainConfig.log_every})")
    parser.set_defaults(handler=cmd_train)
