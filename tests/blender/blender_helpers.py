"""Helpers of the real-Blender tests: fixture paths, EXR reading, property-dump diffs."""

import sys
import tempfile
from pathlib import Path

import bpy
import numpy as np
import OpenEXR

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "blend_fixtures"
sys.path.insert(0, str(FIXTURES))
import make_fixtures  # noqa: E402

_made = []  # the folder of this session's own fixtures, once made


def fixture(name):
    """Path of the fixture scene ``name``: blend_fixtures/<name>.blend (written by 5.0), or before 5.0
    the same scene made once per session by make_fixtures with this bpy (4.2 cannot read 5.0 files;
    4.5 reads them with a loss of data that crashed Cycles on suzanne.blend's sky)."""
    if bpy.app.version >= (5, 0, 0):
        return FIXTURES / f"{name}.blend"
    if not _made:
        _made.append(Path(tempfile.mkdtemp(prefix="pbnds-fixtures-")))
        make_fixtures.make(_made[0])
    return _made[0] / f"{name}.blend"


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
