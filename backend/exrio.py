"""OpenEXR reading and writing on top of the OpenEXR 3.x Python bindings.

Reads every part of a file (Blender writes one part per pass) into a flat {channel name: array}
map; writes single-part multilayer files, float or half. Bytes are read and written through memory
streams where the bindings take them (OpenEXR >= 3.3), and the library decodes with one thread per
core (its global thread pool; ZIP decompression dominates reading a G-buffer).

Uploads are untrusted: read_exr_bytes reads the headers first and refuses images larger than the
caller allows before a pixel is decoded (a few MB of ZIP-compressed zeros can declare 16384x16384).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import OpenEXR

META_ATTRIBUTE = "pbnds_meta"
MAX_CHANNELS = 32  # decoded channels per pixel a file may declare at the full pixel budget
_DECODE = threading.Lock()  # one decode at a time: bounds decode memory, and guards the stdout capture

if hasattr(OpenEXR, "set_global_thread_count") and OpenEXR.global_thread_count() < (os.cpu_count() or 1):
    OpenEXR.set_global_thread_count(os.cpu_count() or 1)


class ExrError(ValueError):
    """An EXR file that cannot be read, or channels that cannot be written."""


class ExrTooLarge(ExrError):
    """An EXR file whose header declares more pixels than the reader allows."""


def _open(source, name: str, header_only: bool = False):
    """OpenEXR.File(source) raising ExrError with the decoder's reason.

    When the pixels do not decode (a truncated or corrupt file) the bindings print the reason to
    sys.stdout and return a file without parts instead of raising; the reason is captured here.
    """
    printed = io.StringIO()
    try:
        with _DECODE, contextlib.redirect_stdout(printed):
            exr = OpenEXR.File(source, separate_channels=True, header_only=header_only)
    except TypeError:
        raise
    except Exception as error:  # the bindings raise plain RuntimeError/OSError variants
        raise ExrError(f"cannot read EXR file {name}: {str(error).replace('<python_buffer>', name)}") from error
    if not header_only and not exr.parts:
        reason = printed.getvalue().strip().removeprefix("Warning: ") or "no image parts"
        raise ExrError(f"cannot read EXR file {name}: {reason} (the file is truncated or corrupt)")
    return exr


def _check_header(exr, name: str, size: tuple[int, int] | None, max_pixels: int | None) -> None:
    """Refuse, from the header alone, parts of another size than `size` (width, height), empty
    parts, and files declaring more than max_pixels per part or MAX_CHANNELS samples per pixel."""
    samples = 0
    for index, part in enumerate(exr.parts):
        (x0, y0), (x1, y1) = (tuple(int(v) for v in corner) for corner in part.header["dataWindow"])
        width, height = x1 - x0 + 1, y1 - y0 + 1
        where = f"EXR file {name}" + (f" part {index}" if len(exr.parts) > 1 else "")
        if width < 1 or height < 1:
            raise ExrError(f"{where} declares an empty data window ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise ExrTooLarge(f"{where} declares {width}x{height} pixels, more than this service's budget of "
                              f"{max_pixels} pixels (pbnds serve --max-pixels)")
        if size is not None and (width, height) != size:
            raise ExrError(f"{where} is {width}x{height}, the job is {size[0]}x{size[1]}")
        samples += width * height * len(part.header.get("channels", ()))
    if max_pixels is not None and samples > MAX_CHANNELS * max_pixels:
        raise ExrTooLarge(f"EXR file {name} declares {samples} samples, more than {MAX_CHANNELS} channels at this "
                          f"service's budget of {max_pixels} pixels (pbnds serve --max-pixels)")


def _channels(exr, name: str) -> tuple[dict[str, np.ndarray], dict]:
    channels: dict[str, np.ndarray] = {}
    meta: dict = {}
    for part in exr.parts:
        for channel_name, channel in part.channels.items():
            channels[channel_name] = np.asarray(channel.pixels, dtype=np.float32)
        raw = part.header.get(META_ATTRIBUTE)
        if raw:
            try:
                meta = json.loads(raw) if isinstance(raw, str) else None
            except (ValueError, RecursionError):
                meta = None
            if not isinstance(meta, dict):
                raise ExrError(f"EXR file {name}: attribute '{META_ATTRIBUTE}' is not a JSON object")
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
    return _channels(_open(str(path), path.name), path.name)


def read_exr_bytes(data: bytes, name: str = "upload.exr", *, size: tuple[int, int] | None = None,
                   max_pixels: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Like read_exr, for an EXR held in memory, after _check_header (size, max_pixels) on its headers.

    Read from a stream; through a temporary file for bindings that read paths only.
    """
    name = Path(name).name
    with contextlib.ExitStack() as stack:
        try:
            source = io.BytesIO(data)
            _check_header(_open(source, name, header_only=True), name, size, max_pixels)
            source.seek(0)
        except TypeError:  # bindings without stream support
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            source = str(Path(folder) / name)
            Path(source).write_bytes(data)
            _check_header(_open(source, name, header_only=True), name, size, max_pixels)
        return _channels(_open(source, name), name)


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
