"""Dataset export: job + ground truth per sample, deterministic, resumable."""

import json

import numpy as np
import pytest
from blender_helpers import dump_diff, read_exr

from addon import dataset, scene_state

pytestmark = pytest.mark.blender


def test_one_view_one_hdri(tmp_path, open_fixture):
    scene = open_fixture("spheres")
    before = scene_state.property_dump(scene)
    kwargs = {"views": 1, "hdris": [dataset.bundled_hdris()[1]], "width": 32, "height": 32, "gt_samples": 16,
              "gbuffer_samples": 2, "hdri_width": 64, "seed": 7}
    index_path = dataset.export_dataset(scene, tmp_path, **kwargs)
    assert dump_diff(before, scene_state.property_dump(scene)) == []
    index = json.loads(index_path.read_text())
    assert index["format"] == "pbnds-dataset" and len(index["samples"]) == 1
    sample = index["samples"][0]
    folder = tmp_path / sample["name"]
    assert all((folder / name).exists() for name in dataset.FILES)
    full = read_exr(tmp_path / sample["gt_full"])[""]
    unshadowed = read_exr(tmp_path / sample["gt_unshadowed"])[""]
    mask = read_exr(folder / "gbuffer.exr")["mask"] > 0
    assert full.shape == unshadowed.shape == (32, 32, 3)
    assert np.isfinite(full).all() and full.min() >= 0
    # Transparent film: background 0 as in the backend's result, but for a faint denoiser bleed.
    assert np.median(full[~mask]) == 0 and full[~mask].mean() < 0.01 * full[mask].mean()
    assert full[mask].mean() > 0.01
    assert unshadowed[mask].mean() > full[mask].mean() * 1.02  # shadows on the ground are gone

    # Resumable: nothing is rendered again; deterministic: the same index.
    stamps = {name: (folder / name).stat().st_mtime_ns for name in dataset.FILES}
    assert json.loads(dataset.export_dataset(scene, tmp_path, **kwargs).read_text()) == index
    assert stamps == {name: (folder / name).stat().st_mtime_ns for name in dataset.FILES}
