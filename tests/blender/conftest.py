"""Shared fixtures of the real-Blender tests (bpy wheel, Python 3.11).

The export modules are imported from package `addon`; they need nothing from addon/__init__.py,
so if that does not import, a bare package stands in and these tests still run.
"""

import sys
import types

import pytest

bpy = pytest.importorskip("bpy")
pytest.importorskip("OpenEXR")

from blender_helpers import ROOT, fixture  # noqa: E402

try:
    import addon  # noqa: F401  (the real package; nothing here needs it registered)
except Exception:  # the rest of the add-on is broken or unfinished: the export modules stand alone
    sys.modules.pop("addon", None)
    package = types.ModuleType("addon")
    package.__path__ = [str(ROOT / "addon")]
    sys.modules["addon"] = package


@pytest.fixture
def open_fixture():
    """open_fixture('spheres') loads blend_fixtures/spheres.blend and returns its scene."""
    def load(name):
        bpy.ops.wm.open_mainfile(filepath=str(fixture(name)))
        return bpy.context.scene
    return load

