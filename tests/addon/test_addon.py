"""The add-on inside Blender (bpy wheel), without the service: registration, named errors,
compositor write-back, and the extension zip. Each Blender session runs in its own process."""

import os
import sys
import zipfile

import numpy as np
import pytest
from addon_testlib import ROOT, read_exr_parts, run_python

pytestmark = pytest.mark.blender


def test_register_unregister_twice():
    proc = run_python("""
        import bpy, addon
        for _ in range(2):
            addon.register()
            scene = bpy.context.scene
            scene.render.engine = "PBNDS"
            assert scene.render.engine == "PBNDS"
            assert scene.pbnds.job_options() == {"model": "default", "rays": 128, "sampling": "mis",
                                                 "seed": 0, "shadows": True}
            assert "PBNDS" in bpy.types.CYCLES_MATERIAL_PT_surface.COMPAT_ENGINES
            addon.unregister()
            assert not hasattr(bpy.types.Scene, "pbnds")
            assert "PBNDS" not in bpy.types.CYCLES_MATERIAL_PT_surface.COMPAT_ENGINES
        print("CYCLE-OK")
    """)
    assert "CYCLE-OK" in proc.stdout


def test_process_exits_with_classes_still_registered():
    """bpy 4.5's wheel hangs in exit() while a class with Python methods is registered (its sound
    thread's condition variable, compat.unregister_at_exit): the hook unregisters there; 5.0 exits anyway."""
    proc = run_python("""
        import bpy
        from addon import compat

        class PBNDS_OT_exit_probe(bpy.types.Operator):
            bl_idname = "pbnds.exit_probe"
            bl_label = "Exit probe"

            def execute(self, context):
                return {"FINISHED"}

        def unregister():
            bpy.utils.unregister_class(PBNDS_OT_exit_probe)
            print("UNREGISTERED-AT-EXIT", flush=True)

        bpy.utils.register_class(PBNDS_OT_exit_probe)
        compat.unregister_at_exit(PBNDS_OT_exit_probe, unregister)
        compat.unregister_at_exit(PBNDS_OT_exit_probe, unregister)  # one hook per class
        print("HOOKED", compat.BLENDER_5)
    """, timeout=60)
    assert proc.stdout.count("UNREGISTERED-AT-EXIT") == (0 if "HOOKED True" in proc.stdout else 1), proc.stdout


def test_engine_reports_unreachable_service_by_url(tiny_blend, tmp_path):
    """On the bpy 4.5 wheel this also checks that the process exits with the add-on still registered."""
    from addon.service_process import free_port

    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "render.exr"
    proc = run_python("""
        import sys, bpy, addon
        from addon import compat
        blend, url, out = sys.argv[1:]
        bpy.ops.wm.open_mainfile(filepath=blend)
        addon.register()
        scene = bpy.context.scene
        scene.render.engine = "PBNDS"
        scene.pbnds.service_url = url
        compat.set_file_format(scene.render.image_settings, "OPEN_EXR_MULTILAYER")
        scene.render.filepath = out
        try:
            bpy.ops.render.render(write_still=True)
        except RuntimeError as exc:  # the engine's ERROR report makes the operator raise in Python
            print("RENDER-RAISED", exc)
    """, tiny_blend, url, out)
    assert "RENDER-RAISED" in proc.stdout
    log = proc.stdout + proc.stderr
    assert f"PBNDS service not reachable at {url}" in log, log
    assert "Traceback" not in log
    # Blender writes no file for a render that ended in an error: no black frame passes for a result
    assert not out.exists()


def test_compositor_write_back_is_the_final_image_and_idempotent(tiny_blend, tmp_path):
    """Write-back twice keeps one set of PBNDS nodes and the user's nodes; a Cycles render then
    outputs exactly the neural image (orientation included)."""
    out = tmp_path / "composite.exr"
    proc = run_python("""
        import sys, bpy, numpy as np
        from addon import compat, compositor
        blend, folder, out = sys.argv[1:]
        bpy.ops.wm.open_mainfile(filepath=blend)
        scene = bpy.context.scene
        scene.cycles.samples = 1
        tree = compat.compositor_tree(scene, "User Comp")
        tree.nodes.new("CompositorNodeRLayers").name = "User RL"
        h, w = 32, 32
        ramp = np.linspace(0, 2, w * h, dtype=np.float32).reshape(h, w)
        arrays = {"shaded": np.stack([ramp, 1 - ramp / 2, np.full_like(ramp, 0.25)], -1),
                  "unshadowed": np.ones((h, w, 3), np.float32), "shadow": ramp / 2,
                  "lights": np.zeros((h, w, 3), np.float32),
                  "mask": np.ones((h, w), np.float32)}
        arrays["shaded"][:4] = 5.0  # a bright band at the top
        for _ in range(2):
            compositor.write_back(scene, arrays, folder)
        names = sorted(n.name for n in compat.compositor_tree(scene).nodes)
        print("NODES", names)
        assert compat.compositor_tree(scene) == tree
        assert names.count("PBNDS Shaded") == 1 and "User RL" in names
        assert len([i for i in bpy.data.images if i.name.startswith("PBNDS")]) == len(compositor.OUTPUTS)
        compat.set_file_format(scene.render.image_settings, "OPEN_EXR")
        scene.render.filepath = out
        bpy.ops.render.render(write_still=True)
        np.save(folder + "/expected.npy", arrays["shaded"])
    """, tiny_blend, tmp_path, out)
    assert "NODES" in proc.stdout
    parts = read_exr_parts(out)
    got = np.stack([parts["R"], parts["G"], parts["B"]], -1)
    expected = np.load(tmp_path / "expected.npy")
    np.testing.assert_allclose(got, expected, atol=2e-3)


# What both install tests check once the add-on is enabled as `module` (indented as their scripts).
INSTALL_CHECK = """
        scene = bpy.context.scene
        scene.render.engine = "PBNDS"
        assert scene.render.engine == "PBNDS" and scene.pbnds.rays == 128
        prefs = bpy.context.preferences.addons[module].preferences
        assert prefs.bl_rna.identifier == "PBNDSPreferences" and prefs.start_timeout == 60.0
        bpy.ops.preferences.addon_disable(module=module)
        assert module not in bpy.context.preferences.addons
        assert not hasattr(bpy.types.Scene, "pbnds")
        print("INSTALL-OK")
"""


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    import build_addon

    zip_path = build_addon.build(tmp_path_factory.mktemp("dist"))
    assert zip_path.name == "pbnds_addon-0.1.0.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        init = zf.read("pbnds/__init__.py").decode()
    assert {f"pbnds/{name}" for name in ("blender_manifest.toml", "__init__.py", "engine.py", "compat.py")} <= names
    assert "\nbl_info = {'name': 'PBNDS Neural Shading'" in init
    return zip_path


def _user_env(tmp_path):
    """A private Blender user folder (config, scripts, extensions): the real one stays untouched."""
    return dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "user"))


def test_extension_zip_installs_enables_and_disables(addon_zip, tmp_path):
    """Get Extensions > Install from Disk."""
    proc = run_python("""
        import sys, bpy
        bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo="user_default",
                                                 enable_on_install=True)
        module = "bl_ext.user_default.pbnds"
        assert module in bpy.context.preferences.addons, list(bpy.context.preferences.addons.keys())
    """ + INSTALL_CHECK, addon_zip, env=_user_env(tmp_path))
    assert "INSTALL-OK" in proc.stdout, proc.stdout + proc.stderr


def test_legacy_addon_install_enables_and_disables(addon_zip, tmp_path):
    """Preferences > Add-ons > Install (the pre-4.2 path, still in 4.5 and 5.0): add-on `pbnds`, bl_info read."""
    proc = run_python("""
        import sys, bpy, addon_utils
        bpy.ops.preferences.addon_install(filepath=sys.argv[1])
        module = "pbnds"
        (mod,) = [m for m in addon_utils.modules(refresh=True) if m.__name__ == module]
        assert addon_utils.module_bl_info(mod)["name"] == "PBNDS Neural Shading", mod.bl_info
        bpy.ops.preferences.addon_enable(module=module)
        assert module in bpy.context.preferences.addons, list(bpy.context.preferences.addons.keys())
    """ + INSTALL_CHECK, addon_zip, env=_user_env(tmp_path))
    log = proc.stdout + proc.stderr
    assert "INSTALL-OK" in proc.stdout and "missing 'bl_info'" not in log, log


def test_batch_help_and_unreachable_service(tiny_blend, tmp_path):
    from addon.service_process import free_port

    help_text = run_python("import runpy, sys; sys.argv = ['addon.batch', '--help']; "
                           "runpy.run_module('addon.batch', run_name='__main__')", check=False)
    assert help_text.returncode == 0 and "--frames" in help_text.stdout and "--keep-jobs" in help_text.stdout
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_python("import runpy, sys; sys.argv = ['addon.batch', *sys.argv[1:]]; "
                      "runpy.run_module('addon.batch', run_name='__main__')",
                      tiny_blend, "--frames", "1", "--out", tmp_path, "--service", url, check=False)
    assert proc.returncode == 2
    assert f"not reachable at {url}" in proc.stderr
