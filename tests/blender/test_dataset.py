"""Dataset export: job + ground truth per sample, deterministic, resumable."""

import json

import numpy as np
import pytest
from blender_helpers import dump_diff, read_exr

from addon import compat, dataset, scene_state

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
    assert full[~mask].min() > 0  # opaque film: the world is behind the objects (the loader zeroes it)
    assert full[mask].mean() > 0.01
    assert unshadowed[mask].mean() > full[mask].mean() * 1.02  # shadows on the ground are gone

    # Resumable: nothing is rendered again; deterministic: the same index.
    stamps = {name: (folder / name).stat().st_mtime_ns for name in dataset.FILES}
    assert json.loads(dataset.export_dataset(scene, tmp_path, **kwargs).read_text()) == index
    assert stamps == {name: (folder / name).stat().st_mtime_ns for name in dataset.FILES}


def test_denoised_silhouettes_keep_their_brightness(tmp_path, open_fixture):
    """The objects' outermost pixels in the denoised ground truth match a render without denoising.

    With a transparent film and prefiltered guides OpenImageDenoise blended the black background into them:
    0.84 of the noisy render's brightness here.
    """
    scene = open_fixture("spheres")
    scene.objects["Ground"].hide_render = True  # the spheres' outlines against the world
    kwargs = {"views": 1, "hdris": [dataset.bundled_hdris()[1]], "width": 64, "height": 64, "gt_samples": 64,
              "gbuffer_samples": 1, "hdri_width": 64, "seed": 3}
    images = {}
    for denoise in (True, False):
        index_path = dataset.export_dataset(scene, tmp_path / str(denoise), denoise=denoise, **kwargs)
        index = json.loads(index_path.read_text())
        sample = index["samples"][0]
        images[denoise] = read_exr(tmp_path / str(denoise) / sample["gt_full"])[""].sum(axis=-1)
    mask = read_exr(tmp_path / "True" / sample["name"] / "gbuffer.exr")["mask"] > 0
    inner = mask.copy()  # pixels whose 4 neighbours are all foreground
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    outer = mask & ~inner
    assert outer.sum() > 50
    ratio = np.median(images[True][outer] / images[False][outer])
    assert 0.96 < ratio < 1.04, ratio


def test_world_entries_low_renders_and_frames(tmp_path, open_fixture):
    import bpy

    scene = open_fixture("spheres")
    worlds = []
    for frame in range(2):
        world = bpy.data.worlds.new(f"Sky {frame}")
        compat.node_tree(world).nodes["Background"].inputs["Color"].default_value = (0.2, 0.3, 0.5 + 0.2 * frame, 1.0)
        world["pbnds_world"] = {"type": "gradient", "hdri": "gradient", "rotation_z": 0.1 * frame}
        worlds.append(world)
    kwargs = {"views": 1, "hdris": worlds, "width": 24, "height": 24, "gt_samples": 4, "gbuffer_samples": 1,
              "hdri_width": 32, "low_samples": (1,), "sequence": True}
    index = json.loads(dataset.export_dataset(scene, tmp_path, **kwargs).read_text())
    assert scene.world.name not in {w.name for w in worlds}  # the scene keeps its own world
    first, second = index["samples"]
    assert first["world"] == {"type": "gradient", "hdri": "gradient", "rotation_z": 0.0}
    assert (first["frame"], second["frame"], second["rotation_z"], first["hdri"]) == (0, 1, 0.1, None)
    (low,) = second["cycles_low"]
    assert low["samples"] == 1 and low["denoise"] and low["seconds"] > 0 and low["cpu_seconds"] > 0
    assert (tmp_path / low["file"]).exists()
    hdri = read_exr(tmp_path / second["name"] / "hdri.exr")[""]
    assert np.allclose(hdri, (0.2, 0.3, 0.7), atol=1e-3)  # that world lit it
    # Resumed: nothing rendered again, the timings kept.
    stamp = (tmp_path / low["file"]).stat().st_mtime_ns
    assert json.loads(dataset.export_dataset(scene, tmp_path, **kwargs).read_text()) == index
    assert (tmp_path / low["file"]).stat().st_mtime_ns == stamp
