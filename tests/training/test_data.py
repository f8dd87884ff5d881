"""Dataset loading without Blender: our layout written by hand, MaterialFusion's layout from its fixture."""

import json
import math

import numpy as np
import pytest

from backend.exrio import write_exr
from backend.jobformat import write_job
from backend.synthetic import look_at, sphere_job
from training import data, materialfusion


def _rgb(path, image):
    write_exr(path, {c: image[..., i] for i, c in enumerate("RGB")})


def _our_root(tmp_path, glow=0.01):
    """A root with one scene folder per split in the addon/dataset.py layout (one 16x16 sample each)."""
    table = {}
    for split in data.SPLITS:
        scene = f"{split}/scene_0"
        folder = tmp_path / scene / "v000_h00"
        job = sphere_job(16, 16)
        write_job(job, folder)
        image = np.where(job.gbuffer.mask[..., None] > 0, 0.5, glow).repeat(3, axis=-1).astype(np.float32)
        _rgb(folder / "gt_full.exr", image)
        _rgb(folder / "gt_unshadowed.exr", image * 1.2)
        _rgb(folder / "cycles_low_1spp.exr", image - 0.001)
        entry = {"name": "v000_h00", "view": 0, "hdri": None, "rotation_z": 0.25,
                 "world": {"type": "hdri", "hdri": "city.exr", "rotation_z": 0.25}, "job": "v000_h00/job.json",
                 "gt_full": "v000_h00/gt_full.exr", "gt_unshadowed": "v000_h00/gt_unshadowed.exr",
                 "cycles_low": [{"samples": 1, "denoise": True, "file": "v000_h00/cycles_low_1spp.exr",
                                 "seconds": 0.5}]}
        if split == "anim":
            entry["frame"] = 0
        (tmp_path / scene / "dataset.json").write_text(json.dumps({"format": "pbnds-dataset", "version": 1,
                                                                    "samples": [entry]}))
        table[split] = [scene]
    (tmp_path / "splits.json").write_text(json.dumps({"format": "pbnds-splits", "version": 1, **table}))
    return tmp_path


def test_our_layout(tmp_path):
    root = _our_root(tmp_path)
    assert data.splits(root) == {split: [f"{split}/scene_0"] for split in data.SPLITS}
    (sample,) = data.load_split(root, "test")
    assert sample.name == "test/scene_0/v000_h00" and sample.scene == "test/scene_0" and sample.split == "test"
    assert sample.hdri == "city.exr" and sample.rotation_z == 0.25 and sample.frame is None
    mask = sample.job.gbuffer.mask > 0
    assert sample.gt_full.shape == (16, 16, 3) and sample.gt_full.dtype == np.float32
    assert np.all(sample.gt_full[~mask] == 0) and np.allclose(sample.gt_full[mask], 0.5)  # the glow is masked
    assert np.allclose(sample.gt_unshadowed[mask], 0.6)
    (low,) = sample.cycles_low
    assert low["samples"] == 1 and low["denoise"] and low["seconds"] == 0.5 and low["image"].shape == (16, 16, 3)
    assert data.load_split(root, "anim")[0].frame == 0
    assert data.load_split(root, "train", limit=0) == []


def test_errors_name_the_file(tmp_path):
    with pytest.raises(data.DatasetError, match="splits.json does not exist"):
        data.load_split(tmp_path, "train")
    root = _our_root(tmp_path)
    with pytest.raises(data.DatasetError, match="unknown split 'bogus'"):
        data.load_split(root, "bogus")
    bad = root / "val/scene_0/v000_h00/gt_full.exr"
    bad.write_bytes(b"not an exr")
    with pytest.raises(data.DatasetError, match=str(bad)):
        data.load_split(root, "val")
    (root / "train/scene_0/v000_h00/gbuffer.exr").unlink()
    with pytest.raises(data.DatasetError, match="train/scene_0/v000_h00/job.json"):
        data.load_split(root, "train")


def test_materialfusion_round_trip(tmp_path):
    from backend.synthetic import Material, Plane, Sphere, trace

    root = materialfusion.write_fixture(tmp_path, size=32, views=2)
    assert data.splits(root)["test"] == ["test/00000"] and data.splits(root)["train"] == []
    samples = data.load_split(root, "test")
    assert [s.name for s in samples] == ["test/00000/000", "test/00000/001"]
    objects = [Plane(0.0, 2.5, Material((0.5, 0.5, 0.5), roughness=0.8)),
               Sphere((-1.1, 0.0, 0.5), 0.5, Material((0.8, 0.1, 0.08), roughness=0.6)),
               Sphere((0.0, 0.4, 0.5), 0.5, Material((1.0, 0.78, 0.34), metallic=1.0, roughness=0.25))]
    for view, sample in enumerate(samples):
        azimuth = math.pi * view
        expected = look_at((4.5 * math.sin(azimuth), -4.5 * math.cos(azimuth), 2.2), (0.0, 0.2, 0.35))
        assert np.allclose(sample.job.camera.world_to_camera, expected, atol=1e-9)
        camera = sample.job.camera
        assert camera.projection[0, 0] == pytest.approx(1 / math.tan(math.radians(20)))
        truth = trace(camera, 32, 32, objects)
        g = sample.job.gbuffer
        assert np.array_equal(g.mask, truth.mask)
        fg = truth.mask > 0
        assert np.abs(g.normal[fg] - truth.normal[fg]).max() < 0.01  # 8-bit quantisation
        assert np.allclose(g.depth[fg], truth.depth[fg], rtol=1e-6)
        assert np.abs(g.albedo[fg] - truth.albedo[fg]).max() < 0.01  # sRGB PNG round trip
        assert np.abs(g.specular[fg] - truth.specular[fg]).max() < 0.01
        assert np.abs(g.roughness[fg] - truth.roughness[fg]).max() < 0.003
        assert np.abs(sample.gt_full[fg] - truth.albedo[fg]).max() < 0.01
        assert sample.gt_unshadowed is None and sample.hdri == "envmap.exr"
        assert np.all(sample.job.hdri == 1.0)


def test_materialfusion_envmap_errors(tmp_path):
    root = materialfusion.write_fixture(tmp_path, size=8, views=1)
    transforms = json.loads((root / "transforms_test.json").read_text())
    transforms["frames"][0]["envmap"] = "maps/sky.hdr"
    (root / "transforms_test.json").write_text(json.dumps(transforms))
    with pytest.raises(data.DatasetError, match="sky.hdr: only EXR environment maps"):
        data.load_split(root, "test")
    transforms["frames"][0]["envmap"] = "maps/missing.exr"
    (root / "transforms_test.json").write_text(json.dumps(transforms))
    with pytest.raises(data.DatasetError, match="missing.exr: the frame's envmap does not exist"):
        data.load_split(root, "test")
