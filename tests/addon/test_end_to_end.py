"""End to end against the real service (`python -m backend.cli serve`, started by the add-on's
service_process): F12 through the PBNDS engine, relight-only, and the batch script in both modes."""

import json
import re

import numpy as np
import pytest
from addon_testlib import ROOT, read_exr_parts, run_python

pytestmark = [pytest.mark.blender, pytest.mark.slow]


def test_engine_render_fills_combined_and_passes_and_relights(service, tiny_blend, tmp_path):
    proc = run_python("""
        import sys, json, bpy, numpy as np, addon
        from addon import client, compat, engine, gbuffer, scene_state
        blend, folder = sys.argv[1:]
        bpy.ops.wm.open_mainfile(filepath=blend)
        addon.register()
        scene = bpy.context.scene
        scene.render.engine = "PBNDS"
        scene.pbnds.rays = 8
        scene.pbnds.gbuffer_samples = 1
        settings = scene.render.image_settings
        compat.set_file_format(settings, "OPEN_EXR_MULTILAYER")
        settings.color_depth = "32"
        scene.render.filepath = f"{folder}/full.exr"
        bpy.context.evaluated_depsgraph_get()  # the dump lists the view layer's depsgraph once it exists
        before = scene_state.property_dump(scene)
        exports = []
        real_export = gbuffer.export_job
        gbuffer.export_job = lambda *a, **k: exports.append(1) or real_export(*a, **k)

        def render(name):
            scene.render.filepath = f"{folder}/{name}.exr"
            bpy.ops.render.render(write_still=True)
            url, _, job_id = engine._last_jobs[scene.name]
            return job_id

        first = render("full")
        after = scene_state.property_dump(scene)
        print("SCENE-CHANGES", json.dumps(sorted(k for k in before if before[k] != after.get(k))))
        svc = client.discover()
        np.savez(f"{folder}/full.npz", **svc.result_arrays(first))
        scene.world.node_tree.nodes["Background"].inputs["Strength"].default_value = 3.0
        scene.pbnds.relight_only = True
        second = render("relit")
        print("RESULT", json.dumps({"exports": len(exports), "same_job": first == second}))
        scene.world.node_tree.nodes["Background"].inputs["Strength"].default_value = 1.0
        render("relit_same")  # the world of the full render again: the same picture
        tree = compat.compositor_tree(scene, "Comp")
        rl = tree.nodes.new("CompositorNodeRLayers")
        print("RL-OUTPUTS", json.dumps([s.name for s in rl.outputs if s.enabled]))
    """, tiny_blend, tmp_path, timeout=300)
    log = proc.stdout + proc.stderr
    assert "Traceback" not in log, log
    assert {"Unshadowed", "Shadow", "Lights"} <= set(json.loads(log.split("RL-OUTPUTS ")[1].splitlines()[0]))
    assert log.split("SCENE-CHANGES ")[1].splitlines()[0] == "[]"
    result = json.loads(log.split("RESULT ")[1].splitlines()[0])
    assert result == {"exports": 1, "same_job": True}, "relight-only must not render the G-buffer again"

    full = read_exr_parts(tmp_path / "full.exr")
    expected = np.load(tmp_path / "full.npz")
    shaded = np.stack([full[f"Combined.{c}"] for c in "RGB"], -1)
    fg, world = expected["mask"] == 1, expected["mask"] == 0  # between them: edges, anti-aliased by coverage
    # the service's arrays are top row first, as the EXR file is: equal means the flip is right
    np.testing.assert_allclose(shaded[fg], expected["shaded"][fg], atol=1e-5)
    # the film is opaque: where no surface was hit, the world shows (the service's result is black there)
    assert world.sum() > 10 and shaded[world].min() > 0.01 and expected["shaded"][world].max() == 0
    np.testing.assert_allclose(np.stack([full[f"Unshadowed.{c}"] for c in "RGB"], -1), expected["unshadowed"],
                               atol=1e-5)
    np.testing.assert_allclose(full["Shadow.X"], expected["shadow"], atol=1e-5)
    np.testing.assert_allclose(np.stack([full[f"Lights.{c}"] for c in "RGB"], -1), expected["lights"], atol=1e-5)
    assert fg.sum() > 100 and shaded[fg].mean() > 0.01
    same = read_exr_parts(tmp_path / "relit_same.exr")
    np.testing.assert_allclose(np.stack([same[f"Combined.{c}"] for c in "RGB"], -1)[fg], shaded[fg], atol=1e-5)
    relit = read_exr_parts(tmp_path / "relit.exr")
    relit_shaded = np.stack([relit[f"Combined.{c}"] for c in "RGB"], -1)
    ratio = relit_shaded[fg].mean() / shaded[fg].mean()
    assert 2.0 < ratio < 4.5, f"world strength x3 gave x{ratio:.2f}"


def batch_args(out, *extra):
    return ["--frames", "1-2", "--out", str(out), "--rays", "8", "--samples", "1", *extra]


def test_batch_module_mode_resumes(service, tiny_blend, tmp_path):
    out = tmp_path / "out"
    proc = run_python("""
        import sys, runpy
        sys.argv = ["addon.batch", *sys.argv[1:]]
        runpy.run_module("addon.batch", run_name="__main__")
    """, tiny_blend, *batch_args(out, "--keep-jobs"), check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 done, 0 skipped, 0 failed" in proc.stdout
    # each frame's line says where its time went
    assert re.search(r"frame 1: done \([\d.]+ s, G-buffer [\d.]+, service [\d.]+, download [\d.]+, "
                     r"backdrop [\d.]+, save [\d.]+\)", proc.stdout), proc.stdout
    for frame in (1, 2):
        assert (out / f"frame_{frame:04d}.exr").stat().st_size > 0
        assert (out / f"frame_{frame:04d}.png").stat().st_size > 0
        assert {"job.json", "gbuffer.exr", "hdri.exr", "result.exr"} <= {
            p.name for p in (out / "jobs" / f"frame_{frame:04d}").iterdir()}
    (out / "frame_0002.png").unlink()
    again = run_python("""
        import sys, runpy
        sys.argv = ["addon.batch", *sys.argv[1:]]
        runpy.run_module("addon.batch", run_name="__main__")
    """, tiny_blend, *batch_args(out), check=False, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done, 1 skipped, 0 failed" in again.stdout
    # the sphere moves between frames 1 and 2
    exr = [read_exr_parts(out / f"frame_{f:04d}.exr") for f in (1, 2)]
    assert np.abs(exr[0]["R"] - exr[1]["R"]).max() > 0.01


def test_batch_blender_script_mode(service, tiny_blend, tmp_path):
    """What `blender -b tiny.blend --python addon/batch.py -- ...` does: the file is open, the script
    runs as __main__ outside any package, its arguments follow `--`."""
    out = tmp_path / "out"
    proc = run_python("""
        import sys, runpy, bpy
        blend, script, *args = sys.argv[1:]
        bpy.ops.wm.open_mainfile(filepath=blend)
        sys.argv = ["blender", "-b", blend, "--python", script, "--", *args]
        runpy.run_path(script, run_name="__main__")
    """, tiny_blend, ROOT / "addon" / "batch.py", "--frames", "1", "--out", out, "--rays", "8", "--samples", "1",
        check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 done, 0 skipped, 0 failed" in proc.stdout
    assert (out / "frame_0001.png").exists() and (out / "frame_0001.exr").exists()
