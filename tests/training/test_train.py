"""`pbnds train` end to end on a tiny on-disk dataset: learning, reloading, resuming, torchrun with two CPU ranks."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend.exrio import write_exr
from backend.jobformat import Camera, Job, Options, write_job
from backend.renderer import Renderer
from backend.synthetic import Material, Plane, Sphere, constant_hdri, look_at, perspective, trace
from training import train as train_module
from training.losses import paired_loss, reconstruction_loss
from training.train import Workers, make_config, step_images, train

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16
GAIN = 1.6  # the "Cycles" renders are GGX x GAIN: a target the default shader's gains can reach exactly


def _job(seed: int) -> Job:
    rng = np.random.default_rng(seed)
    objects = [Plane(0.0, 3.0, Material(tuple(rng.uniform(0.2, 0.8, 3)), roughness=0.7)),
               Sphere((0.0, 0.0, 0.6), 0.6, Material(tuple(rng.uniform(0.1, 0.9, 3)), metallic=float(seed % 2),
                                                     roughness=float(rng.uniform(0.2, 0.8))))]
    angle = rng.uniform(0, 2 * np.pi)
    camera = Camera(look_at((3 * np.cos(angle), 3 * np.sin(angle), 1.8), (0.0, 0.0, 0.4)), perspective(40.0, 1.0))
    hdri = constant_hdri(tuple(rng.uniform(0.3, 1.0, 3)), 8)
    hdri[:2] *= 4.0  # a bright sky band
    return Job(SIZE, SIZE, trace(camera, SIZE, SIZE, objects), hdri, camera)


def _rgb(path: Path, image: np.ndarray) -> None:
    write_exr(path, {c: image[..., i] for i, c in enumerate("RGB")})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A dataset root in our layout (training/data.py): 2 train scenes x 2 views, 1 val scene x 2 views."""
    root = tmp_path_factory.mktemp("dataset")
    renderer = Renderer("cpu")
    table = {split: [] for split in ("train", "val", "test", "relight", "anim")}
    seed = 0
    for split, scenes in (("train", 2), ("val", 1)):
        for k in range(scenes):
            scene, entries = f"{split}/scene_{k}", []
            for view in range(2):
                job, name = _job(seed), f"v{view:03d}_h00"
                seed += 1
                write_job(job, root / scene / name)
                job.options = Options(model="ggx", rays=256, sampling="importance", shadows=False)
                unshadowed = (renderer.render(job).unshadowed * GAIN).astype(np.float32)
                _rgb(root / scene / name / "gt_unshadowed.exr", unshadowed)
                _rgb(root / scene / name / "gt_full.exr", unshadowed * job.gbuffer.ao[..., None] ** 2)
                entries.append({"name": name, "hdri": None, "rotation_z": 0.0, "job": f"{name}/job.json",
                                "gt_full": f"{name}/gt_full.exr", "gt_unshadowed": f"{name}/gt_unshadowed.exr"})
            (root / scene / "dataset.json").write_text(json.dumps({"format": "pbnds-dataset", "version": 1,
                                                                   "samples": entries}))
            table[split].append(scene)
    (root / "splits.json").write_text(json.dumps({"format": "pbnds-splits", "version": 1, **table}))
    return root


# every step sees all four training images, so that losses of different steps compare
TINY = {"batch_pixels": 512, "images_per_batch": 4, "rays": 32, "val_rays": 32, "lr": 0.02, "shadow_batch": 2,
        "shadow_lr": 0.02, "log_every": 2, "val_every": 100, "device": "cpu"}


def _log(run: Path) -> list[dict]:
    with (run / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_two_stages_learn_and_the_model_reloads(dataset, tmp_path):
    config = make_config(dataset, tmp_path / "run", steps=16, shadow_steps=6, **TINY)
    model = train(config)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "log.csv", "checkpoint.safetensors", "state.json",
                                               "stage1.safetensors", "model.safetensors", "model.json"}
    rows = _log(run)
    assert list(rows[0]) == list(train_module.LOG_COLUMNS)
    for stage in ("1", "2"):
        losses = [float(r["loss"]) for r in rows if r["stage"] == stage and r["loss"]]
        assert sum(losses[-2:]) < sum(losses[:2]), (stage, losses)
    summary = json.loads((run / "model.json").read_text())["training"]
    assert summary["config"]["steps"] == 16 and summary["stages"]["2"]["step"] == 6
    one = summary["stages"]["1"]
    assert one["val"]["val_psnr_fg"] > one["val_start"]["val_psnr_fg"] + 2  # better than the untrained (GGX) shader

    saved = _tensors(run / "model.safetensors")
    assert saved.keys() == {f"shader.{k}" for k in model.shader.state_dict()} | {
        f"shadow.{k}" for k in model.shadow.state_dict()}
    for key, value in {**{f"shader.{k}": v for k, v in model.shader.state_dict().items()},
                       **{f"shadow.{k}": v for k, v in model.shadow.state_dict().items()}}.items():
        assert torch.equal(saved[key], value.cpu()), key
    assert all(torch.equal(v, saved[k]) for k, v in _tensors(run / "stage1.safetensors").items())

    # the reloaded model shades a batch exactly as the one in memory; `pbnds shade --model PATH` renders with it
    from backend.cli import main
    from backend.jobformat import load_job, read_result
    from backend.models import load_checkpoint
    from backend.sampling import make_rays

    job_dir = dataset / "val/scene_0/v000_h00"
    loaded = load_checkpoint(run / "model.safetensors")
    prepared = Renderer("cpu").prepare(load_job(job_dir))
    rays = make_rays("uniform", 16, 3)
    radiance = torch.rand(1, 16, 3)
    images = [prepared.images[k] for k in ("albedo", "normal", "ao", "depth", "mask")]
    images += [torch.rand(1, 1, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE)]  # the default net's visibility, indirect
    unshadowed = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        pixels = prepared.pixels
        assert torch.equal(loaded.shader(pixels, rays, radiance), model.shader(pixels, rays, radiance))
        for a, b in zip(loaded.shadow(unshadowed, *images), model.shadow(unshadowed, *images), strict=True):
            assert torch.equal(a, b)
    assert main(["shade", str(job_dir), "-o", str(tmp_path / "out.exr"), "--model", str(run / "model.safetensors"),
                 "--device", "cpu"]) == 0
    assert np.isfinite(read_result(tmp_path / "out.exr").shaded).all()


def test_stage_two_fits_the_film_that_eval_scores(dataset, tmp_path):
    """With anti-aliased edges (a coverage layer), Cycles' silhouette pixels are part object, part world. Stage
    two must fit what `pbnds eval` scores, the renderer's premultiplied image over the world, with the net fed
    the shading the renderer feeds it (not yet premultiplied). Ground truth made that way from the untrained
    default model (GGX + the physical terms) is then matched exactly by the untrained run (0 steps per stage)."""
    import shutil

    from backend.edges import over_background, world_background
    from backend.jobformat import load_job

    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    renderer = Renderer("cpu")
    for job_file in root.glob("*/*/*/job.json"):
        job = load_job(job_file)
        mask = job.gbuffer.mask.astype(np.float32)
        padded = np.pad(mask, 1, mode="edge")
        job.gbuffer.coverage = sum(padded[i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
        write_job(job, job_file.parent)
        job.options = Options(model="default", rays=TINY["val_rays"], sampling="importance", seed=0)
        result = renderer.render(job)
        assert 0 < result.mask[mask > 0].min() < 1  # silhouettes are partly covered
        _rgb(job_file.parent / "gt_full.exr",
             over_background(result.shaded, result.mask, world_background(job)).astype(np.float32))
    config = make_config(root, tmp_path / "run", steps=0, shadow_steps=0, **TINY)
    train(config)
    stages = json.loads((tmp_path / "run" / "model.json").read_text())["training"]["stages"]
    assert stages["2"]["val"]["val_psnr_fg"] > 60, stages


def test_stage_one_fits_only_pixels_the_objects_cover_whole(dataset):
    """A silhouette pixel of an anti-aliased Cycles render is part world: stage one leaves it out of its batches."""
    from training.data import load_split
    from training.train import covered_pixels, prepare

    sample = load_split(dataset, "train")[0]
    prepared = prepare([sample], torch.device("cpu"))[0]
    assert torch.equal(covered_pixels(sample, prepared), torch.arange(len(prepared.index)))  # no coverage layer
    mask = sample.job.gbuffer.mask.astype(np.float32)
    padded = np.pad(mask, 1, mode="edge")
    sample.job.gbuffer.coverage = sum(padded[i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)) / 9
    kept = covered_pixels(sample, prepared).numpy()
    coverage = sample.job.gbuffer.coverage.reshape(-1)[prepared.index.numpy()]
    assert 0 < len(kept) < len(prepared.index) and set(kept) == set(np.flatnonzero(coverage >= 0.999))


def _interrupt_at(monkeypatch, stage_class, at_step: int) -> None:
    """Send this process SIGINT while `stage_class` computes the loss of step `at_step` (as Ctrl-C would)."""
    original = stage_class.loss

    def loss(self, module, step):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, module, step)

    monkeypatch.setattr(stage_class, "loss", loss)


def test_resume_continues_exactly(dataset, tmp_path, monkeypatch):
    settings = {**TINY, "steps": 6, "shadow_steps": 4, "images_per_batch": 2, "loss": "l1"}  # 2 steps per epoch
    train(make_config(dataset, tmp_path / "whole", **settings))

    config = make_config(dataset, tmp_path / "parts", **settings)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, train_module.ShaderStage, 2)
        assert train(config) is None
    state = json.loads((tmp_path / "parts/state.json").read_text())
    assert (state["stage"], state["step"], state["finished"]) == (1, 3, False)  # the step under way completed
    with monkeypatch.context() as patch:
        _interrupt_at(patch, train_module.ShadowStage, 2)
        assert train(config, resume=True) is None
    state = json.loads((tmp_path / "parts/state.json").read_text())
    assert (state["stage"], state["step"]) == (2, 3)
    assert train(config, resume=True) is not None

    whole, parts = _tensors(tmp_path / "whole/model.safetensors"), _tensors(tmp_path / "parts/model.safetensors")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    columns = [c for c in train_module.LOG_COLUMNS if c != "seconds"]
    assert [[r[c] for c in columns] for r in _log(tmp_path / "whole")] == \
        [[r[c] for c in columns] for r in _log(tmp_path / "parts")]


def test_resume_refuses_other_settings(dataset, tmp_path):
    from backend.cli import main

    out = tmp_path / "run"
    args = ["train", str(dataset), "--out", str(out), "--stage", "1", "--steps", "2", "--batch-pixels", "64",
            "--rays", "4", "--val-rays", "8", "--device", "cpu"]
    assert main(args) == 0
    assert main(args) == 2  # the folder holds a run: --resume or another --out
    assert main([*args, "--resume", "--lr", "0.5"]) == 2
    assert main([*args, "--resume"]) == 0  # finished: nothing left to do


def test_ranks_draw_different_images_and_presets():
    ranks = [Workers(rank, 2, torch.device("cpu")) for rank in range(2)]
    for step in range(3):  # 12 images, 3 per step and rank: two steps cover an epoch without overlap
        first, second = (step_images(0, 1, step, 12, 3, w) for w in ranks)
        assert not set(first) & set(second)
    epoch = [i for step in range(2) for w in ranks for i in step_images(0, 1, step, 12, 3, w)]
    assert sorted(epoch) == list(range(12))
    paper = make_config("d", "o", preset="paper")
    assert (paper.batch_pixels, paper.images_per_batch, paper.rays, paper.sampling, paper.lr, paper.loss) == \
        (8192, 1, 128, "uniform", 5e-5, "l1")
    assert make_config("d", "o", preset="paper", lr=1e-3).lr == 1e-3
    with pytest.raises(ValueError, match="--sampling must be one of"):
        make_config("d", "o", sampling="bogus")


def test_losses_have_finite_gradients_everywhere():
    x = torch.tensor([-0.5, 0.0, 1e-4, 0.5, 40.0], requires_grad=True)
    for kind in ("log-l1", "l1", "srgb-l1", "srgb-mse"):
        x.grad = None
        reconstruction_loss(kind, x, torch.full_like(x, 0.2)).backward()
        assert torch.isfinite(x.grad).all() and (x.grad != 0).all(), kind
    prediction, target = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert reconstruction_loss("l1", prediction, target, mask).item() == 1.0



def test_paired_loss_is_unbiased_under_skewed_noise():
    """A gain g on a Monte Carlo estimate with exponential (skewed) noise of mean 1, fitted to a target t:
    the paired squared error finds g = t (E[g X] = t); L1 finds where E[X sign(g X - t)] = 0, an X-weighted
    median: t / g = c with (1 + c) e^-c = 1/2, c = 1.678, so g = 0.6 t, a 40 % too dark shader."""
    torch.manual_seed(0)
    target = torch.full((20000,), 0.3)
    fitted = {}
    for kind in ("srgb-mse", "l1"):
        gain = torch.tensor(1.0, requires_grad=True)
        optimiser = torch.optim.Adam([gain], lr=0.02)
        for _ in range(300):
            first, second = (gain * torch.empty_like(target).exponential_() for _ in range(2))
            paired = kind == "srgb-mse"
            loss = paired_loss(first, second, target) if paired else reconstruction_loss(kind, first, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        fitted[kind] = gain.item()
    assert fitted["srgb-mse"] == pytest.approx(0.3, rel=0.05)
    assert fitted["l1"] == pytest.approx(0.3 / 1.678, rel=0.05)


DDP_SCRIPT = """
import sys
from safetensors.torch import save_file
from training.train import make_config, train
import torch.distributed as dist

config = make_config(sys.argv[1], sys.argv[2], steps=4, shadow_steps=2, **{TINY!r})
model = train(config)
rank = int(__import__("os").environ["RANK"])
state = {{f"shader.{{k}}": v for k, v in model.shader.state_dict().items()}}
state.update({{f"shadow.{{k}}": v for k, v in model.shadow.state_dict().items()}})
save_file({{k: v.contiguous() for k, v in state.items()}}, f"{{sys.argv[2]}}/rank{{rank}}.safetensors")
"""


def test_torchrun_two_cpu_ranks_end_identical(dataset, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(TINY=TINY))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(dataset), str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    zero, one = _tensors(out / "rank0.safetensors"), _tensors(out / "rank1.safetensors")
    assert zero.keys() == one.keys() and all(torch.equal(zero[k], one[k]) for k in zero)
    summary = json.loads((out / "model.json").read_text())["training"]
    assert summary["world_size"] == 2 and summary["stages"]["1"]["steps_per_epoch"] == 1  # 4 images, 2 x 2 per step
    saved = _tensors(out / "model.safetensors")
    assert all(torch.equal(saved[k], zero[k]) for k in zero)
