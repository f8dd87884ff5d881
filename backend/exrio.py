"""OpenEXR reading and writing on top of the OpenEXR 3.x Python bindings.

Reads every part of a file (Blender writes one part per pass) into a flat {channel name: array}
map; writes single-part multilayer files, float or half. Bytes are read and written through memory
streams where the bindings take them (OpenEXR >= 3.3), and the library decodes with one thread per
core (its global thread pool; ZIP decompression dominates reading a G-buffer).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import OpenEXR

META_ATTRIBUTE = "pbnds_meta"

if hasattr(OpenEXR, "set_global_thread_count") and OpenEXR.global_thread_count() < (os.cpu_count() or 1):
    OpenEXR.set_global_thread_count(os.cpu_count() or 1)


class ExrError(ValueError):
    """An EXR file that cannot be read, or channels that cannot be written."""


def _channels(exr, name: str) -> tuple[dict[str, np.ndarray], dict]:
    channels: dict[str, np.ndarray] = {}
    meta: dict = {}
    for part in exr.parts:
        for channel_name, channel in part.channels.items():
            channels[channel_name] = np.asarray(channel.pixels, dtype=np.float32)
        raw = part.header.get(META_ATTRIBUTE)
        if raw:
            meta = json.loads(raw)
    shapes = {array.shape for array in channels.values()}
    if len(shapes) > 1:
        raise ExrError(f"EXR file {name} has channels of different sizes: {sorted(shapes)}")
    return channels, meta


def read_exr(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Return ({full channel name: float32 (H, W) array}, metadata) from all parts of a file.

    Channel names of later parts are prefixed with the part name when the channel name alone does
    not carry it (OpenEXR multi-part files may store the layer as the part name).
    """
    path = Path(path)
    try:
        exr = OpenEXR.File(str(path), separate_channels=True)
    except Exception as error:  # the bindings raise plain RuntimeError/OSError variants
        raise ExrError(f"cannot read EXR file {path.name}: {error}") from error
    return _channels(exr, path.name)


def _read_exr_via_file(data: bytes, name: str) -> tuple[dict[str, np.ndarray], dict]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(name).name
        path.write_bytes(data)
        try:
            return read_exr(path)
        except ExrError as error:
            raise ExrError(str(error).replace(str(path), name)) from None


def read_exr_bytes(data: bytes, name: str = "upload.exr") -> tuple[dict[str, np.ndarray], dict]:
    """Like read_exr, for an EXR held in memory (read from a stream; through a temporary file for
    bindings that read paths only)."""
    name = Path(name).name
    try:
        exr = OpenEXR.File(io.BytesIO(data), separate_channels=True)
    except TypeError:  # bindings without stream support
        return _read_exr_via_file(data, name)
    except Exception as error:
        raise ExrError(f"cannot read EXR file {name}: {str(error).replace('<python_buffer>', name)}") from error
    return _channels(exr, name)


def _exr_file(channels: dict[str, np.ndarray], half: bool, meta: dict | None):
    dtype = np.float16 if half else np.float32
    with np.errstate(over="ignore"):  # background depth (1e10) becomes +inf in half, as in Blender's files
        arrays = {name: np.ascontiguousarray(array, dtype=dtype) for name, array in channels.items()}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    if meta is not None:
        header[META_ATTRIBUTE] = json.dumps(meta)
    return OpenEXR.File(header, arrays)


def write_exr(path: str | os.PathLike, channels: dict[str, np.ndarray], *, half: bool = False,
              meta: dict | None = None) -> None:
    """Write a single-part EXR with ZIP compression; channel names are kept as given."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with _exr_file(channels, half, meta) as exr:
        exr.write(str(tmp))
    os.replace(tmp, path)  # never leave a half-written file where a result is expected


def exr_bytes(channels: dict[str, np.ndarray], *, half: bool = False, meta: dict | None = None) -> bytes:
    """The bytes of the EXR write_exr would write (through a memory stream where the bindings take one)."""
    with _exr_file(channels, half, meta) as exr:
        stream = io.BytesIO()
        try:
            exr.write(stream)
            return stream.getvalue()
        except TypeError:  # bindings without stream support
            pass
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "out.exr"
            exr.write(str(path))
            return path.read_bytes()
