"""The viewport's logic (addon/viewport.py) in real bpy against the real service: the camera that sees what a
viewport sees (a round trip through Blender's own projection), the world behind the objects, what counts as
a G-buffer change and what as a world change, and progressive, cancellable shading of both.
(view_draw's gpu drawing needs a window: it is kept to a few lines and not run here.)"""

import math
import os
import sys

import bpy
import numpy as np
import pytest
from blender_helpers import ROOT

from addon import engine, properties, service_process, viewport

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module", autouse=True)
def registered():
    properties.register()
    yield
    properties.unregister()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """The real service (`python -m backend.cli serve`) on 127.0.0.1, with a private discovery file."""
    os.environ["PBNDS_SERVICE_FILE"] = str(tmp_path_factory.mktemp("pbnds-config") / "service.json")
    proc = service_process.start(sys.executable, cwd=ROOT, timeout=120)
    yield proc.client
    proc.stop()


def camera_matrices(obj, width, height):
    depsgraph = bpy.context.evaluated_depsgraph_get()
    return obj.matrix_world.inverted(), obj.calc_matrix_camera(depsgraph, x=width, y=height)


@pytest.mark.parametrize("kind", ["PERSP", "ORTHO"])
def test_the_temporary_camera_sees_what_the_view_matrices_say(open_fixture, kind):
    scene = open_fixture("spheres")
    camera = scene.camera
    camera.data.type, camera.data.sensor_fit = kind, "HORIZONTAL"
    camera.data.shift_x, camera.data.shift_y, camera.data.ortho_scale = 0.07, -0.04, 5.0
    view, window = camera_matrices(camera, 160, 90)
    matrix_world, settings = viewport.camera_settings(view, window, 160, 90)
    objects = set(bpy.data.objects)
    with viewport.temporary_camera(scene, matrix_world, settings) as temp:
        assert scene.camera == temp
        got_view, got_window = camera_matrices(temp, 160, 90)
        assert np.allclose(np.array(got_window), np.array(window), atol=1e-4)
        if kind == "PERSP":  # an orthographic camera may step back along its axis: same image
            assert np.allclose(np.array(got_view), np.array(view), atol=1e-5)
    assert scene.camera == camera and set(bpy.data.objects) == objects


def test_the_backdrop_is_the_hdri_along_each_pixels_ray(open_fixture):
    """Each texel holds its own direction: the backdrop's pixel must hold (close to) its ray's direction."""
    scene = open_fixture("spheres")
    rows, cols = 64, 128
    theta = (np.arange(rows) + 0.5) / rows * math.pi
    phi = (0.5 - (np.arange(cols) + 0.5) / cols) * 2 * math.pi
    hdri = np.stack(np.broadcast_arrays(np.sin(theta)[:, None] * np.cos(phi), np.sin(theta)[:, None] * np.sin(phi),
                                        np.cos(theta)[:, None]), -1).astype(np.float32)
    view, window = camera_matrices(scene.camera, 40, 30)
    backdrop = hdri.reshape(-1, 3)[viewport.backdrop_texels(view, window, 40, 30, rows, cols)]
    forward = -np.array(scene.camera.matrix_world)[:3, 2]
    assert backdrop.shape == (30, 40, 3)
    assert np.degrees(np.arccos(np.clip(backdrop[15, 20] @ forward, -1, 1))) < 4  # texels are 2.8 degrees wide
    up = np.array(scene.camera.matrix_world)[:3, 1]
    assert (backdrop[0, 20] - backdrop[-1, 20]) @ up > 0  # the top row looks further up


def test_world_edits_change_only_the_world_signature_and_scene_edits_only_the_gbuffers(open_fixture):
    scene = open_fixture("spheres")

    def signatures():
        return engine.gbuffer_signature(bpy.context.evaluated_depsgraph_get(), 64, 48, 1), \
            viewport.world_signature(scene)

    gbuffer0, world0 = signatures()
    background = next(n for n in scene.world.node_tree.nodes if n.type == "BACKGROUND")
    background.inputs["Strength"].default_value *= 2
    gbuffer1, world1 = signatures()
    assert gbuffer1 == gbuffer0 and world1 != world0
    next(o for o in scene.objects if o.type == "MESH").location.x += 0.1
    gbuffer2, world2 = signatures()
    assert gbuffer2 != gbuffer0 and world2 == world1


def shaded(state, timeout=120):
    state.shading.wait(timeout)
    assert state.shading.error == "" and state.last_error == ""
    return state.shading.image


def test_changes_are_shaded_progressively_and_relit_in_proportion(open_fixture, svc):
    scene = open_fixture("spheres")
    scene.pbnds.viewport_scale, scene.pbnds.rays, scene.pbnds.viewport_hdri_width = 1.0, 32, 64
    redraws = []
    state = viewport.ViewportState(svc, lambda: redraws.append(1))
    try:
        assert state.tick(scene, bpy.context.evaluated_depsgraph_get()) is None  # no view drawn yet
        assert state.set_view(*camera_matrices(scene.camera, 64, 48), 64, 48)
        assert not state.set_view(*camera_matrices(scene.camera, 64, 48), 64, 48)
        assert state.tick(scene, bpy.context.evaluated_depsgraph_get()) == "gbuffer"
        first = shaded(state)
        assert first.shape == (48, 64, 4) and state.shading.passes_done == 2 and len(redraws) == 2
        # the refined pass is a relight of the new job: its own upload, shading and download, no export
        assert {"upload_ms", "shade_ms", "download_ms"} <= set(state.shading.timings)
        assert "gbuffer_ms" not in state.shading.timings
        assert state.tick(scene, bpy.context.evaluated_depsgraph_get()) is None  # nothing changed

        background = next(n for n in scene.world.node_tree.nodes if n.type == "BACKGROUND")
        background.inputs["Strength"].default_value *= 2
        assert state.tick(scene, bpy.context.evaluated_depsgraph_get()) == "world"
        second = shaded(state)
        foreground = first[..., 3] > 0  # (the backdrop is opaque: alpha 1 everywhere on an opaque film)
        ratio = second[..., :3].sum() / first[..., :3].sum()
        assert abs(ratio - 2) < 0.02 and foreground.all()  # the shading is linear in the light

        # a change while a run is shading cancels it: only the newest world's image arrives
        background.inputs["Strength"].default_value *= 0.25
        assert state.tick(scene, bpy.context.evaluated_depsgraph_get()) == "world"
        background.inputs["Strength"].default_value *= 2
        assert state.tick(scene, bpy.context.evaluated_depsgraph_get()) == "world"
        third = shaded(state)
        assert abs(third[..., :3].sum() / first[..., :3].sum() - 1) < 0.02
        assert state.shading.passes_done == 2
        assert [p.name for p in state.workdir.glob("world*")] == ["world.exr"]  # one file for all the worlds
        assert viewport.timing_text(state.shading.timings).startswith("PBNDS pass 2: ")
    finally:
        state.free()
