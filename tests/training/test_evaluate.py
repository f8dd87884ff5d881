"""`pbnds eval` end to end on a tiny dataset whose ground truth is GGX itself, so GGX must come out best."""

import argparse
import csv
import json

import numpy as np
import pytest
from PIL import Image

from backend.exrio import write_exr
from backend.jobformat import Options, write_job
from backend.renderer import Renderer
from backend.synthetic import Material, demo_scene_job, load_bundled_hdri, sphere_job
from training import evaluate

MODELS = ("ggx", "lambert", "blinn-phong")


def _rgb(path, image):
    write_exr(path, {c: image[..., i] for i, c in enumerate("RGB")})


def _write_scene(root, scene, jobs, renderer, frames=False):
    """A scene folder in the dataset layout; ground truth = GGX at many rays, Cycles low = it plus noise."""
    rng = np.random.default_rng(len(scene))
    entries = []
    for index, job in enumerate(jobs):
        name = f"v{index:03d}_h00"
        write_job(job, root / scene / name)
        job.options = Options(model="ggx", rays=1024, seed=7)
        truth = renderer.render(job).shaded
        low = np.maximum(truth + rng.normal(0, 0.03, truth.shape), 0) * (job.gbuffer.mask[..., None] > 0)
        for file, image in (("gt_full", truth), ("gt_unshadowed", truth), ("cycles_low_1spp", low)):
            _rgb(root / scene / name / f"{file}.exr", image.astype(np.float32))
        entries.append({"name": name, "job": f"{name}/job.json", "gt_full": f"{name}/gt_full.exr",
                        "gt_unshadowed": f"{name}/gt_unshadowed.exr", "rotation_z": 0.0,
                        "world": {"type": "hdri", "hdri": "courtyard.exr"},
                        "cycles_low": [{"samples": 1, "denoise": True, "file": f"{name}/cycles_low_1spp.exr",
                                        "seconds": 0.5, "cpu_seconds": 0.9}],
                        **({"frame": index} if frames else {})})
    (root / scene / "dataset.json").write_text(json.dumps({"format": "pbnds-dataset", "version": 1,
                                                           "samples": entries}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    renderer = Renderer("cpu")
    hdri = load_bundled_hdri()
    gold = Material((1.0, 0.78, 0.34), metallic=1.0, roughness=0.3)
    _write_scene(root, "test/scene_0", [demo_scene_job(32, 24), sphere_job(24, 24, gold, hdri)], renderer)
    _write_scene(root, "relight/scene_0", [demo_scene_job(32, 24, np.roll(hdri, 128, axis=1))], renderer)
    _write_scene(root, "anim/scene_0", [demo_scene_job(32, 24, np.roll(hdri, 12 * t, axis=1)) for t in range(3)],
                 renderer, frames=True)
    (root / "splits.json").write_text(json.dumps({"format": "pbnds-splits", "version": 1, "train": [], "val": [],
                                                  "test": ["test/scene_0"], "relight": ["relight/scene_0"],
                                                  "anim": ["anim/scene_0"]}))
    log = root / "log.csv"  # the columns of training/train.py
    log.write_text("stage,step,epoch,loss,lr,val_psnr_fg,val_psnr_lin_fg,seconds\n1,0,0,,,12.1,10.2,1\n"
                   "1,10,1,0.2,1e-3,,,2\n1,20,2,0.1,1e-3,18.3,16.0,3\n2,10,1,0.08,1e-4,21.0,18.2,5\n")
    out = tmp_path_factory.mktemp("reports") / "tiny"
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(root), "--models", ",".join(MODELS), "--out", str(out), "--rays", "256",
                              "--device", "cpu", "--relight", "--temporal", "--training-log", str(log)])
    assert args.handler(args) == 0
    return out


def _read(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_files(report):
    for name in ("report.md", "metrics.csv", "metrics_samples.csv", "grid_test.png", "grid_relight.png",
                 "grid_anim.png", "training_curves.png"):
        assert (report / name).stat().st_size > 0, name
    grid = Image.open(report / "grid_test.png")
    assert grid.width > 4 * 24 and grid.height > 2 * 2 * 24  # 4 columns (truth, 3 models, cycles), 2 rows
    text = (report / "report.md").read_text()
    assert "29.47" in text and "not re-measured" in text and "not computed: weights not present" in text
    assert "![comparison grid, split test](grid_test.png)" in text and "training_curves.png" in text


def test_ggx_is_best(report):
    rows = _read(report / "metrics.csv")
    for split in ("test", "relight", "anim"):
        scores = {r["method"]: r for r in rows if r["split"] == split}
        assert set(MODELS) | {"cycles-1spp+denoise"} <= set(scores)
        assert float(scores["ggx"]["psnr_fg"]) > 30 and float(scores["ggx"]["ssim_fg"]) > 0.97
        for other in ("lambert", "blinn-phong"):
            assert float(scores["ggx"]["psnr_fg"]) > float(scores[other]["psnr_fg"]) + 3
            assert float(scores["ggx"]["flip_fg"]) < float(scores[other]["flip_fg"])
            assert float(scores["ggx"]["unshadowed_psnr_fg"]) > float(scores[other]["unshadowed_psnr_fg"])
        assert float(scores["ggx"]["psnr_fg"]) < float(scores["ggx"]["psnr_full"])  # the background is free
        assert float(scores["ggx"]["ms_median"]) > 0 and scores["ggx"]["device"].startswith("cpu")
        assert float(scores["cycles-1spp+denoise"]["ms_median"]) == 500
    anim = {r["method"]: r for r in rows if r["split"] == "anim"}
    assert abs(float(anim["ggx"]["flicker"])) < 0.01 and float(anim["ggx"]["temporal_mae"]) < 0.01
    assert any(r["kind"].startswith("paper") and r["psnr_full"] == "29.47" for r in rows)


def test_per_sample_rows(report):
    rows = _read(report / "metrics_samples.csv")
    assert len(rows) == 6 * (len(MODELS) + 1)  # 2 test + 1 relight + 3 anim samples; 3 models + Cycles
    assert {r["frame"] for r in rows if r["split"] == "anim"} == {"0", "1", "2"}


def test_bad_model_fails_before_rendering(tmp_path):
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(tmp_path), "--models", "ggx,nonsense", "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="nonsense"):
        args.handler(args)
    assert evaluate.model_label("runs/a/best.safetensors") == "a/best" and evaluate.model_label("ggx") == "ggx"


def test_each_shader_is_scored_with_rays_it_can_use():
    """pdf-weighted shaders get MIS; the paper's plain mean over rays gets the set it was trained with."""
    from backend.models import new_model

    assert evaluate.scoring_sampling(new_model("default")) == evaluate.scoring_sampling(new_model("ggx")) == "mis"
    paper = new_model("pbnds-paper")
    assert evaluate.scoring_sampling(paper) == "uniform"
    paper.info["training"] = {"config": {"sampling": "stratified"}}
    assert evaluate.scoring_sampling(paper) == "stratified"
