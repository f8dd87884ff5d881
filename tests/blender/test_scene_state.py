"""The user's scene is exactly as before after a successful, failed or cancelled export."""

import bpy
import pytest
from blender_helpers import dump_diff

from addon import dataset, gbuffer, scene_state

pytestmark = pytest.mark.blender


def stop_at(step, action):
    """A cancel_check that does ``action`` on its ``step``-th call (1 = before anything is set up)."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == step:
            return action()
        return False
    return check


def boom():
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("fixture", ["spheres", "suzanne"])
def test_success_leaves_scene_unchanged(tmp_path, open_fixture, fixture):
    scene = open_fixture(fixture)
    before = scene_state.property_dump(scene)
    gbuffer.export_job(scene, tmp_path, samples=1, width=16, height=16, hdri_width=16, frame=3)
    assert dump_diff(before, scene_state.property_dump(scene)) == []


@pytest.mark.parametrize("step", [2, 3, 5])
def test_failure_mid_export_leaves_scene_unchanged(tmp_path, open_fixture, step):
    """Step 2: raised after the AOV nodes, compositor and passes are set up; 3: after the render; 5: with the
    surround map's render set up."""
    scene = open_fixture("spheres")
    before = scene_state.property_dump(scene)
    with pytest.raises(RuntimeError, match="injected"):
        gbuffer.export_job(scene, tmp_path, samples=1, width=16, height=16, hdri_width=16,
                           cancel_check=stop_at(step, boom))
    assert dump_diff(before, scene_state.property_dump(scene)) == []


@pytest.mark.parametrize("step", [2, 3, 5])
def test_cancel_leaves_scene_unchanged(tmp_path, open_fixture, step):
    scene = open_fixture("suzanne")
    before = scene_state.property_dump(scene)
    with pytest.raises(gbuffer.ExportCancelled):
        gbuffer.export_job(scene, tmp_path, samples=1, width=16, height=16, hdri_width=16,
                           cancel_check=stop_at(step, lambda: True))
    assert dump_diff(before, scene_state.property_dump(scene)) == []
    assert not (tmp_path / "job.json").exists()


def test_cancelled_dataset_leaves_scene_unchanged(tmp_path, open_fixture):
    """Cancelled after gt_full, with every object's visible_shadow already set False."""
    scene = open_fixture("spheres")
    before = scene_state.property_dump(scene)
    with pytest.raises(gbuffer.ExportCancelled):
        dataset.export_dataset(scene, tmp_path, views=1, hdris=[dataset.bundled_hdris()[0]], width=8,
                               height=8, gt_samples=1, gbuffer_samples=1, hdri_width=16,
                               cancel_check=stop_at(9, lambda: True))
    assert (tmp_path / "v000_h00" / "gt_full.exr").exists()
    assert not (tmp_path / "v000_h00" / "gt_unshadowed.exr").exists()
    assert dump_diff(before, scene_state.property_dump(scene)) == []


def test_dump_sees_changes(open_fixture):
    """The comparison is not vacuous: the edits an export makes do show up in the dump."""
    scene = open_fixture("spheres")
    before = scene_state.property_dump(scene)
    scene.view_layers[0].aovs.add().name = "albedo"
    bpy.data.materials["RedRough"].node_tree.nodes.new("ShaderNodeOutputAOV")
    bpy.data.objects["Ground"].visible_shadow = False
    scene.cycles.filter_width = 0.01
    diff = "\n".join(dump_diff(before, scene_state.property_dump(scene)))
    for needle in ("aovs", "trees", "visible_shadow", "filter_width"):
        assert needle in diff
