"""Shared fixtures of the real-Blender tests (bpy wheel, Python 3.11).

The add-on modules are imported as package `addon` without running addon/__init__.py (which
registers the whole extension): these tests exercise the export modules on their own.
"""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
OpenEXR = pytest.importorskip("OpenEXR")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "blend_fixtures"

if "addon" not in sys.modules:
    package = types.ModuleType("addon")
    package.__path__ = [str(ROOT / "addon")]
    sys.modules["addon"] = package


def read_exr(path):
    """{layer: (H, W) or (H, W, C) float32} from every part; the last channel letter is split off."""
    channels = {}
    for part in OpenEXR.File(str(path), separate_channels=True).parts:
        channels.update({name: ch.pixels.astype(np.float32) for name, ch in part.channels.items()})
    layers = {}
    for name in sorted(channels):
        layer, _, channel = name.rpartition(".")
        layers.setdefault(layer, {})[channel] = channels[name]
    out = {}
    for layer, chans in layers.items():
        order = [c for c in "RGBXYZ" if c in chans] or list(chans)
        out[layer] = chans[order[0]] if len(order) == 1 else np.stack([chans[c] for c in order], axis=-1)
    return out


def exr_channel_names(path):
    return [name for part in OpenEXR.File(str(path), separate_channels=True).parts for name in part.channels]


@pytest.fixture
def open_fixture():
    """open_fixture('spheres') loads blend_fixtures/spheres.blend and returns its scene."""
    def load(name):
        bpy.ops.wm.open_mainfile(filepath=str(FIXTURES / f"{name}.blend"))
        return bpy.context.scene
    return load


def dump_diff(before, after, path=""):
    """Paths where two property dumps differ (empty when equal)."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        return [d for key in sorted(set(before) | set(after), key=str)
                for d in dump_diff(before.get(key), after.get(key), f"{path}/{key}")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (a, b) in enumerate(zip(before, after, strict=True)) for d in dump_diff(a, b, f"{path}[{i}]")]
    return [f"{path}: {str(before)[:80]} -> {str(after)[:80]}"]
